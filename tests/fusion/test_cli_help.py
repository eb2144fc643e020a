"""Every option of every command has help text, and shows its default where it has one."""

from __future__ import annotations

import argparse

import pytest

from fusion.cli import _parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    command = _commands()[name]
    text = command.format_help()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"fusion {name} {action.option_strings or action.dest}: no help text"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)


@pytest.mark.parametrize("name", ["contribute", "aggregate", "release"])
def test_role_commands_explain_exit_status_3(name: str) -> None:
    text = _commands()[name].format_help()
    assert "exit status:" in text and "\n  3  " in text

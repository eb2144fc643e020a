"""Every option of every command has help text, and shows its default where it has one."""

from __future__ import annotations

import argparse

import pytest

from fusion.cli.core import _parser


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


def test_the_run_summary_shows_readings_left_out_by_entity_bounding(capsys: pytest.CaptureFixture[str]) -> None:
    from fusion.cli.release import _print_counts

    _print_counts({"gridco": {"read": 100, "accepted": 98, "rejected": {"duplicate": 2}, "bounded": 17},
                   "metservice": {"read": 50, "accepted": 50, "rejected": {}}})
    lines = capsys.readouterr().out.splitlines()
    assert "bounded" in next(line for line in lines if "accepted" in line)
    def cells(name: str) -> list[list[str]]:
        return [[c.strip() for c in line.split("│")[2:6]] for line in lines if name in line]

    assert cells("gridco") == [["100", "98", "2", "17"]]
    assert cells("metservice") == [["50", "50", "0", "0"]]
    _print_counts({"metservice": {"read": 50, "accepted": 50, "rejected": {}}})  # event level: no column
    assert "bounded" not in capsys.readouterr().out

"""The options and argument types the `fusion` commands share: --config, an interval's --start and --end, and
numbers that must be zero or more (a usage error otherwise)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def non_negative(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is zero or more (a usage error otherwise)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
        return value

    return parse


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, help="federation config (TOML)")
    return p


def with_interval(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--start", required=True, help="interval start, ISO 8601 (UTC if no offset)")
    p.add_argument("--end", required=True, help="interval end (exclusive)")
    return p

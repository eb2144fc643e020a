"""`python -m fusion.cli`: the `fusion` command."""

from fusion.cli.core import run

run()

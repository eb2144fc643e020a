"""What every `fusion` command prints through: the consoles (whole log lines in a cron or systemd log) and
`print_arrow`, an Arrow table as a readable table, CSV or JSON lines."""

from __future__ import annotations

import shutil
import sys

import pyarrow as pa
from rich.console import Console
from rich.table import Table

_WIDTH = None if sys.stdout.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)
console = Console(width=_WIDTH, log_path=False)  # log lines stay whole in a cron or systemd log
err_console = Console(stderr=True, width=_WIDTH, log_path=False)


def print_arrow(table: pa.Table, fmt: str = "table", *, title: str | None = None) -> None:
    """Print an Arrow table as a readable table, CSV or JSON lines (any column type: fusion/cli/formats.py)."""
    from rich.text import Text

    from fusion.cli.formats import cell_text, python_values, visible, write_csv, write_json_lines

    if fmt == "csv":
        write_csv(table.schema, table.to_batches(), sys.stdout)
        return
    if fmt == "json":
        write_json_lines(table.to_batches(), sys.stdout)
        return
    out = Table(title=title, show_lines=False)
    for name in table.column_names:
        out.add_column(Text(visible(name)), overflow="fold")  # Text: a name or value is never read as rich markup
    for batch in table.to_batches():
        for values in zip(*(python_values(column) for column in batch.columns), strict=True):
            out.add_row(*(Text(cell_text(value)) for value in values))
    console.print(out)
    console.print(f"[dim]{table.num_rows} row(s)[/dim]")

"""The function calls a query over the store may make. DuckDB checks for an interrupt, and counts most memory
against its limit, between chunks of rows, never inside one function call: a call that can run or allocate without
bound on its own is refused before the query runs. `SqlSandbox` asks `built_bytes` of each call in a query's parse
tree, and `refused_call_in_text` where it has only the query's text (a PIVOT without IN list).

A value built from a count is bounded twice: each count is a literal of at most COUNT_LIMIT, and `built_bytes`
estimates its size, which the sandbox bounds for all of a query's calls together: DuckDB computes a chunk of 2,048
rows at once, and a value 2,048 times over (repeat('x', 10^6) FROM range(2048): 2 GB) is not counted against its
memory limit either.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import duckdb

#: Scalar functions one call of which can run or allocate without bound. String distances are quadratic in their
#: arguments' length (levenshtein of two 120,000-character strings: 18 s past a 1 s limit), and refused. Calls that
#: build a list or string from a count (list_sort(range(10^7)): 8 s and 1.7 GB past a 1 s and 64 MB limit) are
#: refused unless their counts are literals, each at most COUNT_LIMIT (COUNTED_CALLS). As table functions (FROM
#: range(...)) range and generate_series produce rows chunk by chunk, and stop like any scan.
UNBOUNDED_CALLS = frozenset(
    {"levenshtein", "editdist3", "damerau_levenshtein", "jaro_similarity", "jaro_winkler_similarity"}
)
#: Functions that run a query given as text or JSON, or plan one: that query is never checked here (query('...')
#: would run any call refused here), and json_execute_serialized_sql and json_serialize_plan (which folds the
#: query's constants) run it on a connection of their own, which the time limit does not interrupt (repeat('a',
#: 10^9) inside one: 16 s past a 1 s limit). query_table, which reads tables by name, is no such function.
QUERY_CALLS = frozenset({"query", "json_execute_serialized_sql", "json_serialize_plan"})


@dataclass(frozen=True)
class _Counted:
    """How a call builds its value from a count: `counts`, the positions of its count arguments (None: every
    argument, range's start, stop and step, whose span is the count); `unit`, the most bytes one counted item takes;
    `repeated`, the position of a value the count repeats (a literal, whose length in bytes is the unit if larger)."""

    counts: tuple[int, ...] | None
    unit: int
    repeated: int | None = None


#: Calls that build a list or string from a count: lpad(text, count, fill) is as long as its count whatever its
#: text (a character is at most 4 bytes); bitstring('1', 2 * 10^9) took 15 s past a 1 s limit. Counts DuckDB bounds
#: itself are not listed: bar's width (1,000), to_base's length (64), min/max/arg_max's n and approx_top_k's k
#: (under 10^6, filled as rows come).
COUNTED_CALLS: dict[str, _Counted] = {
    "range": _Counted(None, unit=8), "generate_series": _Counted(None, unit=8),
    "repeat": _Counted((1,), unit=1, repeated=0), "lpad": _Counted((1,), unit=4), "rpad": _Counted((1,), unit=4),
    "list_resize": _Counted((1,), unit=16, repeated=2), "array_resize": _Counted((1,), unit=16, repeated=2),
    "bitstring": _Counted((1,), unit=1), "equi_width_bins": _Counted((2,), unit=8),
}
#: Calls whose format string (their first argument) sets widths and precisions, each padded with characters of up
#: to 4 bytes: format('{:>1000000000}', 'x') took 2.5 s and 600 MB past a 1 s and 64 MB limit. The format string
#: must be a literal, each width and precision in it a number (not an argument's: printf('%*s', n, 'x')).
FORMAT_CALLS = frozenset({"format", "printf"})
#: The largest count a COUNTED_CALLS call, or a width or precision a FORMAT_CALLS call, may hold.
COUNT_LIMIT = 1_000_000
#: The functions refused whatever their arguments.
_REFUSED_CALLS = UNBOUNDED_CALLS | QUERY_CALLS
#: The functions refused by name where a query is checked by its text (a PIVOT without IN list).
_REFUSED_BY_TEXT = _REFUSED_CALLS | set(COUNTED_CALLS) | FORMAT_CALLS
#: A printf conversion's width and precision (`%-08.3f`, `%*d`), or an escaped `%%`.
_PRINTF_SPEC = re.compile(r"%%|%(?:\d+\$)?[-+ #0']*(\*|\d+)?(?:\.(\*|\d*))?")
#: A format() replacement field with no field inside it (`{}`, `{0:>8}`, `{:.3f}`), or an escaped brace.
_FORMAT_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def built_bytes(name: str, call: dict[str, Any], *, table_function: bool) -> float | None:
    """The most bytes one call (a FUNCTION node of DuckDB's JSON form of a parsed query) of `name` (lower case)
    builds from counts (0: none), or None where the call is refused. A table function's call (FROM range(...)) is
    a scan, which stops like any other: it builds no value."""
    if name in _REFUSED_CALLS:
        return None
    if table_function or (name not in COUNTED_CALLS and name not in FORMAT_CALLS):
        return 0.0
    literals = [_literal(argument) for argument in call.get("arguments") or []]
    if name in FORMAT_CALLS:
        widths = _format_widths(name, literals[0] if literals else None)
        return None if widths is None or not all(width <= COUNT_LIMIT for width in widths) else 4.0 * sum(widths)
    counted = COUNTED_CALLS[name]
    positions = range(len(literals)) if counted.counts is None else counted.counts
    counts = [_number(literals[index]) if index < len(literals) else None for index in positions]
    if not all(count is not None and abs(count) <= COUNT_LIMIT for count in counts):
        return None
    numbers = [count for count in counts if count is not None]
    unit = counted.unit
    if counted.repeated is not None and counted.repeated < len(literals):
        repeated = literals[counted.repeated]
        if repeated is None:
            return None
        unit = max(unit, len(repeated.encode()))
    return unit * (_span(numbers) if counted.counts is None else math.prod(abs(number) for number in numbers))


def _literal(argument: Any) -> str | None:
    """The text of an argument that is a literal (`'abc'`, `42`, `1e6`), None for any other expression."""
    expression = argument.get("expression") if isinstance(argument, dict) else None
    if not isinstance(expression, dict) or expression.get("class") != "CONSTANT":
        return None
    return str((expression.get("literal") or {}).get("text", ""))


def _number(text: str | None) -> float | None:
    """A literal read as a number, a string's too (DuckDB casts repeat('a', '1000000000')'s count to one)."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _span(numbers: list[float]) -> float:
    """How many items range or generate_series makes from (stop), (start, stop) or (start, stop, step), at most."""
    if not numbers:
        return 0.0
    start, stop = (0.0, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    step = abs(numbers[2]) if len(numbers) > 2 else 1.0
    return abs(stop - start) / max(step, 1.0) + 1


def _format_widths(name: str, text: str | None) -> list[int] | None:
    """The widths and precisions a format string sets; None where it is no literal, or takes one from an argument
    (`%*d`, `{:>{}}`)."""
    if text is None:
        return None
    if name == "printf":
        numbers = [number for match in _PRINTF_SPEC.finditer(text) for number in match.groups() if number]
    elif "{" in _FORMAT_FIELD.sub("", text):  # a field inside another: its width from an argument
        return None
    else:
        numbers = [number for match in _FORMAT_FIELD.finditer(text) if ":" in (match.group(1) or "")
                   for number in re.findall(r"\d+", match.group(1).split(":", 1)[1])]
    return None if "*" in numbers else [int(number) for number in numbers]


def refused_call_in_text(text: str) -> str | None:
    """The first function refused by name that `text` calls, or None. Found with DuckDB's own tokenizer, as a
    name (quoted or not) before an opening parenthesis with only comments between, so that neither
    `"levenshtein"(` nor `levenshtein/**/(` hides a call, and a name inside a string is none."""
    tokens = duckdb.tokenize(text)
    ends = [start for start, _ in tokens[1:]] + [len(text)]
    words = [(text[start:end].strip(), kind) for (start, kind), end in zip(tokens, ends, strict=True)
             if kind != duckdb.token_type.comment]
    for (word, kind), (following, _) in itertools.pairwise(words):
        if kind in (duckdb.token_type.identifier, duckdb.token_type.keyword) and following.startswith("("):
            name = (word[1:-1].replace('""', '"') if word.startswith('"') else word).lower()
            if name in _REFUSED_BY_TEXT:
                return name
    return None


def refusal(call: str) -> str:
    """Why a call of `call` is refused, and what to do instead."""
    if call in QUERY_CALLS:
        return (
            f"{call}() is refused: the query it is given would run unchecked by the sandbox (on a connection of its "
            "own, for some: past the time limit). Write that query itself."
        )
    if call in FORMAT_CALLS:
        allowed = (f" unless its format string is a literal whose widths and precisions are numbers of at most "
                   f"{COUNT_LIMIT:,}")
    elif call in COUNTED_CALLS:
        repeated = " (and the value it repeats a literal)" if COUNTED_CALLS[call].repeated is not None else ""
        allowed = f" unless its count is a literal of at most {COUNT_LIMIT:,}{repeated}"
    else:
        allowed = ""
    return (
        f"{call}() is refused{allowed}: one call of it can run and allocate without bound, past the query's time "
        "and memory limits (which DuckDB checks between chunks of rows). Table functions (FROM range(...)) are "
        "available."
    )


__all__ = ["COUNTED_CALLS", "COUNT_LIMIT", "FORMAT_CALLS", "QUERY_CALLS", "UNBOUNDED_CALLS", "built_bytes", "refusal",
           "refused_call_in_text"]

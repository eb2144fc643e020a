"""The function calls a query over the store may make. DuckDB checks for an interrupt, and counts most memory
against its limit, between chunks of rows, never inside one function call: a call that can run or allocate without
bound on its own is refused before the query runs. `SqlSandbox` asks `call_refused` of each call in a query's parse
tree, and `refused_call_in_text` where it has only the query's text (a PIVOT without IN list).
"""

from __future__ import annotations

import itertools
from typing import Any

import duckdb

#: Scalar functions one call of which can run or allocate without bound. String distances are quadratic in their
#: arguments' length (levenshtein of two 120,000-character strings: 18 s past a 1 s limit), and refused. Calls that
#: build a list or string from a count (list_sort(range(10^7)): 8 s and 1.7 GB past a 1 s and 64 MB limit) are
#: refused unless every argument is a literal, each number at most COUNT_LIMIT in size. As table functions (FROM
#: range(...)) range and generate_series produce rows chunk by chunk, and stop like any scan.
UNBOUNDED_CALLS = frozenset(
    {"levenshtein", "editdist3", "damerau_levenshtein", "jaro_similarity", "jaro_winkler_similarity"}
)
#: Functions that run a query given as text or JSON, or plan one: that query is never checked here (query('...')
#: would run any call refused here), and json_execute_serialized_sql and json_serialize_plan (which folds the
#: query's constants) run it on a connection of their own, which the time limit does not interrupt (repeat('a',
#: 10^9) inside one: 16 s past a 1 s limit). query_table, which reads tables by name, is no such function.
QUERY_CALLS = frozenset({"query", "json_execute_serialized_sql", "json_serialize_plan"})
#: Calls that build a list or string from a count, with the positions of their count arguments (None: every
#: argument, the value repeated too): lpad(text, count, fill) is as long as its count whatever its text.
COUNTED_CALLS: dict[str, tuple[int, ...] | None] = {
    "range": None, "generate_series": None, "repeat": None, "lpad": (1,), "rpad": (1,), "list_resize": (1,),
    "array_resize": (1,),
}
#: The largest number a literal argument of a COUNTED_CALLS function may hold.
COUNT_LIMIT = 1_000_000
#: The functions refused whatever their arguments.
_REFUSED_CALLS = UNBOUNDED_CALLS | QUERY_CALLS
#: The functions refused by name where a query is checked by its text (a PIVOT without IN list).
_REFUSED_BY_TEXT = _REFUSED_CALLS | set(COUNTED_CALLS)


def call_refused(name: str, call: dict[str, Any], *, table_function: bool) -> bool:
    """Whether a call (a FUNCTION node of DuckDB's JSON form of a parsed query) of `name` (lower case) is refused.
    A table function's call (FROM range(...)) is a scan, not a scalar: only a query's are refused."""
    if name in _REFUSED_CALLS:
        return True
    return not table_function and name in COUNTED_CALLS and not _bounded(name, call)


def _bounded(name: str, call: dict[str, Any]) -> bool:
    """Whether a COUNTED_CALLS call's count arguments (every argument, for some) are literals, each number at
    most COUNT_LIMIT in size."""
    arguments = call.get("arguments") or []
    positions = COUNTED_CALLS[name]
    for index in range(len(arguments)) if positions is None else positions:
        argument = arguments[index] if index < len(arguments) else None
        expression = argument.get("expression") if isinstance(argument, dict) else None
        if not isinstance(expression, dict) or expression.get("class") != "CONSTANT":
            return False
        literal = expression.get("literal") or {}
        if literal.get("kind") != "STRING":
            try:
                if not abs(float(literal.get("text", "inf"))) <= COUNT_LIMIT:
                    return False
            except ValueError:
                return False
    return True


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
    allowed = f" unless its count is a literal of at most {COUNT_LIMIT:,}" if call in COUNTED_CALLS else ""
    return (
        f"{call}() is refused{allowed}: one call of it can run and allocate without bound, past the query's time "
        "and memory limits (which DuckDB checks between chunks of rows). Table functions (FROM range(...)) are "
        "available."
    )


__all__ = ["COUNTED_CALLS", "COUNT_LIMIT", "QUERY_CALLS", "UNBOUNDED_CALLS", "call_refused", "refusal",
           "refused_call_in_text"]

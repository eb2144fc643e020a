"""A PIVOT without an IN list, checked on its parse tree. DuckDB runs such a query as two statements (first an ENUM
type of the PIVOT's ON values, then the query pivoting on that type) and serialises neither: the sandbox parses a
twin of the query instead, the same text with `IN <a type's name>` after each of those ON values (a name made for
each twin, with a random part, that no query's text can hold: one naming it would pass for a PIVOT's values), which
DuckDB serialises like any query. Every call of the query is then checked as any query's (`sql_growth`), and those
of the PIVOT's own parts (its source, ON, USING and GROUP BY, and the WITH queries its source reads) are refused by
name as before (`sql_calls.REFUSED_BY_NAME`): a PIVOT is checked in full with an IN list of its own.

The twin only adds tokens to the text, and is used only where DuckDB's tokenizer reads it as the text's tokens plus
those, and where its parse tree holds the type's name as the values of a PIVOT, once for each place it was added, and
nowhere else: the tree is then the query's. Where the twin cannot be made (a JOIN in the PIVOT's source, an ON value
DuckDB reads otherwise, an IN list that is a subquery), the query is checked by its text
(`sql_calls.refused_call_in_text`, `sql_calls.refused_syntax_in_text`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import duckdb

from fusion.store.sql_calls import REFUSED_BY_NAME

#: The start of the name of the ENUM type a twin's IN lists name (never created: the twin is parsed, not run), whose
#: end is random, made for each twin.
VALUES_TYPE = "fusion_pivot_values"
#: Keywords that end a PIVOT's ON list where no parenthesis is open.
_ON_ENDS = frozenset({"USING", "GROUP", "ORDER", "LIMIT", "OFFSET", "UNION", "EXCEPT", "INTERSECT"})
#: Tokens that end a level of a query's text: what closes a parenthesis, bracket or brace, and the end of a statement.
_CLOSING = frozenset({")", "]", "}", ";"})


class _Token(NamedTuple):
    """One token of a query's text, comments left out: its place in the text, its text, its kind, and how many
    parentheses (and brackets, braces) are open before it."""

    start: int
    end: int
    word: str
    kind: duckdb.token_type
    depth: int

    def keyword(self, *words: str) -> bool:
        return self.kind == duckdb.token_type.keyword and self.word.upper() in words


@dataclass(frozen=True)
class PivotTwin:
    """`text`, the query with an IN list (naming `values_type`, VALUES_TYPE and a random part) after each of `values`
    ON values of its PIVOTs that had none."""

    text: str
    values: int
    values_type: str


def pivot_twin(text: str) -> PivotTwin | None:
    """The twin of a query holding a PIVOT without an IN list, or None where it cannot be made."""
    values_type = f"{VALUES_TYPE}_{secrets.token_hex(8)}"
    if values_type in text.lower():  # never, but for a query that guessed it
        return None
    read = _tokens(text)
    if read is None:
        return None
    tokens, following = read
    places: list[tuple[int, str]] = []  # (where in the text, what goes there)
    for index, token in enumerate(tokens):
        if token.keyword("PIVOT", "PIVOT_WIDER"):
            values = _values_without_list(tokens, following, index)
            if values is None:
                return None
            for first, last in values:
                places += [(tokens[first].start, "("), (tokens[last].end, f") IN {values_type}")]
    if not places:
        return None
    twin, done = [], 0
    for at, words in sorted(places, key=lambda place: place[0]):
        twin += [text[done:at], words]
        done = at
    twin.append(text[done:])
    twin_text = "".join(twin)
    # the twin's tokens must be the text's and those added, each where it was put (none inside a string or comment)
    added = [(at, 0, order, word.upper()) for at, words in places for order, word in enumerate(words.split(" "))]
    expected = sorted([(token.start, 1, 0, token.word.upper()) for token in tokens] + added)
    found = _tokens(twin_text)
    if found is None or [token.word.upper() for token in found[0]] != [word for *_, word in expected]:
        return None
    return PivotTwin(twin_text, len(places) // 2, values_type)


def twin_read_as_query(tree: Any, twin: PivotTwin) -> bool:
    """Whether DuckDB's parse tree of `twin` holds its values type as the values of a PIVOT for each IN list the twin
    added, and nowhere else (no column, no function of that name): only then is it the parse tree of the query."""
    if not isinstance(tree, dict) or len(tree.get("statements") or []) != 1:
        return False
    enums = sum(1 for pivot in _pivots(tree) for column in pivot.get("pivots") or []
                if isinstance(column, dict) and column.get("pivot_enum") == twin.values_type)
    named, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and twin.values_type in node.lower():
            named += 1
    return enums == twin.values == named


def refused_in_pivots(tree: Any, twin: PivotTwin) -> str | None:
    """The first call of REFUSED_BY_NAME in the parts of a PIVOT whose values are `twin`'s type (its source, ON, USING,
    GROUP BY), or in the WITH queries these read (by name, a table's or a string's: query_table('c')), or None."""
    queries = _with_queries(tree)
    stack: list[Any] = [pivot for pivot in _pivots(tree) if any(isinstance(column, dict) and column.get(
        "pivot_enum") == twin.values_type for column in pivot.get("pivots") or [])]
    read: set[str] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("class") == "FUNCTION" and (name := str(node.get("function_name", "")).lower()) in REFUSED_BY_NAME:
            return name
        named = node.get("table_name") if node.get("type") == "BASE_TABLE" else (
            (node.get("literal") or {}).get("text") if node.get("class") == "CONSTANT" else None)
        if isinstance(named, str) and (key := named.lower()) in queries and key not in read:
            read.add(key)
            stack.extend(queries[key])
        stack.extend(node.values())
    return None


def _tokens(text: str) -> tuple[list[_Token], list[int]] | None:
    """`text`'s tokens, comments left out, and for each the index of the next token at its level (past the closing
    of the parenthesis, bracket or brace it opens); None where one closes what was never opened."""
    starts = duckdb.tokenize(text)
    ends = [start for start, _ in starts[1:]] + [len(text)]
    tokens: list[_Token] = []
    following: list[int] = []
    opened: list[int] = []
    for (start, kind), end in zip(starts, ends, strict=True):
        word = text[start:end].rstrip()
        if kind == duckdb.token_type.comment:
            continue
        tokens.append(_Token(start, start + len(word), word, kind, len(opened)))
        following.append(len(tokens))
        if kind != duckdb.token_type.operator or not any(char in "()[]{}" for char in word):
            continue
        if len(word) != 1:  # DuckDB's tokenizer gives each its own token
            return None
        if word in "([{":
            opened.append(len(tokens) - 1)
        elif not opened:
            return None
        else:
            following[opened.pop()] = len(tokens)
    for index in opened:
        following[index] = len(tokens)
    return tokens, following


def _level(tokens: list[_Token], following: list[int], start: int) -> Iterator[int]:
    """The indices of the tokens from `start` on at its level (what a parenthesis there holds skipped), up to the one
    that closes it or ends the query."""
    depth = tokens[start].depth if start < len(tokens) else 0
    index = start
    while index < len(tokens) and tokens[index].depth == depth and tokens[index].word not in _CLOSING:
        yield index
        index = following[index]


def _values_without_list(tokens: list[_Token], following: list[int], pivot: int) -> list[tuple[int, int]] | None:
    """The ON values (first and last token) without an IN list of the PIVOT statement whose keyword is
    `tokens[pivot]`: none for a PIVOT clause (`FROM t PIVOT (sum(x) FOR k IN (...))`, whose IN list DuckDB requires);
    None where they cannot be told (a JOIN in its source, whose ON would pass for the PIVOT's)."""
    source = pivot + 1
    if source < len(tokens) and tokens[source].word == "(" and any(
            tokens[index].keyword("FOR") for index in _level(tokens, following, source + 1)):
        return []
    for on in _level(tokens, following, source):
        if tokens[on].keyword("USING", "GROUP"):
            return []
        if tokens[on].keyword("JOIN"):
            return None
        if tokens[on].keyword("ON"):
            break
    else:
        return []
    values: list[tuple[int, int]] = []
    first = end = on + 1  # the current value's first token, and the token after its last
    listed = False  # whether the current value has an IN list
    cases = 0  # CASE expressions open in the current value: an IN inside one is a condition, not the value's list
    for index in _level(tokens, following, on + 1):
        if tokens[index].keyword(*_ON_ENDS):
            break
        if tokens[index].word == "," and not cases:
            if end > first and not listed:
                values.append((first, end - 1))
            first, listed = index + 1, False
        elif tokens[index].keyword("CASE"):
            cases += 1
        elif tokens[index].keyword("END") and cases:
            cases -= 1
        else:
            listed = listed or (not cases and tokens[index].keyword("IN"))
        end = following[index]
    if end > first and not listed:
        values.append((first, end - 1))
    return values


def _pivots(tree: Any) -> list[dict[str, Any]]:
    """Every PIVOT in a parse tree (a table reference of type PIVOT), found without recursion."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "PIVOT" and "pivots" in node:
                found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _with_queries(tree: Any) -> dict[str, list[Any]]:
    """The queries of every WITH clause in a parse tree, by name (lower case; several where one name is given at
    several levels)."""
    queries: dict[str, list[Any]] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ctes = node.get("cte_map")
            for entry in (ctes.get("map") if isinstance(ctes, dict) else None) or []:
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    queries.setdefault(entry["key"].lower(), []).append(entry.get("value"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return queries


__all__ = ["VALUES_TYPE", "PivotTwin", "pivot_twin", "refused_in_pivots", "twin_read_as_query"]

"""How many times a query's calls repeat the values they build, checked on its parse tree before it runs: one call
that repeats a value is as unbounded as one that builds it from a count, and DuckDB stops neither (its interrupt and
memory limit act between chunks of rows, see sql_calls).

A map or reduce lambda (list_transform, list_reduce, a list comprehension) holds its body's value once for each item
of its list: what the body builds from counts and literals counts that many times against the sandbox's row budget
(list_transform(range(12000), lambda x: range(12000)): 1.15 GB, 37 s past a 5 s limit), and over a list of unknown
length (a column's) it may build nothing from counts and add at most MAX_GROWTH bytes of literals to each item (the
padding of lpad and rpad to a literal width counts as literals: lpad(c, 12, ' ') adds 12 bytes to its item). A
filter's body is a boolean, as is any value below a comparison, and a count (len, list_sum) a number: what these are
built from is built a chunk of items at a time, as a row's values are, and held in no result (so the row budget
covers it). A value of unknown size (a column's) may be repeated at most MAX_GROWTH times:
by the lambdas whose body names it from outside them (list_transform(range(7000), lambda i: s): 0.7 GB under a 256 MB
limit), and by the calls that grow their text by a factor (GROWING_CALLS, and SET_GROWING_CALLS by their literal
arguments: replace(s, 'a', repeat('b', 30000)) made 1.95 GB, 12.8 s past a 1 s limit), and by a map's (or
invoke's) lambda that names its own parameter several times (lambda x: x || x doubles each item), multiplied along
nested calls (bin(bin(...)) nine deep: 950 MB; 25 nested maps of x || x: 5.3 GB). A reduce's accumulator may not be
repeated at all: a || a doubles it with each item (2^30 bytes from 30 items). Values built step by step through
columns (a string doubled in each of thirty WITH clauses, or concatenated with itself) remain beyond these checks, as
sql.py says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from fusion.store.sql_calls import (
    FILTER_CALLS,
    MAP_CALLS,
    MAX_GROWTH,
    PADDING_CALLS,
    REDUCE_CALLS,
    SCALAR_CALLS,
    SCALAR_CLASSES,
    SCALAR_OPERATORS,
    SET_GROWING_CALLS,
    built_bytes,
    growth,
    list_length,
    numeric_list,
    padding,
    refusal,
)

#: How a refusal ends: why no limit could stop the call.
_UNSTOPPABLE = "past the query's time and memory limits (which DuckDB checks between chunks of rows)"
#: The calls that take a lambda: a map's, a reduce's and a filter's second argument, invoke's first.
_LAMBDA_CALLS = MAP_CALLS | REDUCE_CALLS | FILTER_CALLS | {"invoke"}
#: How to write a lambda over a column's list instead.
_UNNEST = "unnest the list into rows (FROM t, unnest(t.l) AS u(x))"


@dataclass
class CallCheck:
    """What `check_calls` found in a query: `refused`, why a call in it is refused (None: none is); `built`, the
    bytes one row's values take that calls build from counts, and literals that calls repeat, by what built them."""

    refused: str | None = None
    built: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Scope:
    """A lambda around a node of a parse tree: the call it is given to, its parameters (its accumulator first for
    a reduce), how many items of that call's value its body's value goes into (its list's length for a map or
    reduce, math.inf where unknown; 1 for a filter, and below a scalar), the lambda's `key` (its node's id, the
    same in every place), whether its list's items are `numeric` (a range's: copies of them are bounded by the
    lists that copy them), and `repeats`, how many times a node here repeats a reduce's accumulator in the next one
    (0: not at all, below a scalar)."""

    call: str
    parameters: tuple[str, ...]
    items: float
    key: int
    numeric: bool = False
    repeats: float = 1.0

    @property
    def accumulator(self) -> str | None:
        return self.parameters[0] if self.call in REDUCE_CALLS and self.parameters else None


@dataclass(frozen=True)
class _Place:
    """Where a node is: the lambdas around it (innermost last), and the factor the growing calls around it may
    multiply its value by."""

    scopes: tuple[_Scope, ...] = ()
    growth: float = 1.0

    @property
    def items(self) -> float:
        """How many times one row's value holds this node's value: a product of lambdas' list lengths."""
        return math.prod(scope.items for scope in self.scopes)

    def repeating(self, factor: float) -> _Place:
        """This place where a reduce's accumulator is repeated `factor` more times (0: no more held)."""
        scopes = tuple(replace(scope, repeats=0.0 if 0 in (scope.repeats, factor) else scope.repeats * factor)
                       for scope in self.scopes)
        return replace(self, scopes=scopes)

    def scalar(self) -> _Place:
        """Below a node whose value is a boolean or a number: no value here goes into a lambda's result."""
        return replace(self, scopes=tuple(replace(scope, items=1.0, repeats=0.0) for scope in self.scopes))


def check_calls(tree: Any) -> CallCheck:
    """Check every call in a parsed query (DuckDB's JSON form of it), without recursion (a tree nested hundreds of
    levels deep is no Python error): the first call refused, and the bytes the calls build in a row."""
    check = CallCheck()
    item_literals: dict[int, float] = {}  # bytes of literals a map over a list of unknown length adds to each item
    accumulated: dict[int, float] = {}  # times a reduce's body repeats its accumulator
    stack: list[tuple[Any, str | None, _Place]] = [(tree, None, _Place())]
    while stack and check.refused is None:
        node, key, place = stack.pop()
        if isinstance(node, list):
            stack.extend((value, key, place) for value in node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("class")
        if kind == "FUNCTION":
            check.refused = _check_function(node, key == "function", place, check.built, item_literals, stack)
        elif kind == "LAMBDA" and key == "lambda":  # its place set by its call; its parameters (lhs) are no references
            stack.append((node.get("expr"), "expr", place))
        elif kind == "LAMBDA":  # DuckDB's JSON operator (j -> '$.a'), parsed as a lambda: both its sides are values
            stack.extend((value, child, place) for child, value in node.items())
        elif kind in ("COLUMN_REF", "STAR", "POSITIONAL_REFERENCE"):  # a column, COLUMNS(...) or #1: by name or not
            check.refused = _check_reference(node, place, accumulated)
            stack.extend((value, child, place) for child, value in node.items())
        elif kind == "CONSTANT":
            check.refused = _check_literal(node, place, check.built, item_literals)
        else:
            inner = place.scalar() if kind in SCALAR_CLASSES or (
                kind == "OPERATOR" and node.get("type") in SCALAR_OPERATORS) else place
            stack.extend((value, child, inner) for child, value in node.items())
    return check


def _check_function(node: dict[str, Any], table_function: bool, place: _Place, built: dict[str, float],
                    item_literals: dict[int, float], stack: list[tuple[Any, str | None, _Place]]) -> str | None:
    """Check one call, count what it builds, and queue its arguments, each at its place; why it is refused, or
    None."""
    name = str(node.get("function_name", "")).lower()
    size = built_bytes(name, node, table_function=table_function)
    if size is None:
        return refusal(name)
    if size and place.items == math.inf:
        # lpad(x, 12, ' ') over a column's list: at most 12 bytes more in each item, as a literal of 12 bytes would
        padded = padding(name, node)
        if padded is not None:
            refused = _add_to_items(padded, place, item_literals)
            if refused:
                return refused
        else:
            scope = next(scope for scope in reversed(place.scopes) if scope.items == math.inf)
            return (
                f"{name}() is refused inside {scope.call}() over a list of unknown length: a lambda's body runs once "
                f"for each item of its list, and what it builds from counts would have no bound, {_UNSTOPPABLE}. "
                f"Map a list built from literal counts (range(n)), or {_UNNEST}."
            )
    elif size:
        built[f"{name}()"] = built.get(f"{name}()", 0.0) + size * place.items * place.growth
    factor = 1.0 if table_function else growth(name, node)
    if factor is None or factor > MAX_GROWTH:
        return refusal(name)
    arguments = [argument.get("expression") if isinstance(argument, dict) else None
                 for argument in node.get("arguments") or []]
    places = [place.scalar() if name in SCALAR_CALLS else place] * len(arguments)
    if name in PADDING_CALLS:  # a count, and a fill of which the padding (counted) holds a few characters
        places[1:] = [place.scalar()] * (len(arguments) - 1)
    if factor > 1:
        grown = replace(place.repeating(factor), growth=place.growth * factor)
        if grown.growth > MAX_GROWTH:
            return (
                f"{name}() is refused here: with the calls around it, it may make a value {grown.growth:,.0f} times "
                f"longer, past {MAX_GROWTH} (bin() 8 times, hex() 2, to_json() 8, replace() its replacement's length "
                f"over its pattern's), without bound, {_UNSTOPPABLE}. Grow the value fewer times."
            )
        for index in _texts(name, len(arguments)):
            places[index] = grown
    if name in MAP_CALLS | {"invoke"}:
        refused = _grow_by_parameters(name, arguments, place, places)
        if refused:
            return refused
    keys = ["expression"] * len(arguments)
    for index, argument in enumerate(arguments):
        if _is_lambda(argument, name, index):
            places[index] = _lambda_place(name, argument, arguments[0] if index else None, place)
            keys[index] = "lambda"
            if argument.get("syntax_type") == "SINGLE_ARROW":  # x -> ..., which DuckDB may read as JSON's arrow
                stack.append((argument.get("lhs"), "lhs", place))
        elif name in MAP_CALLS | REDUCE_CALLS:  # a reduce's accumulator in a map's list: repeated without bound
            places[index] = places[index].repeating(math.inf)  # its growth by the lambda's parameters kept
    stack.extend((value, child, place) for child, value in node.items() if child != "arguments")
    stack.extend(zip(arguments, keys, places, strict=True))
    return None


def _grow_by_parameters(name: str, arguments: list[Any], place: _Place, places: list[_Place]) -> str | None:
    """A map's (or invoke's) lambda whose body names its parameter k times, outside scalars (x || x, [x, x]), makes
    each item k times longer: its list (invoke's values) grows by k, multiplied along nested calls as a growing
    call's text is (25 nested maps of x || x: 2^25 times a column's list, 5.3 GB past a 256 MB limit). Over a list of
    numbers (a range's), what a body builds is bounded by the lambdas' list lengths, which are counted."""
    lambda_index = 0 if name == "invoke" else 1
    lambda_ = arguments[lambda_index] if len(arguments) > lambda_index else None
    if not _is_lambda(lambda_, name, lambda_index) or (name in MAP_CALLS and numeric_list(arguments[0])):
        return None
    factor = _parameter_copies(lambda_)
    if factor <= 1:
        return None
    grown = replace(place, growth=place.growth * factor)
    if grown.growth > MAX_GROWTH:
        return (
            f"{name}() is refused here: its lambda names its parameter {factor:,.0f} times (outside comparisons and "
            f"arithmetic), making each item that many times longer, and with the calls around it a value "
            f"{grown.growth:,.0f} times longer, past {MAX_GROWTH}, without bound, {_UNSTOPPABLE}. Name the parameter "
            "once, or grow the value fewer times."
        )
    for index in (range(1, len(arguments)) if name == "invoke" else range(min(1, len(arguments)))):
        places[index] = grown
    return None


def _parameter_copies(lambda_: dict[str, Any]) -> float:
    """How many times a lambda's body holds its parameters' values: each time it names one outside a scalar (a
    comparison, arithmetic, a length), times the growing calls around it, and times the items of a map's lambda
    around it (math.inf where unknown). Walked without recursion."""
    parameters = set(_parameters(lambda_))
    copies = 0.0
    stack: list[tuple[Any, float]] = [(lambda_.get("expr"), 1.0)]
    while stack:
        node, factor = stack.pop()
        if isinstance(node, list):
            stack.extend((value, factor) for value in node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("class")
        if kind in SCALAR_CLASSES or (kind == "OPERATOR" and node.get("type") in SCALAR_OPERATORS):
            continue
        if kind == "COLUMN_REF":
            if str((node.get("column_names") or [""])[0]).lower() in parameters:
                copies += factor
            continue
        if kind != "FUNCTION":
            stack.extend((value, factor) for value in node.values())
            continue
        name = str(node.get("function_name", "")).lower()
        if name in SCALAR_CALLS | FILTER_CALLS:  # a filter's list, named, stays at most as long
            if name in FILTER_CALLS:
                stack.extend((argument, factor) for argument in (node.get("arguments") or [])[:1])
            continue
        grows = growth(name, node) or 1.0
        arguments = [argument.get("expression") if isinstance(argument, dict) else None
                     for argument in node.get("arguments") or []]
        texts = set(_texts(name, len(arguments))) if grows > 1 else set()
        inner = 0 if name == "invoke" else 1  # a lambda's values, which grow as many times as it names them
        given = arguments[inner] if name in MAP_CALLS | {"invoke"} and len(arguments) > inner else None
        if _is_lambda(given, name, inner):
            grows, texts = max(1.0, _parameter_copies(given)), set(range(len(arguments))) - {inner}
        for index, argument in enumerate(arguments):
            if _is_lambda(argument, name, index):
                items = list_length(arguments[0]) if name in MAP_CALLS | REDUCE_CALLS and index else 1.0
                stack.append((argument.get("expr"), factor * max(items, 1.0)))
            else:
                stack.append((argument, factor * grows if index in texts else factor))
    return copies


def _parameters(lambda_: dict[str, Any]) -> tuple[str, ...]:
    """A lambda's parameters' names, in lower case."""
    left = lambda_.get("lhs") or {}  # one parameter's COLUMN_REF, or row(...) of several
    references = [left] if left.get("class") != "FUNCTION" else [
        argument.get("expression") or {} for argument in left.get("arguments") or []]
    return tuple(str((reference.get("column_names") or [""])[0]).lower() for reference in references)


def _is_lambda(argument: Any, call: str, index: int) -> TypeGuard[dict[str, Any]]:
    """Whether `argument`, at `index` of a call of `call`, is a lambda: DuckDB parses `x -> y` as one anywhere, and
    reads it as JSON's arrow operator (its left side a value) but where a lambda call takes its lambda. One written
    `lambda x: y` is taken for a lambda wherever it is (DuckDB refuses it where no lambda is taken)."""
    if not isinstance(argument, dict) or argument.get("class") != "LAMBDA":
        return False
    return argument.get("syntax_type") != "SINGLE_ARROW" or (
        call in _LAMBDA_CALLS and index == (0 if call == "invoke" else 1))


def _texts(name: str, count: int) -> range:
    """The arguments (of `count`) whose text a growing call grows: replace's and regexp_replace's first, those
    after concat_ws's separator and after format's format string, all of the others'."""
    if name in ("replace", "regexp_replace"):
        return range(min(1, count))
    return range(1, count) if name in SET_GROWING_CALLS else range(count)


def _lambda_place(call: str, lambda_: dict[str, Any], items: Any, place: _Place) -> _Place:
    """The place of the body of a lambda given to `call`, whose list is `items`."""
    parameters = _parameters(lambda_)
    if call in FILTER_CALLS:  # its body's booleans are built a chunk of items at a time, and not kept
        outer, length = place.repeating(0.0), 1.0
    elif call == "invoke":  # its lambda, called once
        outer, length = place, 1.0
    else:
        outer, length = place.repeating(math.inf), list_length(items) if call in MAP_CALLS | REDUCE_CALLS else math.inf
        length = max(length, 1.0)  # not 0: a product of lengths with an unknown one (inf x 0) would be nan
    scope = _Scope(call, parameters, length, id(lambda_), numeric=call != "invoke" and numeric_list(items))
    return replace(outer, scopes=(*outer.scopes, scope))


def _check_reference(node: dict[str, Any], place: _Place, accumulated: dict[int, float]) -> str | None:
    """A column named inside lambdas: a value from outside one is copied into each item of its result, and a
    reduce's accumulator named again would double with each item."""
    if not place.scopes:
        return None
    names = [str(name).lower() for name in node.get("column_names") or []]
    name = names[0] if names else None  # COLUMNS(...), #1: columns from outside, not named
    bound = next((index for index in range(len(place.scopes) - 1, -1, -1)
                  if name in place.scopes[index].parameters), -1)
    inner = place.scopes[bound + 1:]
    copies = math.prod(scope.items for scope in inner)
    item = bound >= 0 and place.scopes[bound].numeric and name != place.scopes[bound].accumulator
    if copies > MAX_GROWTH and not item:  # a number from a range: as many as the lists copying it, which are counted
        scope = next(scope for scope in inner if scope.items > 1)
        length = "unknown length" if scope.items == math.inf else f"up to {scope.items:,.0f} items"
        return (
            f"{scope.call}() is refused where its lambda names {'.'.join(names) or 'a column'}, a value from outside "
            "it, over a list of "
            f"{length}: each item of its result would hold a copy (at most {MAX_GROWTH} are allowed), without "
            f"bound, {_UNSTOPPABLE}. Use the value outside the lambda, or {_UNNEST}."
        )
    if bound >= 0 and (scope := place.scopes[bound]).accumulator == name:
        accumulated[scope.key] = accumulated.get(scope.key, 0.0) + scope.repeats
        if accumulated[scope.key] > 1:
            return (
                f"{scope.call}() is refused where its lambda repeats its accumulator {name}: named more than once "
                "(outside comparisons), inside a lambda call, or inside a call that grows it (replace(), bin(), "
                f"...), it can double with each item of the list, {_UNSTOPPABLE}. Name it once."
            )
    return None


def _check_literal(node: dict[str, Any], place: _Place, built: dict[str, float],
                   item_literals: dict[int, float]) -> str | None:
    """A literal repeated by the lambdas or growing calls around it counts as often; over a list of unknown length,
    a map may add at most MAX_GROWTH bytes of literals to each item."""
    if not place.scopes and place.growth == 1:
        return None
    size = len(str((node.get("literal") or {}).get("text", "")).encode())
    items = place.items
    if items < math.inf:
        if items * place.growth > 1:
            built["literals"] = built.get("literals", 0.0) + size * items * place.growth
        return None
    return _add_to_items(size, place, item_literals)


def _add_to_items(size: float, place: _Place, item_literals: dict[int, float]) -> str | None:
    """Count `size` bytes of literals (or padding) at a place inside a map over a list of unknown length, as often as
    the growing calls and lambdas inside that map repeat them: at most MAX_GROWTH bytes may go into each item."""
    index = max(index for index, scope in enumerate(place.scopes) if scope.items == math.inf)
    scope = place.scopes[index]
    item_literals[scope.key] = item_literals.get(scope.key, 0.0) + size * place.growth * math.prod(
        inner.items for inner in place.scopes[index + 1:])
    if item_literals[scope.key] <= MAX_GROWTH:
        return None
    return (
        f"{scope.call}() is refused where its lambda, over a list of unknown length, adds "
        f"{item_literals[scope.key]:,.0f} bytes of literals to each item, past {MAX_GROWTH} (the padding of lpad() "
        f"and rpad() counts as literals): its result would grow without bound, {_UNSTOPPABLE}. Map a list built from "
        f"literal counts (range(n)), or {_UNNEST}."
    )



__all__ = ["CallCheck", "check_calls"]

"""The function calls a query over the store may make. DuckDB checks for an interrupt, and counts most memory
against its limit, between chunks of rows, never inside one function call: a call that can run or allocate without
bound on its own is refused before the query runs. `sql_growth.check_calls` asks `built_bytes` and `growth` of each
call in a query's parse tree, and `SqlSandbox` asks `refused_call_in_text` and `refused_syntax_in_text` where it has
only the query's text (a PIVOT without IN list that `sql_pivot` cannot give one).

A value built from a count is bounded twice: each count is a literal of at most COUNT_LIMIT, and `built_bytes`
estimates its size, which the sandbox bounds for all of a query's calls together: DuckDB computes a chunk of 2,048
rows at once, and a value 2,048 times over (repeat('x', 10^6) FROM range(2048): 2 GB) is not counted against its
memory limit either. A call that repeats a value (a lambda over a list, replace with a longer replacement) is as
unbounded: the tables of those calls are here (MAP_CALLS, GROWING_CALLS, SET_GROWING_CALLS, MAX_GROWTH), and
`sql_growth` bounds how many times they repeat what they build.
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
#: range(...)) range and generate_series produce rows chunk by chunk, and stop like any scan. json_pretty indents
#: each nesting level on a line of its own (4,000 characters of brackets: 16 MB), and json_serialize_sql writes
#: hundreds of bytes for each token of its text (2 KB of SQL: 500 KB).
UNBOUNDED_CALLS = frozenset(
    {"levenshtein", "editdist3", "damerau_levenshtein", "jaro_similarity", "jaro_winkler_similarity", "json_pretty",
     "json_serialize_sql"}
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
#: Calls that pad their text (their first argument) with their fill (their third) to their count of characters, or
#: cut it there: they add at most count characters of their fill to it, however long it is.
PADDING_CALLS = frozenset({"lpad", "rpad"})
#: DuckDB's own table macros that build lists from a count, each with that count's name and place: histogram_values
#: and histogram expand to quantile over list_apply(generate_series(1, bin_count), ...) and equi_width_bins(...,
#: bin_count), calls the parse tree does not show (it holds only the macro's name). bin_count 2 * 10^7 took 11 s and
#: 4.9 GB past a 1 s and 256 MB limit; equi-height bins take time quadratic in their count (10^5: 0.75 s, 10^6: 57 s).
COUNTED_MACROS: dict[str, tuple[str, int]] = {"histogram_values": ("bin_count", 2), "histogram": ("bin_count", 2)}
#: The largest count a COUNTED_MACROS call may hold: far more bins than a histogram is read with (equi-height bins
#: pick a quantile of the column for each bin: 0.05 s for 10,000 of 10 rows, more over more rows).
MACRO_COUNT_LIMIT = 1_000
#: Calls whose format string (their first argument) sets widths and precisions, each padded with characters of up
#: to 4 bytes: format('{:>1000000000}', 'x') took 2.5 s and 600 MB past a 1 s and 64 MB limit. The format string
#: must be a literal, each width and precision in it a number (not an argument's: printf('%*s', n, 'x')).
FORMAT_CALLS = frozenset({"format", "printf"})
#: The largest count a COUNTED_CALLS call, or a width or precision a FORMAT_CALLS call, may hold.
COUNT_LIMIT = 1_000_000
#: Calls whose lambda (their second argument) runs once for each item of the list they are given first. A map's
#: result, and a reduce's accumulator, hold a value for each item; a filter's holds only items of its list, and its
#: lambda's values (booleans) are built a chunk of items at a time, as a row's are. A list comprehension is maps
#: around a filter.
MAP_CALLS = frozenset({"list_transform", "list_apply", "apply", "array_transform", "array_apply"})
REDUCE_CALLS = frozenset({"list_reduce", "array_reduce", "reduce"})
FILTER_CALLS = frozenset({"list_filter", "array_filter", "filter"})
#: Calls whose text can come out longer than it went in, at most this many times (bytes): bin writes 8 digits a
#: byte, to_json \u0001 for a control character; nested, bin(bin(...)) nine deep made 950 MB of 'abc'.
GROWING_CALLS: dict[str, float] = {
    "bin": 8, "to_binary": 8, "hex": 2, "to_hex": 2, "to_base64": 4, "base64": 4, "url_encode": 3,
    "regexp_escape": 2, "to_json": 8, "json_quote": 8, "array_to_json": 8, "row_to_json": 8,
}
#: Calls whose factor of growth their literal arguments set (`growth`): replace by its replacement's length over
#: its pattern's, regexp_replace by its replacement's (with the 'g' option an empty match is replaced too, at each
#: of the text's n + 1 places), concat_ws by its separator's (put between the items of a list it is given: a literal,
#: or a constant text of literals and chr() joined by || or concat(), `_constant_bytes`), and
#: format and printf by their fields where these name their arguments by position ('{0}{0}', '%1$s%1$s').
SET_GROWING_CALLS = frozenset({"replace", "regexp_replace", "concat_ws"}) | FORMAT_CALLS
#: The most times a value whose size is unknown (a column's) may be repeated, or grown by the calls around it: a
#: lambda's list length where its body names that value from outside it, the product of growing calls' factors.
#: Over a list of unknown length, also the most bytes of literals a map's body may add to each item.
MAX_GROWTH = 16
#: The functions refused whatever their arguments.
_REFUSED_CALLS = UNBOUNDED_CALLS | QUERY_CALLS
#: The functions refused by name, whatever their arguments, in a PIVOT without IN list (`sql_pivot`), and anywhere
#: in a query checked by its text only.
REFUSED_BY_NAME = _REFUSED_CALLS | set(COUNTED_CALLS) | SET_GROWING_CALLS | MAP_CALLS | REDUCE_CALLS
#: The functions refused by name, whatever their arguments, in a query checked by its text only: those refused in a
#: PIVOT without IN list, and the calls that grow their text by a factor (bin(bin(...)) nine deep: 950 MB), whose
#: nesting only a parse tree shows, and the table macros whose counts only a parse tree tells (the histogram
#: aggregate too). Lambdas and list comprehensions are refused there too (`refused_syntax_in_text`).
REFUSED_IN_TEXT = REFUSED_BY_NAME | set(GROWING_CALLS) | set(COUNTED_MACROS)
#: Calls that keep a list's length (at most), for the length of a lambda's list.
_SAME_LENGTH = MAP_CALLS | FILTER_CALLS | {
    "list_sort", "array_sort", "list_reverse_sort", "array_reverse_sort", "list_distinct", "array_distinct",
    "list_reverse", "array_reverse", "list_slice", "array_slice"}
#: Nodes whose value is a boolean or a number, whatever the values below them: these are built a chunk of items at
#: a time, as a row's are, and held in no lambda's result (list_sum(list_transform(range(300), ...)) keeps a number).
SCALAR_CLASSES = frozenset({"COMPARISON", "CONJUNCTION", "BETWEEN"})
SCALAR_OPERATORS = frozenset(
    {"COMPARE_IN", "COMPARE_NOT_IN", "OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL"}
)
SCALAR_CALLS = frozenset({
    "~~", "!~~", "~~*", "!~~*", "~~~", "!~~~", "regexp_matches", "regexp_full_match", "contains", "starts_with",
    "ends_with", "prefix", "suffix", "list_contains", "list_has", "array_contains", "array_has", "list_has_any",
    "list_has_all", "len", "length", "array_length", "strlen", "octet_length", "bit_length", "list_sum", "array_sum",
    "list_product", "array_product", "list_avg", "array_avg", "list_count", "array_count",
    # arithmetic and numeric functions: a number (or a date or time) of fixed size, whatever its operands
    "+", "-", "*", "/", "//", "%", "^", "**", "abs", "round", "sqrt", "cbrt", "ln", "log", "log2", "log10", "exp",
    "pow", "power", "floor", "ceil", "ceiling", "sign", "trunc", "even", "factorial", "degrees", "radians"})
#: The bytes of a character in UTF-8, by the code points below which it takes them.
_UTF8_WIDTHS = ((1, 0x80), (2, 0x800), (3, 0x10000))
#: A backreference in a regexp_replace replacement (\0 to \9), or an escaped backslash.
_BACKREFERENCE = re.compile(r"\\([0-9\\])")
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
    if table_function and name in COUNTED_MACROS:  # built once for the query, but in one call
        return 0.0 if _macro_count_bounded(name, call) else None
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


def _macro_count_bounded(name: str, call: dict[str, Any]) -> bool:
    """Whether a COUNTED_MACROS call's count, given by name or at its place (or left to its default), is a literal of
    at most MACRO_COUNT_LIMIT."""
    counted, place = COUNTED_MACROS[name]
    arguments = [argument for argument in call.get("arguments") or [] if isinstance(argument, dict)]
    given = [argument for index, argument in enumerate(arguments)
             if argument.get("name") == counted or (index == place and not argument.get("name"))]
    counts = [_number(_literal(argument)) for argument in given]
    return all(count is not None and abs(count) <= MACRO_COUNT_LIMIT for count in counts)


def padding(name: str, call: dict[str, Any]) -> float | None:
    """The most bytes a call of lpad or rpad (PADDING_CALLS) adds to its text: its count times the widest character
    of its fill (4 bytes where the fill is no literal); None for any other call, or a count that is no literal."""
    literals = [_literal(argument) for argument in call.get("arguments") or []]
    count = _number(literals[1]) if name in PADDING_CALLS and len(literals) > 1 else None
    if count is None or math.isnan(count):
        return None
    fill = literals[2] if len(literals) > 2 else None
    widest = 4 if fill is None else max((len(char.encode()) for char in fill), default=0)
    return math.ceil(abs(count)) * widest


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
    """The first function of REFUSED_IN_TEXT that `text` calls, or None. Found with DuckDB's own tokenizer, as a
    name (quoted or not) before an opening parenthesis with only comments between, so that neither
    `"levenshtein"(` nor `levenshtein/**/(` hides a call, and a name inside a string is none."""
    for (word, kind), (following, _) in itertools.pairwise(_words(text)):
        if kind in (duckdb.token_type.identifier, duckdb.token_type.keyword) and following.startswith("("):
            name = (word[1:-1].replace('""', '"') if word.startswith('"') else word).lower()
            if name in REFUSED_IN_TEXT:
                return name
    return None


def refused_syntax_in_text(text: str) -> str | None:
    """What `text` writes that repeats a value without naming a function, which only a parse tree could bound: a
    lambda (`lambda x: x || x`, nested, doubles its value at each level) or a list comprehension (`[s || s for x in
    l]` copies s into each item of l), at any depth; None where it writes neither."""
    opened: list[str] = []
    for word, kind in _words(text):
        if kind == duckdb.token_type.keyword and word.upper() == "LAMBDA":
            return "a lambda (lambda x: ...)"
        if kind == duckdb.token_type.keyword and word.upper() == "FOR" and opened[-1:] == ["["]:
            return "a list comprehension ([... FOR x IN l])"
        if kind == duckdb.token_type.operator:
            for char in word:
                if char in "([{":
                    opened.append(char)
                elif char in ")]}" and opened:
                    opened.pop()
    return None


def _words(text: str) -> list[tuple[str, duckdb.token_type]]:
    """`text`'s tokens as DuckDB's tokenizer reads them, comments left out: each one's text and kind."""
    tokens = duckdb.tokenize(text)
    ends = [start for start, _ in tokens[1:]] + [len(text)]
    return [(text[start:end].strip(), kind) for (start, kind), end in zip(tokens, ends, strict=True)
            if kind != duckdb.token_type.comment]


def refusal(call: str) -> str:
    """Why a call of `call` is refused, and what to do instead."""
    if call in QUERY_CALLS:
        return (
            f"{call}() is refused: the query it is given would run unchecked by the sandbox (on a connection of its "
            "own, for some: past the time limit). Write that query itself."
        )
    if call in SET_GROWING_CALLS - FORMAT_CALLS:
        allowed = {
            "replace": f"its replacement is a literal at most {MAX_GROWTH} times as long as its pattern",
            "regexp_replace": (f"its replacement is a literal (and its options): with the 'g' option of at most "
                               f"{MAX_GROWTH - 1} bytes, as an empty match is replaced too; without it, with at most "
                               f"{MAX_GROWTH - 1} backreferences (\\0 to \\9)"),
            "concat_ws": (f"its separator is a literal of at most {MAX_GROWTH - 1} bytes, or a constant text of "
                          "that size made of literals and chr() by || or concat() (chr(9), '|' || ','): it goes "
                          "between the items of a list it is given too"),
        }[call]
        return (
            f"{call}() is refused unless {allowed}: one call of it can make its text that many times longer, without "
            "bound, past the query's time and memory limits (which DuckDB checks between chunks of rows)."
        )
    if call in MAP_CALLS | REDUCE_CALLS:
        return (
            f"{call}() is refused unless its call is checked: its lambda's body runs once for each item of its list, "
            "which can repeat a value without bound, past the query's time and memory limits (which DuckDB checks "
            "between chunks of rows)."
        )
    if call in COUNTED_MACROS:
        return (
            f"{call}() is refused unless its {COUNTED_MACROS[call][0]} is a literal of at most {MACRO_COUNT_LIMIT:,}: "
            "it builds its bins from that count in one call, which can run and allocate without bound, past the "
            "query's time and memory limits (which DuckDB checks between chunks of rows)."
        )
    if call in GROWING_CALLS:
        return (
            f"{call}() is refused: it makes its text up to {GROWING_CALLS[call]:g} times longer, and calls of it "
            "nested in each other multiply that without bound, past the query's time and memory limits (which DuckDB "
            "checks between chunks of rows)."
        )
    if call in FORMAT_CALLS:
        allowed = (f" unless its format string is a literal whose widths and precisions are numbers of at most "
                   f"{COUNT_LIMIT:,} (and with at most {MAX_GROWTH} fields where they name arguments by position)")
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


def growth(name: str, call: dict[str, Any]) -> float | None:
    """How many times longer than its text one call of `name` may make it (GROWING_CALLS, SET_GROWING_CALLS), in
    bytes; None where its literal arguments do not bound that."""
    if name in GROWING_CALLS:
        return GROWING_CALLS[name]
    if name not in SET_GROWING_CALLS:
        return 1.0
    literals = [_literal(argument) for argument in call.get("arguments") or []]
    if name in FORMAT_CALLS:
        return float(max(1, _positional_fields(name, literals[0]))) if literals and literals[0] is not None else None
    if name == "concat_ws":
        first = (call.get("arguments") or [None])[0]
        separator = _constant_bytes(first.get("expression")) if isinstance(first, dict) else None
        return 1.0 + separator if separator is not None else None
    if len(literals) < 3 or literals[2] is None:
        return None
    replacement = literals[2]
    if name == "replace":  # an empty pattern replaces nothing; any other is at least one byte
        pattern = 1 if literals[1] is None else len(literals[1].encode())
        return 1.0 if pattern == 0 else float(max(1, math.ceil(len(replacement.encode()) / pattern)))
    options = literals[3] if len(literals) > 3 else ""
    if options is None or "g" in options:  # each byte of the replacement at each of the n + 1 places it may go
        return 1.0 + len(replacement.encode())
    return 1.0 + sum(1 for match in _BACKREFERENCE.finditer(replacement) if match.group(1) != "\\")


def _constant_bytes(expression: Any) -> float | None:
    """The most bytes of a constant text: a literal, chr() of a literal (one character, of 1 to 4 bytes), or texts
    of these joined by || or concat(); None for any other expression (a column, repeat(), a cast)."""
    size, stack = 0.0, [expression]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            return None
        arguments = [argument.get("expression") if isinstance(argument, dict) else None
                     for argument in node.get("arguments") or []]
        name = str(node.get("function_name", "")).lower() if node.get("class") == "FUNCTION" else None
        if node.get("class") == "CONSTANT":
            size += len(str((node.get("literal") or {}).get("text", "")).encode())
        elif name == "chr" and len(arguments) == 1 and arguments[0] and arguments[0].get("class") == "CONSTANT":
            code = _number(_literal({"expression": arguments[0]}))  # its character's UTF-8 bytes, or the most
            size += next((width for width, below in _UTF8_WIDTHS if code is not None and 0 <= code < below), 4)
        elif name in ("||", "concat"):
            stack.extend(arguments)
        else:
            return None
    return size


def _positional_fields(name: str, text: str) -> int:
    """The fields of a format string where they name arguments by position ('{0}', '%1$s'), each of which may
    repeat one; 0 where they take the arguments in turn."""
    if name == "printf":
        conversions = [match.group(0) for match in _PRINTF_SPEC.finditer(text) if match.group(0) != "%%"]
        return len(conversions) if any("$" in conversion for conversion in conversions) else 0
    fields = [match.group(1) for match in _FORMAT_FIELD.finditer(text) if match.group(1) is not None]
    return len(fields) if any(field.split(":", 1)[0].strip() for field in fields) else 0


def list_length(expression: Any) -> float:
    """The most items a list expression holds: a range or generate_series of literal counts, a list written out
    ([a, b]), a list_resize to a literal count, or a list mapped, filtered, sorted or concatenated from those;
    math.inf where unknown (a column's)."""
    try:
        length = _length(expression)
    except RecursionError:
        return math.inf
    return length if length >= 0 else math.inf  # a count of 'nan' too


def numeric_list(expression: Any) -> bool:
    """Whether a list expression holds numbers only: a range or generate_series, or a list filtered, sorted or
    sliced from one (its items are 8 bytes each, however many times a lambda copies them)."""
    while isinstance(expression, dict):
        if expression.get("class") == "CAST":
            expression = expression.get("child")
            continue
        name = str(expression.get("function_name", "")).lower() if expression.get("class") == "FUNCTION" else ""
        if name in ("range", "generate_series"):
            return True
        arguments = expression.get("arguments") or []
        if name not in _SAME_LENGTH - MAP_CALLS or not arguments or not isinstance(arguments[0], dict):
            return False
        expression = arguments[0].get("expression")
    return False


def _length(expression: Any) -> float:
    if not isinstance(expression, dict):
        return math.inf
    if expression.get("class") == "CAST":
        return _length(expression.get("child"))
    if expression.get("class") != "FUNCTION":
        return math.inf
    name = str(expression.get("function_name", "")).lower()
    arguments = expression.get("arguments") or []
    if name in ("range", "generate_series"):
        numbers = [_number(_literal(argument)) for argument in arguments]
        return _span([number for number in numbers if number is not None]) if None not in numbers else math.inf
    if name in ("list_value", "list_pack", "array_value"):
        return float(len(arguments))
    if name in ("list_resize", "array_resize"):
        count = _number(_literal(arguments[1])) if len(arguments) > 1 else None
        return abs(count) if count is not None else math.inf
    expressions = [argument.get("expression") if isinstance(argument, dict) else None for argument in arguments]
    if name in _SAME_LENGTH and expressions:
        return _length(expressions[0])
    if name in ("list_concat", "array_concat", "list_cat", "array_cat", "||"):
        return sum(_length(argument) for argument in expressions)
    return math.inf


__all__ = ["COUNTED_CALLS", "COUNTED_MACROS", "COUNT_LIMIT", "FILTER_CALLS", "FORMAT_CALLS", "GROWING_CALLS",
           "MACRO_COUNT_LIMIT", "MAP_CALLS", "MAX_GROWTH", "PADDING_CALLS", "QUERY_CALLS", "REDUCE_CALLS",
           "REFUSED_BY_NAME", "REFUSED_IN_TEXT", "SCALAR_CALLS", "SCALAR_CLASSES", "SCALAR_OPERATORS",
           "SET_GROWING_CALLS", "UNBOUNDED_CALLS", "built_bytes", "growth", "list_length", "numeric_list", "padding",
           "refusal", "refused_call_in_text", "refused_syntax_in_text"]

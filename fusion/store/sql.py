"""Read-only, sandboxed SQL over the store with DuckDB.

The store's tables are registered as Arrow datasets read through the Delta log (scanned lazily, with DuckDB's
filters and projections pushed into the scan; a table holding string_view files, which Delta merges write, is
registered with string_view text and scanned whole, see Store.dataset); then DuckDB's file system,
extensions and configuration are locked. A query can read only those tables: no other file, no COPY,
ATTACH, INSTALL or LOAD, no SET, no writes. Only one query is accepted: SELECT in any of its forms (WITH,
FROM-first, VALUES, TABLE, set operations), PIVOT and UNPIVOT, SUMMARIZE, DESCRIBE and SHOW; nothing that writes,
not even in a WITH clause. Each query runs under `SqlLimits`: a timer interrupts it past its time limit, and its
result is read batch by batch and stopped past its row or size limit, before it is held whole.

What the limits cannot stop: DuckDB checks for an interrupt, and counts most memory against its limit, between
chunks of rows, never inside one function call. The calls that can run or allocate without bound on their own
(quadratic string distances; lists and strings built from a count, but for small literal arguments) are refused,
as are the functions that run a query given as a string, which would escape these checks and, some, the time limit
(`fusion.store.sql_calls`), and the calls that would repeat a value without bound: a lambda's body counts once for
each item of its list, a replace may lengthen its text at most a few times (`fusion.store.sql_growth`; in a PIVOT
without an IN list, whose ON values name its columns, these calls are refused by name, `fusion.store.sql_pivot`). A
query can still build a huge value step by step through columns (a string doubled in each of thirty WITH clauses),
which outruns both limits. The sandbox keeps a query to the store's tables; to bound what an
untrusted query may cost the machine, run it in a process of its own under an OS memory limit (ulimit -v, a
container).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from fusion.config.sql_limits import SqlLimits
from fusion.errors import SqlError, SqlLimitExceeded, SqlRefused, StoreUnreadable
from fusion.store.delta import Store
from fusion.store.sql_calls import (
    QUERY_CALLS,
    UNBOUNDED_CALLS,
    refusal,
    refused_call_in_text,
    refused_syntax_in_text,
)
from fusion.store.sql_growth import check_calls
from fusion.store.sql_pivot import PivotTwin, pivot_twin, refused_in_pivots, twin_read_as_query
from schemas.tables import TABLE_SCHEMAS

_SANDBOX_HINT = (
    "Fusion's SQL is read-only and sandboxed: it reads only the store's tables "
    f"({', '.join(sorted(TABLE_SCHEMAS))}); files, COPY, ATTACH, INSTALL/LOAD and settings are not available"
)
#: Rows per Arrow batch read from DuckDB: the granularity of the result limits and of streamed output. A batch is
#: whole before its size is checked, so it is kept to DuckDB's own chunk of 2,048 rows (65,536 rows of 60 KB values
#: made 3.9 GB before a 256 MB limit could stop them). What one chunk can hold is bounded too: the values a query's
#: calls build from counts, BATCH_ROWS rows of them on each thread, must fit its memory limit (`_row_budget`).
BATCH_ROWS = 2_048

#: The words a query may start with (DuckDB files them all as SELECT statements, a PIVOT without IN list as MULTI).
_QUERY_WORDS = frozenset(
    {"SELECT", "WITH", "FROM", "VALUES", "TABLE", "PIVOT", "UNPIVOT", "PIVOT_WIDER", "PIVOT_LONGER", "SUMMARIZE",
     "DESCRIBE", "SHOW"}
)
#: Statements a refusal names by two words.
_TWO_WORDS = frozenset(
    {("UPDATE", "EXTENSIONS"), ("SET", "VARIABLE"), ("RESET", "VARIABLE"), ("EXPORT", "DATABASE"),
     ("IMPORT", "DATABASE"), ("START", "TRANSACTION"), ("EXPLAIN", "ANALYZE"), ("FORCE", "INSTALL"),
     ("FORCE", "CHECKPOINT")}
)
#: The first two words of a statement, after comments and opening parentheses (possessive: no backtracking).
_LEADING = re.compile(r"(?:\s|--[^\n]*+|/\*.*?\*/|\()*+([A-Za-z_]+)(?:\s++([A-Za-z_]+))?", re.DOTALL)
#: What makes a query read tables it does not name as words: the catalog, or a table function given table names.
_CATALOG = re.compile(r"(?i)\b(?:show|information_schema|duckdb_\w+|pragma_\w+|sqlite_master|pg_catalog|"
                      r"query_table)\b")
#: Query nodes (in DuckDB's JSON form of a parsed SELECT) of a statement that writes, in a WITH clause.
_WRITING_NODES = {"INSERT_QUERY_NODE": "INSERT", "UPDATE_QUERY_NODE": "UPDATE", "DELETE_QUERY_NODE": "DELETE",
                  "MERGE_INTO_QUERY_NODE": "MERGE INTO"}
#: The longest query text checked, in UTF-8 bytes. The check serialises the query's parse tree before its time limit
#: starts, and the tree is about 50 times the text (a 1.2 MB `SELECT 1, 1, ...` made 58 MB of JSON in 7 s at a 2.1 GB
#: peak): a longer text is refused before it is parsed.
MAX_QUERY_BYTES = 256 * 1024
#: The most PIVOT / UNPIVOT words a query's text may hold. DuckDB's parser takes time that grows much faster than the
#: text with nested PIVOTs, before any time limit starts (300 levels, 8 KB: 0.4 s; 1,000 levels, 26 KB: 9.5 s;
#: 3,000 levels: 87 s), so a query with more is refused before it is parsed. The word is counted wherever it stands
#: (a literal or a column named so counts too), in each of its spellings (PIVOT_WIDER and PIVOT_LONGER nest as
#: slowly: 1,500 levels, 62 KB, took 42 s and 5 GB): a query holding this many is no analyst's.
MAX_PIVOTS = 32
_PIVOT_WORD = re.compile(r"(?i)\b(?:un)?pivot(?:_wider|_longer)?\b")
#: How long `SqlSandbox.close` waits for a query running in another thread to stop once interrupted.
CLOSE_WAIT_S = 5.0


class SqlSandbox:
    """One DuckDB connection over a store snapshot; create one per session (not thread-safe)."""

    def __init__(
        self,
        store: Store | str | Path,
        *,
        limits: SqlLimits | None = None,
        threads: int | None = None,
        memory_limit: str | None = None,
        versions: Mapping[str, int | None] | None = None,
    ) -> None:
        """`threads` and `memory_limit`, when given, replace those of `limits` (default: SqlLimits()). `versions`
        gives tables' Delta versions, as `snapshot` holds them: None for a table that did not exist, read as empty."""
        self.store = store if isinstance(store, Store) else Store(store)
        self.limits = (limits or SqlLimits()).replace(threads=threads, memory_limit=memory_limit)
        given = versions or {}
        unknown = sorted(set(given) - set(TABLE_SCHEMAS))
        if unknown:
            raise SqlError(f"versions name tables the store does not have: {unknown} (it has {sorted(TABLE_SCHEMAS)})")
        self._con = duckdb.connect(":memory:")
        # The snapshot this session reads: each table's version now. A table is registered when a query first
        # names it (a query reading one table opens no other; `SELECT 1` not even Arrow's dataset module), those
        # given a version here at once, so that a version that does not exist is refused now.
        self._unregistered: dict[str, int | None] = {}
        for name in TABLE_SCHEMAS:
            if (version := given.get(name)) is not None:
                self._register(name, version)
            else:  # None, given or now: the table did not exist, and reads as empty whatever is written later
                self._unregistered[name] = None if name in given else self.store.version(name)
        #: The version of each table this session reads (None: the table did not exist yet; it reads as empty).
        self.snapshot: dict[str, int | None] = {
            name: given.get(name, self._unregistered.get(name)) for name in TABLE_SCHEMAS
        }
        self._con.execute(f"SET threads = {int(self.limits.threads)}")
        self._con.execute(f"SET memory_limit = '{self.limits.memory_bytes}B'")
        self._con.execute("SET TimeZone = 'UTC'")
        # DuckDB draws a progress bar on stdout for a query past 2 s: inside `--format csv` output, a corrupt line.
        self._con.execute("SET enable_progress_bar = false")
        self._con.execute("SET temp_directory = ''")  # a query may not spill to (and fill) the disk
        self._con.execute("SET max_temp_directory_size = '0B'")
        # Settings a query may read (duckdb_settings(), current_setting()) would name the user's home and paths.
        for setting in ("secret_directory", "extension_directory", "home_directory"):
            self._con.execute(f"SET {setting} = ''")
        self._con.execute("SET allow_persistent_secrets = false")
        self._con.execute("SET autoinstall_known_extensions = false")
        self._con.execute("SET autoload_known_extensions = false")
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    def query(self, sql: str) -> pa.Table:
        """Run one query and return its result as an Arrow table; anything else raises SqlRefused, a query past
        a limit SqlLimitExceeded."""
        with self.stream(sql) as reader:
            return reader.read_all()

    @contextmanager
    def stream(self, sql: str) -> Iterator[pa.RecordBatchReader]:
        """Run one query and hand its result over batch by batch, as DuckDB produces it (a large result is
        never held whole). The limits hold while the block runs: read the batches inside it."""
        pivoted = self._check(sql)
        for name in _tables_named(sql, self._unregistered):
            version = self._unregistered.pop(name)
            self._register(name, version, empty=version is None)
        try:
            with _Deadline(self._con, self.limits.timeout_s) as deadline:
                try:
                    reader = self._con.sql(sql).to_arrow_reader(BATCH_ROWS)
                except duckdb.Error as exc:
                    raise self._failure(exc, deadline) from None
                try:
                    yield pa.RecordBatchReader.from_batches(reader.schema, self._limited(reader, deadline))
                finally:
                    reader.close()  # a result left unread would hold the connection
        finally:
            if pivoted:
                self._drop_pivot_types()

    def _drop_pivot_types(self) -> None:
        """Drop the ENUM types a PIVOT without IN list left in the session's catalog: DuckDB creates one holding the
        PIVOT's distinct ON values for each such query and never drops it (20 queries of 10 ON values of 3.2 MB held
        750 MB more, until the session's queries failed for lack of memory)."""
        try:
            types = self._con.execute(
                "SELECT database_name, schema_name, type_name FROM duckdb_types() "
                "WHERE starts_with(type_name, '__pivot_enum_')"
            ).fetchall()
            for names in types:
                self._con.execute("DROP TYPE IF EXISTS " + ".".join(_quoted(name) for name in names))
        except duckdb.ConnectionException:  # closed from another thread (`close`): its catalog is gone with it
            return

    def _register(self, name: str, version: int | None, *, empty: bool = False) -> None:
        """Register a table at `version` (None: the latest), or `empty` (it did not exist when the session
        opened, and what is written later is not this session's snapshot)."""
        try:
            rows = TABLE_SCHEMAS[name].empty_table() if empty else self.store.dataset(name, version=version,
                                                                                        string_view=None)
        except (OSError, pa.ArrowException) as exc:  # a data file's footer missing or damaged
            raise self._unreadable(name, f"{type(exc).__name__}: {exc}") from None
        self._con.register(name, rows)

    def _limited(self, reader: pa.RecordBatchReader, deadline: _Deadline) -> Iterator[pa.RecordBatch]:
        """`reader`'s batches, stopped past a limit. Past the time limit, even a result DuckDB finished without
        error is refused: work its interrupt does not reach (a connection of its own) may have finished it. The
        result's size counts its schema (column names, which a PIVOT takes from the data: 32 MB of them in one row
        passed a 1 MB limit) with its batches."""
        limits = self.limits
        rows = 0
        size = reader.schema.serialize().size
        if size > limits.max_bytes:
            raise self._past_size_limit(" (its column names alone are larger: PIVOT on shorter values, or name them)")
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                if deadline.fired:
                    raise self._past_time_limit() from None
                return
            except (OSError, pa.ArrowException, duckdb.Error) as exc:  # DuckDB's errors while it streams
                raise self._failure(exc, deadline) from None
            if deadline.fired:
                raise self._past_time_limit()
            rows += batch.num_rows
            size += batch.nbytes
            if rows > limits.max_rows:
                raise SqlLimitExceeded(
                    f"the query returns more than {limits.max_rows:,} rows, its limit: aggregate, filter or LIMIT "
                    "it, or raise the limit (`fusion sql --max-rows`, or max_rows in the config's [sql] block)"
                )
            if size > limits.max_bytes:
                raise self._past_size_limit()
            yield batch

    def _past_size_limit(self, why: str = "") -> SqlLimitExceeded:
        limits = self.limits
        return SqlLimitExceeded(
            f"the query's result is larger than {limits.max_size} ({limits.max_bytes:,} bytes in Arrow form), its "
            f"limit{why}: select fewer columns or rows, or raise the limit (`fusion sql --max-size`, or max_size in "
            "the config's [sql] block)"
        )

    def _failure(self, exc: Exception, deadline: _Deadline) -> Exception:
        """The project error for a DuckDB error."""
        text = _without_home(str(exc))
        if deadline.fired:
            return self._past_time_limit()
        if isinstance(exc, duckdb.PermissionException) or text.startswith("Permission Error"):
            return SqlRefused(f"{text}. {_SANDBOX_HINT}")
        if "configuration has been locked" in text:
            return SqlRefused(f"{text}. {_SANDBOX_HINT}")
        if (read := _READ_FAILED.search(text)) is not None:
            return self._unreadable(read.group(1), read.group(2))
        if "Deprecated lambda arrow" in text:  # DuckDB's advice, SET lambda_syntax, is no setting a query may change
            return SqlError(
                "SQL error: DuckDB no longer takes a lambda written x -> ...: write lambda x: ... instead "
                "(list_transform(l, lambda x: upper(x)); lambda acc, x: ... for several parameters). "
                f"{_SANDBOX_HINT}"
            )
        return SqlError(f"SQL error: {text}")

    def _unreadable(self, table: str, reason: str) -> StoreUnreadable:
        """The error for a table whose files could not be read, naming no path (the store's place on disk is not
        a reader's to know)."""
        reason = re.sub(r"'?(?:file://)?/[^\s']*'?", "<file>", reason.strip().splitlines()[0] if reason.strip() else "")
        return StoreUnreadable(
            f"the store's table {table} cannot be read: a data file is damaged, missing or was rewritten outside "
            f"Delta ({reason}); `fusion verify` says whether the releases are still what was published"
        )

    def _past_time_limit(self) -> SqlLimitExceeded:
        return SqlLimitExceeded(
            f"the query ran past its time limit of {self.limits.timeout} and was stopped: narrow it (a WHERE, "
            "a LIMIT, fewer joins) or raise the limit (`fusion sql --timeout`, or timeout in the config's [sql] "
            "block)"
        )

    def _check(self, sql: str) -> bool:
        """Refuses `sql` unless it is exactly one query, naming the statement refused; whether it is a PIVOT without
        IN list (which DuckDB runs as several statements, the first creating an ENUM type)."""
        if len(sql) > MAX_QUERY_BYTES // 4 and len(sql.encode()) > MAX_QUERY_BYTES:
            raise SqlRefused(
                f"the query's text is {len(sql.encode()):,} bytes, past the {MAX_QUERY_BYTES:,} a query may have: "
                f"shorten it (a long IN list is shorter as a join or a range). {_SANDBOX_HINT}"
            )
        if len(_PIVOT_WORD.findall(sql)) > MAX_PIVOTS:
            raise SqlRefused(
                f"the query names PIVOT or UNPIVOT (or PIVOT_WIDER, PIVOT_LONGER) more than {MAX_PIVOTS} times, which "
                f"takes the parser far longer than any query's time limit: pivot fewer times (one PIVOT can take "
                f"several ON columns and USING aggregates). {_SANDBOX_HINT}"
            )
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlError(f"SQL error: {exc}") from None
        if len(statements) != 1:
            raise SqlRefused(f"expected exactly one SQL statement, got {len(statements)}. {_SANDBOX_HINT}")
        text = statements[0].query
        try:
            kind: duckdb.StatementType | None = statements[0].type
        except ValueError:  # a statement type this DuckDB client cannot name (UPDATE EXTENSIONS): never a query
            kind = None
        if kind is duckdb.StatementType.SELECT:
            self._check_calls(text, self._parse(text))
            return False
        # DuckDB runs a PIVOT without an IN list as several statements: first one creating an ENUM type of the
        # pivoted values, then the query. Its text must then be a query, one that parses as a subquery; its calls
        # are checked on the parse tree of a twin of it that DuckDB can serialise (sql_pivot), or, where there is
        # none, by its text.
        if kind is duckdb.StatementType.MULTI and self._is_query(text):
            twin = pivot_twin(text)
            tree = self._parse(twin.text) if twin is not None else None
            self._check_calls(text, tree if twin is not None and twin_read_as_query(tree, twin) else None, twin)
            return True
        raise SqlRefused(f"{_refused(text, kind)}. {_SANDBOX_HINT}")

    def _check_calls(self, text: str, tree: dict[str, Any] | None, twin: PivotTwin | None = None) -> None:
        """Refuses a query that writes in a WITH clause, makes a call refused (see sql_calls; in a PIVOT without an
        IN list, where `tree` is that of its `twin`, see sql_pivot), or builds more from counts in a row than its row
        budget: checked on its parse tree, or where there is none, by its text."""
        if tree is None:  # a statement DuckDB does not serialise (or no JSON extension): by its text
            if refused := _refused_by_text(text):
                raise SqlRefused(f"{refused} {_SANDBOX_HINT}")
            return
        writes, refused, built = _inspect(tree)
        if writes:
            raise SqlRefused(f"{writes} statements are refused, in a WITH clause too. {_SANDBOX_HINT}")
        if refused:
            raise SqlRefused(f"{refused} {_SANDBOX_HINT}")
        if twin is not None and (call := refused_in_pivots(tree, twin)):
            raise SqlRefused(
                f"{refusal(call)} In a PIVOT without an IN list (its source, ON, USING and GROUP BY, and the WITH "
                f"queries its source reads) {call}() is refused whatever its arguments: a PIVOT is checked in full "
                f"with an IN list (PIVOT ... ON k IN ('a', 'b')). {_SANDBOX_HINT}"
            )
        if not sum(built.values()) <= self._row_budget:  # nan (a count of 'nan') too
            raise SqlRefused(self._past_row_budget(built))

    def _is_query(self, text: str) -> bool:
        """Whether `text` (one statement) parses as a subquery: a query, never a statement that writes."""
        inner = re.sub(r"[\s;]+$", "", text)
        try:
            wrapped = self._con.extract_statements(f"SELECT * FROM (\n{inner}\n)")
            kinds = [statement.type for statement in wrapped]
        except (duckdb.Error, ValueError):
            return False
        return len(kinds) == 1 and kinds[0] in (duckdb.StatementType.SELECT, duckdb.StatementType.MULTI)

    def _parse(self, text: str) -> dict[str, Any] | None:
        """DuckDB's JSON form of the parsed query, None where DuckDB gives none (a statement it does not serialise,
        no JSON extension in this build)."""
        try:
            rows = self._con.execute("SELECT json_serialize_sql(?::VARCHAR)", [text]).fetchall()
        except duckdb.Error:  # no JSON extension in this build: the binder still refuses a write
            return None
        try:
            tree = json.loads(rows[0][0])
        except RecursionError:
            raise SqlRefused(f"the query is nested too deeply to be checked: flatten it. {_SANDBOX_HINT}") from None
        return tree if isinstance(tree, dict) and not tree.get("error") else None

    @property
    def _row_budget(self) -> int:
        """The most bytes a query's calls may build from counts in one row: DuckDB computes a chunk of BATCH_ROWS rows
        at once on each of its threads, and counts none of these values against its memory limit."""
        return self.limits.memory_bytes // (BATCH_ROWS * self.limits.threads)

    def _past_row_budget(self, built: dict[str, float]) -> str:
        return (
            f"the values this query builds from counts ({', '.join(sorted(built))}) come to about "
            f"{sum(built.values()):,.0f} bytes a row, past the {self._row_budget:,} a row its memory limit allows: "
            f"DuckDB computes {BATCH_ROWS:,} rows at once on each of its {self.limits.threads} thread(s) (and a "
            "lambda's body once for each item of its list), and counts none of these values against its memory "
            f"limit of {self.limits.memory_limit}. Build smaller values, or raise memory_limit (or lower threads) in "
            f"the config's [sql] block. {_SANDBOX_HINT}"
        )

    def close(self) -> None:
        """Close the connection. DuckDB refuses to close one busy with a query in another thread (a dashboard's
        background work when its server stops): that query is interrupted (it fails in its own thread, as one past
        its time limit does), and the close retried for up to CLOSE_WAIT_S."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            try:
                self._con.close()
                return
            except duckdb.Error:
                if time.monotonic() > deadline:
                    raise
                self._con.interrupt()
                time.sleep(0.01)


def _inspect(tree: dict[str, Any]) -> tuple[str | None, str | None, dict[str, float]]:
    """(the statement that writes in a SELECT's WITH clause, why a call in it is refused, see sql_calls), each None
    when there is none, and the bytes the calls build from counts (and literals they repeat) in a row, by what builds
    them. A write (`WITH x AS (DELETE ... RETURNING *) ...`) DuckDB would refuse anyway (the store's tables are
    views), but the refusal should say why. The parse tree is walked without recursion: a query nested hundreds of
    levels deep is a refusal, not a Python error."""
    writes: str | None = None
    stack: list[Any] = [tree]
    while stack and writes is None:
        node = stack.pop()
        if isinstance(node, dict):
            writes = _WRITING_NODES.get(str(node.get("type")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    calls = check_calls(tree)
    return writes, calls.refused, calls.built


def _refused_by_text(text: str) -> str | None:
    """Why a query checked by its text only is refused (a function it calls by name, a lambda or a list
    comprehension, see sql_calls), or None."""
    if syntax := refused_syntax_in_text(text):
        return (f"{syntax} is refused in this query: it is checked by its text only, where what a lambda or a list "
                "comprehension repeats cannot be bounded (nested, x || x doubles a value at each level, past the "
                "query's time and memory limits). A PIVOT is checked in full with an IN list (PIVOT ... ON k IN ('a', "
                "'b')), and the rest of its query where its source joins no tables (join them in a subquery: PIVOT "
                "(SELECT ...) ON k).")
    call = refused_call_in_text(text)
    if call is None:
        return None
    if call in UNBOUNDED_CALLS | QUERY_CALLS:
        return refusal(call)
    return (f"{refusal(call)} This query is checked by its text only, where {call}() is refused whatever its "
            "arguments: a PIVOT is checked in full with an IN list (PIVOT ... ON k IN ('a', 'b')), and the rest of "
            "its query where its source joins no tables (join them in a subquery: PIVOT (SELECT ...) ON k).")


def _tables_named(sql: str, tables: dict[str, int | None]) -> list[str]:
    """Of `tables`, those `sql` may read: each whose name it holds as a word (in any case, quoted or not), or all
    when it asks the catalog (SHOW TABLES, information_schema, duckdb_tables()) or names a table in a string
    (query_table). Naming one more than it reads costs only its opening."""
    if _CATALOG.search(sql):
        return list(tables)
    return [name for name in tables if re.search(rf"(?i)\b{name}\b", sql)]


#: DuckDB's words for a failed read of a registered table's files: (the table, the reason Arrow gave).
_READ_FAILED = re.compile(r"reading the stream registered as '(\w+)' failed: (?:IOError|Invalid): ?(.*)", re.DOTALL)


def _quoted(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _without_home(text: str) -> str:
    """`text` with this user's home directory written `~`: DuckDB's refusals name paths under it (its extension
    directory, for duckdb_extensions()), which the sandbox keeps from a query, as it blanks the settings naming it."""
    home = os.path.expanduser("~").rstrip("/")
    return text.replace(home, "~") if home not in ("", "~") else text


def _refused(text: str, kind: duckdb.StatementType | None) -> str:
    """A refusal that names the statement as written: DuckDB files INSTALL under LOAD, RESET and USE under SET,
    CHECKPOINT under CALL, ANALYZE under VACUUM; where the text starts like a query (a WITH clause before an
    INSERT), DuckDB's type."""
    match = _LEADING.match(text)
    first = (match.group(1) or "").upper() if match else ""
    second = (match.group(2) or "").upper() if match else ""
    if first and first not in _QUERY_WORDS:
        return f"{first} {second if (first, second) in _TWO_WORDS else ''}".strip() + " statements are refused"
    if kind is not None and kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.MULTI):
        return f"{kind.name} statements are refused"
    return "this statement is refused: only a query (SELECT, WITH, FROM, VALUES, PIVOT, ...) is accepted"


class _Deadline:
    """Interrupts a connection's query once `seconds` have passed: a timer thread calls DuckDB's interrupt, which
    the query's workers check as they go (a recursive CTE or a cross join stops within moments)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, seconds: float) -> None:
        self.fired = False
        self._con = con
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._con.interrupt()

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


__all__ = ["BATCH_ROWS", "SqlLimits", "SqlSandbox"]

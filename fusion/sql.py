"""Read-only, sandboxed SQL over the store with DuckDB.

The store's tables are registered as Arrow datasets read through the Delta log (scanned lazily, with DuckDB's
filters and projections pushed into the scan; a table holding string_view files, which Delta merges write, is
registered with string_view text and scanned whole, see Store.dataset); then DuckDB's file system,
extensions and configuration are locked. A query can read only those tables: no other file, no COPY,
ATTACH, INSTALL or LOAD, no SET, no writes. Only a single SELECT statement is accepted.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from fusion.errors import SqlError, SqlRefused
from fusion.store import Store
from schemas.tables import TABLE_SCHEMAS

_ALLOWED = {duckdb.StatementType.SELECT}
_SANDBOX_HINT = (
    "Fusion's SQL is read-only and sandboxed: it reads only the store's tables "
    f"({', '.join(sorted(TABLE_SCHEMAS))}); files, COPY, ATTACH, INSTALL/LOAD and settings are not available"
)


class SqlSandbox:
    """One DuckDB connection over a store snapshot; create one per session (not thread-safe)."""

    def __init__(
        self,
        store: Store | str | Path,
        *,
        threads: int = 2,
        memory_limit: str = "2GB",
        versions: dict[str, int] | None = None,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        unknown = sorted(set(versions or {}) - set(TABLE_SCHEMAS))
        if unknown:
            raise SqlError(f"versions name tables the store does not have: {unknown} (it has {sorted(TABLE_SCHEMAS)})")
        self._con = duckdb.connect(":memory:")
        for name in TABLE_SCHEMAS:
            version = (versions or {}).get(name)
            self._con.register(name, self.store.dataset(name, version=version, string_view=None))
        self._con.execute(f"SET threads = {int(threads)}")
        self._con.execute(f"SET memory_limit = '{memory_limit}'")
        self._con.execute("SET TimeZone = 'UTC'")
        self._con.execute("SET temp_directory = ''")  # a query may not spill to (and fill) the disk
        self._con.execute("SET max_temp_directory_size = '0B'")
        self._con.execute("SET autoinstall_known_extensions = false")
        self._con.execute("SET autoload_known_extensions = false")
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    def query(self, sql: str) -> pa.Table:
        """Run one SELECT and return its result as an Arrow table; anything else raises SqlRefused."""
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as exc:
            raise SqlError(f"SQL error: {exc}") from None
        if len(statements) != 1:
            raise SqlRefused(f"expected exactly one SQL statement, got {len(statements)}. {_SANDBOX_HINT}")
        try:
            kind = statements[0].type
        except ValueError:  # a statement type this DuckDB client cannot name: never a plain SELECT
            raise SqlRefused(f"this statement is refused. {_SANDBOX_HINT}") from None
        if kind not in _ALLOWED:
            raise SqlRefused(f"{kind.name} statements are refused. {_SANDBOX_HINT}")
        try:
            return self._con.sql(sql).to_arrow_table()
        except duckdb.PermissionException as exc:
            raise SqlRefused(f"{exc}. {_SANDBOX_HINT}") from None
        except duckdb.Error as exc:
            if "configuration has been locked" in str(exc):
                raise SqlRefused(f"{exc}. {_SANDBOX_HINT}") from None
            raise SqlError(f"SQL error: {exc}") from None

    def close(self) -> None:
        self._con.close()

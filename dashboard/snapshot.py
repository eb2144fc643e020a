"""The dashboard's one way into the store: for each request, one snapshot read through Fusion's public API
(`fusion.api.open_store`: the sandboxed, read-only SQL surface of `fusion sql`, under the config's [sql] limits).
Every query of a page reads the same table versions.

What is derived from whole tables (the store's series, the verify report) is computed once per version of those
tables and kept: per version and per state of the version's data files (their sizes and modification times,
`FusedStore.data_files`), so that a file rewritten in place, without a Delta commit, is not served from what was
computed before. On a large store that takes seconds (a year of 15-minute releases for 250 series: 1-2 s for the
series, longer to verify), and a live store gains a version at every release, so such a value may be served
`recent`ly: the value of the previous versions at once, while a background thread computes the current one; a
`recent` value may also be given a `max_age`, past which it is computed again (in the background) whatever the
versions: the verify report, which a rewrite keeping a file's size and time would otherwise leave standing."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from dashboard.params import BadParameter
from fusion.api import DataFile, FusedStore, open_store
from fusion.config.federation import Config

T = TypeVar("T")
log = logging.getLogger("fusion.dashboard")


class HeldStores:
    """Per serving thread, the FusedStore of its last request and the versions it reads: a request that finds the
    store at the same versions reuses it, and with it the tables its connection has registered already (reading a
    table's Delta log into an Arrow dataset costs tens of milliseconds; the query itself often less). All are
    closed when the server stops (`release_all`): a DuckDB connection still open in an idle worker thread when the
    interpreter exits can abort the process."""

    def __init__(self) -> None:
        self._stores: dict[int, tuple[tuple[Any, ...], FusedStore]] = {}
        self._lock = threading.Lock()

    def get(self) -> tuple[tuple[Any, ...], FusedStore] | None:
        with self._lock:
            return self._stores.get(threading.get_ident())

    def set(self, held: tuple[tuple[Any, ...], FusedStore] | None) -> None:
        with self._lock:
            if held is None:
                self._stores.pop(threading.get_ident(), None)
            else:
                self._stores[threading.get_ident()] = held

    def release_all(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for _, store in stores:
            try:
                store.close()  # a query still running in a background thread is interrupted first
            except Exception as exc:  # the server is stopping: one store that will not close must not stop the rest
                log.warning("a store could not be closed as the server stopped: %s", exc)



class VersionCache:
    """One app's state: values computed from given table versions, the most recently used `size` kept, and the
    latest value of each name whatever its versions; the stores its threads hold; and the highest release sequence
    number it has shown (`seen`: kept for as long as the process serves). Thread-safe (requests are served from a
    thread pool)."""

    def __init__(self, size: int = 64, *, seen: int = 0) -> None:
        self.stores = HeldStores()
        self._seen = seen
        self._size = size
        self._values: OrderedDict[tuple[Any, ...], tuple[Any, float]] = OrderedDict()  # key -> (value, computed at)
        self._latest: dict[str, Any] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> tuple[bool, Any, float]:
        """(found, value, when it was computed: time.monotonic())."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                value, at = self._values[key]
                return True, value, at
            return False, None, 0.0

    def put(self, name: str, key: tuple[Any, ...], value: Any) -> None:
        with self._lock:
            self._values[key] = (value, time.monotonic())
            self._latest[name] = value
            while len(self._values) > self._size:
                self._values.popitem(last=False)

    def latest(self, name: str) -> tuple[bool, Any]:
        """(found, the value of `name` computed last, at whatever versions)."""
        with self._lock:
            return name in self._latest, self._latest.get(name)

    @property
    def seen(self) -> int:
        """The highest sequence number of a signed release this app has shown (or was told of at start): the
        releases up to it must still be there (`fusion verify --seen`)."""
        with self._lock:
            return self._seen

    def saw(self, sequence: int) -> None:
        with self._lock:
            self._seen = max(self._seen, sequence)

    def start_refresh(self, name: str) -> bool:
        """Whether the caller should refresh `name` (False: another thread is at it)."""
        with self._lock:
            if name in self._refreshing:
                return False
            self._refreshing.add(name)
            return True

    def end_refresh(self, name: str) -> None:
        with self._lock:
            self._refreshing.discard(name)




class Snapshot:
    """One request's read of the store (open it with `with`); not shared between threads."""

    def __init__(self, config: Config, cache: VersionCache) -> None:
        self.config = config
        self._cache = cache
        fresh = open_store(config)
        self._files: dict[str, tuple[DataFile, ...]] = {}
        # A held store's connection keeps each table it registered, footers read: a file rewritten in place since
        # must be read afresh, so the held store is reused only while every table's files are as they were.
        stamps = tuple((table, fresh.data_files(table)) for table, version in sorted(fresh.versions.items())
                       if version is not None)
        key = (str(config.store_path), tuple(sorted(fresh.versions.items(), key=lambda item: item[0])), stamps)
        self._files.update(stamps)
        held = cache.stores.get()
        if held is not None and held[0] == key:
            fresh.close()
            self._store = held[1]
        else:
            if held is not None:
                held[1].close()
            cache.stores.set((key, fresh))
            self._store = fresh
        #: The Delta version of each table read (None: the table does not exist yet and reads as empty).
        self.versions: dict[str, int | None] = self._store.versions

    @property
    def seen(self) -> int:
        """The highest release sequence number the app has shown (VersionCache.seen)."""
        return self._cache.seen

    def saw(self, sequence: int) -> None:
        """Record that a release of this sequence number was shown."""
        self._cache.saw(sequence)

    @property
    def store(self) -> FusedStore:
        """The snapshot's FusedStore, for readers that take one (mechanisms.audit)."""
        return self._store

    def has(self, table: str) -> bool:
        """Whether `table` exists (it may still be empty)."""
        return self.versions.get(table) is not None

    def table(self, sql: str) -> pa.Table:
        return self._store.sql(sql)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        return self.table(sql).to_pylist()

    def data_files(self, table: str) -> tuple[DataFile, ...]:
        """The data files of `table` at this snapshot's version, as found when it was opened."""
        if table not in self._files:
            self._files[table] = self._store.data_files(table)
        return self._files[table]

    def _key(self, name: str, tables: Sequence[str]) -> tuple[Any, ...]:
        return (name, str(self.config.store_path), *(self.versions.get(t) for t in tables),
                *(self.data_files(t) for t in tables))

    def cached(self, name: str, tables: Sequence[str], compute: Callable[[Snapshot], T], *,
               again: bool = False) -> T:
        """`compute(self)`, kept for as long as `tables` stay at the versions (and their files as they are) this
        snapshot reads; `again`: computed anew even so."""
        key = self._key(name, tables)
        found, value, _ = self._cache.get(key)
        if found and not again:
            return value
        value = compute(self)
        self._cache.put(name, key, value)
        return value

    def recent(self, name: str, tables: Sequence[str], compute: Callable[[Snapshot], T], *,
               max_age: float | None = None) -> tuple[T, bool]:
        """(value, whether it is current: of this snapshot's versions and files, and computed within `max_age`
        seconds): `cached`, or where only an earlier value is kept (of earlier versions, or older than
        `max_age`), that one at once while a background thread computes the current one."""
        found, value, at = self._cache.get(self._key(name, tables))
        if found and (max_age is None or time.monotonic() - at <= max_age):
            return value, True
        known, earlier = (True, value) if found else self._cache.latest(name)
        if not known:
            return self.cached(name, tables, compute), True
        if self._cache.start_refresh(name):
            threading.Thread(target=_refresh, args=(self.config, self._cache, name, tables, compute, found),
                             daemon=True, name=f"fusion-dashboard-{name}").start()
        return earlier, False

    def close(self, *, failed: bool = False) -> None:
        """Nothing to release: the store stays with this thread for its next request (HeldStores), unless the
        request `failed`: a failed query may leave the connection without a table it began to register (a
        damaged file), so this thread's next request opens the store afresh."""
        if failed:
            held = self._cache.stores.get()
            if held is not None and held[1] is self._store:
                self._cache.stores.set(None)
            self._store.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=kind is not None and not issubclass(kind, BadParameter))  # a bad parameter harms nothing


def _refresh(config: Config, cache: VersionCache, name: str, tables: Sequence[str],
             compute: Callable[[Snapshot], Any], again: bool = False) -> None:
    """Compute `name` at the store's current versions, in its own snapshot (a thread of its own); `again`: even
    where a value of those versions is kept (it is past its age)."""
    try:
        with Snapshot(config, cache) as snapshot:
            snapshot.cached(name, tables, compute, again=again)
    except Exception:  # a background refresh has no request to answer: the next request computes and reports it
        log.exception("refreshing %s failed", name)
    finally:
        held = cache.stores.get()  # this thread ends here
        if held is not None:
            cache.stores.set(None)
            held[1].close()
        cache.end_refresh(name)


def warm(config: Config, cache: VersionCache, work: Sequence[tuple[str, Sequence[str], Callable[[Snapshot], Any]]]
         ) -> threading.Thread:
    """Compute what the first requests will ask for (the series, the verify report) in a background thread, so
    the first page served after start does not wait for it."""

    def run() -> None:
        for name, tables, compute in work:
            if cache.start_refresh(name):
                _refresh(config, cache, name, tables, compute)

    thread = threading.Thread(target=run, daemon=True, name="fusion-dashboard-warm")
    thread.start()
    return thread

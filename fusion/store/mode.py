"""A store's privacy mode: a store is created for production or for tests, and keeps that mode.

Test mode may switch noise off or seed it: its cells are exact (or their noise can be regenerated), accounted at
epsilon inf and charged nothing to the budget ledger. Such cells must never sit beside production releases, so
the first run that releases into a store records its mode (`privacy.mode`) in the metadata of the store's
`releases` table, and every later run must have the same mode. A store written before modes were recorded
takes the mode its releases show: production if any release carries calibrated, unseeded noise (finite epsilon),
test if every release is a test-mode one; a store without releases takes the mode of its first run.

`fusion verify` reports each release with exact or seeded cells in a production store as a violation.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from fusion.config.federation import PrivacyMode
from fusion.errors import FusionError
from fusion.store.delta import Store

#: The property of the `releases` table that holds the store's mode.
MODE_PROPERTY = "fusion.mode"

_OWN_STORE = {
    PrivacyMode.TEST: "test runs need a store of their own",
    PrivacyMode.PRODUCTION: "production releases need a store of their own, with no test-mode cell beside them",
}


def recorded_mode(store: Store) -> PrivacyMode | None:
    """The mode recorded in the store (None in a store created before modes were recorded, or not yet used)."""
    value = store.table_property("releases", MODE_PROPERTY)
    if value is None:
        return None
    try:
        return PrivacyMode(value)
    except ValueError:
        raise FusionError(
            f"store {store_location(store)} records mode {value!r} in its releases table ({MODE_PROPERTY}); Fusion "
            f"knows {[m.value for m in PrivacyMode]}: the store was written by another program or a later Fusion"
        ) from None


def inferred_mode(releases: pa.Table) -> PrivacyMode | None:
    """The mode a store's releases show (columns epsilon and noise): production if any release has calibrated,
    unseeded noise, test if all are test-mode ones, None without releases."""
    if releases.num_rows == 0:
        return None
    return PrivacyMode.PRODUCTION if pc.any(pc.invert(_test_mode_cells(releases))).as_py() else PrivacyMode.TEST


def store_mode(store: Store, releases: pa.Table | None = None) -> PrivacyMode | None:
    """The store's mode: recorded, else inferred from its releases (read unless given), else None."""
    recorded = recorded_mode(store)
    if recorded is not None:
        return recorded
    if releases is None:
        releases = store.dataset("releases").to_table(columns=["epsilon", "noise"])
    return inferred_mode(releases)


def bind_store_mode(store: Store, mode: PrivacyMode) -> None:
    """Refuse a run whose mode is not the store's; record the mode in a store that has none recorded yet."""
    held = recorded_mode(store)
    if held is None:  # a store not used yet, or written before modes were recorded: record what it is
        shown = inferred_mode(store.dataset("releases").to_table(columns=["epsilon", "noise"]))
        held = PrivacyMode(store.record_table_property("releases", MODE_PROPERTY, (shown or mode).value))
    if held is not mode:
        raise FusionError(
            f"store {store_location(store)} is a {held.value} store, and this config has privacy.mode = "
            f"\"{mode.value}\": {_OWN_STORE[mode]} (point federation.store at another directory)"
        )


def releases_with_test_cells(releases: pa.Table) -> dict[str, str]:
    """Release id -> why, for each release (rows with columns release_id, epsilon, noise) holding test-mode cells:
    exact (noise off) or seeded noise, epsilon inf, charged nothing to the budget."""
    flagged = releases.filter(_test_mode_cells(releases))
    out: dict[str, str] = {}
    for release_id, noise in zip(
        flagged.column("release_id").to_pylist(), flagged.column("noise").to_pylist(), strict=True
    ):
        if release_id in out:
            continue
        kind = "exact cells (noise off)" if str(noise).startswith("off") else f"test-mode cells (noise {noise})"
        out[release_id] = (
            f"{kind} at epsilon inf in a production store: released in test mode, charged nothing to the budget"
        )
    return out


def _test_mode_cells(releases: pa.Table) -> pa.ChunkedArray:
    """Per row: whether the cell is a test-mode one (epsilon not finite, or a noise label saying test mode)."""
    epsilon = pc.cast(releases.column("epsilon"), pa.float64())
    noise = pc.cast(releases.column("noise"), pa.string())
    finite = pc.is_finite(epsilon)  # false for inf and NaN
    labelled = pc.match_substring(noise, "test mode")
    return pc.or_(pc.invert(pc.fill_null(finite, False)), pc.fill_null(labelled, False))


def store_location(store: Store) -> str:
    return store.uri or str(store.path)


__all__ = [
    "MODE_PROPERTY",
    "bind_store_mode",
    "inferred_mode",
    "recorded_mode",
    "releases_with_test_cells",
    "store_location",
    "store_mode",
]

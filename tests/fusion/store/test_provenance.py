"""Signed releases: the digest is canonical, and `verify_releases` catches every change to what was published."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

from fusion.errors import FusionError
from fusion.keys.registry import (
    create_key_holder_key,
    key_holder_signing_key_file,
    load_key_holder_public_keys,
    load_key_holder_signing_key,
    write_private,
)
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from fusion.store.ledger import BudgetLedger
from fusion.store.provenance import SIGNATURE_FIELD, ChainLink, ReleaseSignature, rows_digest, sign_release
from fusion.store.signed_budget import BudgetClaim, budget_checks, budget_claim, parse_budget_claim
from fusion.store.verification import verify_releases
from pipelines import release as release_module
from pipelines.batch import run_batch
from privacy.accountant import Composition, ReleaseCharge
from privacy.signing import generate_signing_key, sign
from schemas.tables import AUDIT_SCHEMA, BUDGET_SCHEMA, REJECTS_SCHEMA, RELEASES_SCHEMA
from tests.conftest import END, START
from tests.fusion.store.test_ledger import DAY, DELTA, MECHANISM


def _cells() -> pa.Table:
    return pa.table(
        {
            "metric": ["load", "load", "flow"],
            "region": ["north", "south", "north"],
            "window_start": pa.array([0, 0, 900_000_000], pa.timestamp("us", tz="UTC")),
            "count": [3.0, float("nan"), -0.0],
            "mean": pa.array([1.5, None, 2.0], pa.float64()),
            "contributors": pa.array([2, 2, 3], pa.int32()),
        }
    )


def test_the_rows_digest_ignores_row_order_chunking_and_text_type_but_not_a_bit_of_a_value() -> None:
    cells = _cells()
    columns = cells.column_names
    digest = rows_digest(cells, columns)
    shuffled = cells.take([2, 0, 1])
    chunked = pa.concat_tables([cells.slice(0, 1), cells.slice(1)])
    wide = [f.with_type(pa.large_string()) if f.type == pa.string() else f for f in cells.schema]
    large = cells.cast(pa.schema(wide))
    assert rows_digest(shuffled, columns) == rows_digest(chunked, columns) == rows_digest(large, columns) == digest
    other_nan = cells.set_column(3, "count", pa.array(np.array([3.0, np.float64(np.nan) * -1, -0.0])))
    assert rows_digest(other_nan, columns) == digest  # every NaN alike
    nudged = cells.set_column(3, "count", pa.array([np.nextafter(3.0, 4.0), float("nan"), -0.0]))
    zero = cells.set_column(3, "count", pa.array([3.0, float("nan"), 0.0]))
    null = cells.set_column(4, "mean", pa.array([1.5, 0.0, 2.0]))
    renamed = cells.set_column(1, "region", pa.array(["north", "southh", "north"]))
    moved = cells.set_column(1, "region", pa.array(["nort", "hsouth", "north"]))
    for changed in (nudged, zero, null, renamed, moved):
        assert rows_digest(changed, columns) != digest
    assert rows_digest(cells, columns[:-1]) != digest  # the columns covered are part of it


def test_digests_over_a_whole_table_equal_each_releases_own(tmp_path: Path) -> None:
    """`verify_releases` digests every release from one canonical copy of the table; each digest must be the one
    `rows_digest` gives that release alone, whatever the text (nulls, non-ASCII) and the arrays' offsets."""
    cells = pa.concat_tables([_cells()] * 3)
    names = pa.array(["r-b"] * 3 + ["r-a"] * 3 + ["r-c"] * 3)
    notes = pa.array(["é", None, "", "ab", "c", None, "ÿÿ", "d", "e"])
    table = cells.append_column("release_id", names).append_column("note", notes)
    padded = pa.concat_tables([table.slice(0, 2), table]).slice(2)  # columns that start past an offset
    from fusion.store.provenance import CELL_ORDER, _Canonical

    ordered = padded.sort_by([("release_id", "ascending"), *((c, "ascending") for c in CELL_ORDER)])
    wide = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in ordered.schema])
    shifted = pa.concat_tables([ordered.slice(0, 1), ordered]).cast(wide).combine_chunks().slice(1)
    assert shifted.column("region").chunk(0).offset == 1  # text whose bytes start past the buffer's start
    for canonical in (_Canonical(ordered), _Canonical(shifted)):
        for number, release in enumerate(("r-a", "r-b", "r-c")):
            alone = table.filter(pc.equal(table.column("release_id"), release))
            start = 3 * number
            assert canonical.digest(start, start + 3, table.column_names) == rows_digest(alone, table.column_names)


def _overwrite(store: Store, name: str, table: pa.Table, schema: pa.Schema) -> None:
    write_deltalake(store.table_path(name), table.select(schema.names).cast(schema), mode="overwrite")


@pytest.mark.e2e
def test_verify_finds_each_change_to_a_signed_release(make_federation, tmp_path: Path) -> None:
    fed = make_federation(noise=True, seed=5)
    plan = plan_release(fed.config, START, END)
    assert run_batch(plan).status == "released"
    keys = load_key_holder_public_keys(fed.config)
    original = Path(fed.config.store_path)
    assert [(c.status, c.rows) for c in verify_releases(Store(original), keys)] == [("verified", plan.layout.cells)]

    def tampered(change, unsigned: frozenset[str] = frozenset()) -> list[tuple[str, str,
                                                                               str]]:  # type: ignore[no-untyped-def]
        copy = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(original, copy)
        store = Store(copy)
        change(store, store.read("releases"), store.read("audit"))
        return [(c.release_id, c.status, c.reason) for c in verify_releases(store, keys, unsigned=unsigned)]

    rid = plan.key.release_id

    def bump_one_count(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        counts = rows.column("count").to_numpy().copy()
        counts[7] += 1.0
        _overwrite(store, "releases", rows.set_column(rows.schema.get_field_index("count"), "count",
                                                      pa.array(counts)), RELEASES_SCHEMA)

    def drop_a_row(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        _overwrite(store, "releases", rows.slice(1), RELEASES_SCHEMA)

    def add_a_release(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        forged = rows.slice(0, 2).set_column(0, "release_id", pa.array(["r-forged"] * 2)).cast(rows.schema)
        _overwrite(store, "releases", pa.concat_tables([rows, forged]), RELEASES_SCHEMA)

    def edit_detail(edit):  # type: ignore[no-untyped-def]
        def change(store: Store, rows: pa.Table, audit: pa.Table) -> None:
            details = []
            for action, detail in zip(audit.column("action").to_pylist(), audit.column("detail").to_pylist(),
                                      strict=True):
                if action == "release":
                    doc = json.loads(detail)
                    edit(doc, rows)
                    detail = json.dumps(doc)
                details.append(detail)
            _overwrite(store, "audit", audit.set_column(audit.schema.get_field_index("detail"), "detail",
                                                        pa.array(details, pa.string())), AUDIT_SCHEMA)
            bump_one_count(store, rows, audit)
        return change

    def claim_new_digest(doc: dict, rows: pa.Table) -> None:  # type: ignore[type-arg]
        doc[SIGNATURE_FIELD]["rows_sha256"] = "0" * 64  # the forger updates the digest but cannot re-sign

    def sign_with_own_key(doc: dict, rows: pa.Table) -> None:  # type: ignore[type-arg]
        private, _ = generate_signing_key()
        doc[SIGNATURE_FIELD] = sign_release(
            rows, release_id=rid, aggregate_sha256=doc[SIGNATURE_FIELD]["aggregate_sha256"], signing_key=private
        ).to_doc()

    def remove_audit_record(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        _overwrite(store, "audit", audit.filter(pc.not_equal(audit.column("action"), "release")), AUDIT_SCHEMA)

    def strip_signature(doc: dict, rows: pa.Table) -> None:  # type: ignore[type-arg]
        del doc[SIGNATURE_FIELD]

    def add_an_audit_record(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        mine = audit.filter(pc.equal(audit.column("action"), "release"))
        other = mine.set_column(0, "event_id", pa.array([f"{rid}:released-again"])).set_column(
            mine.schema.get_field_index("detail"), "detail", pa.array(["{}"])
        )
        _overwrite(store, "audit", pa.concat_tables([audit, other.cast(audit.schema)]), AUDIT_SCHEMA)

    def remove_the_rows(store: Store, rows: pa.Table, audit: pa.Table) -> None:
        _overwrite(store, "releases", rows.slice(0, 0), RELEASES_SCHEMA)

    def copy_the_audit_record(*, first: bool, signed: bool):  # type: ignore[no-untyped-def]
        """A second `<release>:released` record: the genuine one's copy, its signature kept (another time, actor
        and unsigned detail) or taken out; read before the genuine one or after it."""

        def change(store: Store, rows: pa.Table, audit: pa.Table) -> None:
            (record,) = [r for r in audit.to_pylist() if r["event_id"] == f"{rid}:released"]
            doc = json.loads(record["detail"])
            doc = {**doc, "epsilon": 0.001} if signed else {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}
            copy = {**record, "at": record["at"] - timedelta(days=400), "actor": "mallory", "detail": json.dumps(doc)}
            copied = pa.Table.from_pylist([copy], schema=audit.schema)
            _overwrite(store, "audit", pa.concat_tables([copied, audit] if first else [audit, copied]), AUDIT_SCHEMA)

        return change

    assert tampered(bump_one_count) == [(rid, "tampered", "the rows in `releases` differ from the rows signed")]
    n = plan.layout.cells
    assert tampered(drop_a_row) == [(rid, "tampered", f"{n - 1} rows in `releases`, {n} signed")]
    forged = tampered(add_a_release)
    assert forged[0][:2] == (rid, "verified") and forged[1][:2] == ("r-forged", "tampered")
    not_ours = "the signature was not made by the registered key holder"
    assert tampered(edit_detail(claim_new_digest)) == [(rid, "tampered", not_ours)]
    assert tampered(edit_detail(sign_with_own_key)) == [(rid, "tampered", not_ours)]
    # A signature removed is no downgrade to "published before signing", unless the registry lists it so.
    assert tampered(remove_audit_record)[0][:2] == (rid, "tampered")
    stripped = (rid, "tampered", "its audit record holds no signature (removed)")
    assert tampered(edit_detail(strip_signature)) == [stripped]
    assert tampered(remove_audit_record, frozenset({rid}))[0][:2] == (rid, "legacy")
    assert tampered(add_an_audit_record)[0][:2] == (rid, "tampered")
    # Fusion writes one record of a release (the audit's event ids are unique): a second one is no question of
    # which to believe, whatever order they are read in.
    twice = [(rid, "tampered", "2 audit records of its release, where Fusion writes one")]
    for first in (False, True):
        for signed in (True, False):
            assert tampered(copy_the_audit_record(first=first, signed=signed)) == twice, (first, signed)
    assert tampered(remove_the_rows)[0][:2] == (rid, "missing")

    # A rotated key: releases signed with the old one still verify; the registry keeps it as retired.
    create_key_holder_key(fed.config, overwrite=True)
    rotated = load_key_holder_public_keys(fed.config)
    assert len(rotated) == 2 and rotated[1] == keys[0]
    assert [c.status for c in verify_releases(Store(original), rotated)] == ["verified"]
    assert [c.status for c in verify_releases(Store(original), rotated[:1])] == ["tampered"]


@pytest.mark.e2e
def test_a_release_racing_another_pass_publishes_the_rows_the_first_recorded(make_federation, monkeypatch) -> None:
    """Pass A records the release's audit row (its time and signature) and stops before the rows; pass B read the
    audit table before A wrote it, so it decodes with its own time. B's own audit insert does nothing (A's row
    is there), so B publishes A's signed rows, rebuilt with A's time."""
    fed = make_federation(noise=True, seed=5)
    plan = plan_release(fed.config, START, END)
    store = Store(fed.config.store_path)
    inserted = store.insert_new

    def stop_before_rows(name: str, rows: pa.Table) -> int:
        if name == "releases":
            raise RuntimeError("pass A stops here")
        return inserted(name, rows)

    monkeypatch.setattr(Store, "insert_new", lambda self, name, rows: stop_before_rows(name, rows))
    with pytest.raises(RuntimeError, match="pass A stops here"):
        run_batch(plan)
    monkeypatch.undo()
    real = release_module._recorded_release
    calls = []

    def raced(plan_: object, store_: Store) -> object:
        calls.append(1)
        return None if len(calls) == 1 else real(plan_, store_)  # B's first read came before A's write

    monkeypatch.setattr(release_module, "_recorded_release", raced)
    assert release_module.release(plan, store).status == "released"
    assert len(calls) == 2
    checks = verify_releases(store, load_key_holder_public_keys(fed.config))
    assert [(c.status, c.rows) for c in checks] == [("verified", plan.layout.cells)]


@pytest.mark.e2e
def test_a_key_other_than_the_registered_one_publishes_nothing(make_federation) -> None:
    fed = make_federation(noise=True, seed=5)
    write_private(key_holder_signing_key_file(fed.config), generate_signing_key()[0])
    with pytest.raises(FusionError, match="not the one registered"):
        run_batch(plan_release(fed.config, START, END))
    store = Store(fed.config.store_path)
    assert store.read("releases").num_rows == 0 and store.read("budget").num_rows == 0


@pytest.mark.e2e
def test_a_key_holder_without_a_signing_key_publishes_nothing_and_spends_nothing(make_federation) -> None:
    fed = make_federation(noise=True, seed=5)
    key_holder_signing_key_file(fed.config).unlink()
    plan = plan_release(fed.config, START, END)
    with pytest.raises(FusionError, match="fusion keys --release-signing"):
        run_batch(plan)
    store = Store(fed.config.store_path)
    assert store.read("releases").num_rows == 0 and store.read("budget").num_rows == 0
    create_key_holder_key(fed.config)
    assert run_batch(plan).status == "released"
    assert [c.status for c in verify_releases(store, load_key_holder_public_keys(fed.config))] == ["verified"]


def _remove_whole_releases(store: Store, removed: set[str]) -> None:
    """What a store operator would do to make releases vanish: their rows, every audit row and the ledger's
    record of them, all gone."""
    rows, audit, budget = store.read("releases"), store.read("audit"), store.read("budget")
    keep = pc.invert(pc.is_in(rows.column("release_id"), pa.array(sorted(removed), pa.string())))
    _overwrite(store, "releases", rows.filter(keep), RELEASES_SCHEMA)
    keep = pc.invert(pc.is_in(audit.column("release_id"), pa.array(sorted(removed), pa.string())))
    _overwrite(store, "audit", audit.filter(keep), AUDIT_SCHEMA)
    ledger = []
    for period in budget.to_pylist():
        kept = [i for i, r in enumerate(period["release_ids"]) if r not in removed]
        mechanisms = period.get("mechanisms")  # the ledger's record of each release's mechanism, in release order
        ledger.append({**period, "release_ids": [period["release_ids"][i] for i in kept],
                       "aggregates": [period["aggregates"][i] for i in kept], "releases": len(kept),
                       "mechanisms": None if mechanisms is None else [mechanisms[i] for i in kept]})
    write_deltalake(store.table_path("budget"), pa.Table.from_pylist(ledger, schema=BUDGET_SCHEMA), mode="overwrite")


def _relink(store: Store, release_id: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the signature record of one release in place (what a forger without the key can do)."""
    audit = store.read("audit")
    details = []
    for rid, action, detail in zip(audit.column("release_id").to_pylist(), audit.column("action").to_pylist(),
                                   audit.column("detail").to_pylist(), strict=True):
        if rid == release_id and action == "release":
            doc = json.loads(detail)
            edit(doc[SIGNATURE_FIELD])
            detail = json.dumps(doc)
        details.append(detail)
    _overwrite(store, "audit", audit.set_column(audit.schema.get_field_index("detail"), "detail",
                                                pa.array(details, pa.string())), AUDIT_SCHEMA)


@pytest.mark.e2e
def test_the_chain_of_signed_releases_shows_a_release_removed_whole(make_federation, tmp_path: Path) -> None:
    """Each signature names its sequence number and the release it follows, both from the key holder's own
    chain state, so a release removed from the releases, audit and budget tables together is seen: by the next
    signature's link, by a number no signature holds, or (the newest, one or several in a row) by a reader who
    kept the number it saw and by the next release, which still names it."""
    fed = make_federation(noise=True, seed=5, extra_privacy="epsilon_cap = 10.0")
    hours = [plan_release(fed.config, START + timedelta(hours=h), START + timedelta(hours=h + 1)) for h in range(5)]
    ids = [plan.key.release_id for plan in hours]
    store = Store(fed.config.store_path)
    for plan in hours[:4]:
        assert run_batch(plan, in_process=True).status == "released"
    audit = store.read("audit")
    links = {}
    for row in audit.filter(pc.equal(audit.column("action"), "release")).to_pylist():
        claim = json.loads(row["detail"])[SIGNATURE_FIELD]
        links[row["release_id"]] = (claim["sequence"], claim["previous"])
    assert links == {ids[0]: (1, []), ids[1]: (2, [ids[0]]), ids[2]: (3, [ids[1]]), ids[3]: (4, [ids[2]])}
    keys = load_key_holder_public_keys(fed.config)
    clean = verify_releases(store, keys)
    assert {c.status for c in clean} == {"verified"} and [c.sequence for c in clean] == [
        links[rid][0] for rid in sorted(ids[:4])
    ]

    def copy_without(*removed: str) -> Store:
        copy = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fed.config.store_path, copy)
        _remove_whole_releases(Store(copy), set(removed))
        return Store(copy)

    def problems(target: Store, **kwargs: object) -> list[tuple[str, str, str]]:
        return [(c.release_id, c.status, c.reason) for c in verify_releases(target, keys,
                                                                            **kwargs)  # type: ignore[arg-type]
                if c.status != "verified"]

    first = problems(copy_without(ids[1]))
    assert [(rid, status) for rid, status, _ in first] == [(ids[1], "missing")]
    assert "removed: the signature of release" in first[0][2]
    # Two in a row: the later one by name, the earlier one by the number no signature holds or names.
    assert [p[:2] for p in problems(copy_without(ids[0], ids[1], ids[2]))] == [
        (ids[2], "missing"), ("(sequences 1-2)", "missing")
    ]
    # The newest is named by no one yet: a reader who kept its number sees it gone ...
    newest = copy_without(ids[3])
    assert problems(newest) == []
    assert [p[:2] for p in problems(newest, seen=4)] == [("(sequence 4)", "missing")]
    assert [p[:2] for p in problems(newest, seen=10**12)] == [("(sequences 4-1000000000000)", "missing")]
    # ... and so are the newest several removed together: the chain then ends early and reads whole without it.
    newest_two = copy_without(ids[2], ids[3])
    assert problems(newest_two) == []
    assert [p[:2] for p in problems(newest_two, seen=4)] == [("(sequences 3-4)", "missing")]
    # The links are signed: a forger who removes a release cannot rewrite its successor's link to hide it.
    relinked = copy_without(ids[1])
    _relink(relinked, ids[2], lambda claim: claim.update(previous=[ids[0]], sequence=2))
    assert [p[:2] for p in problems(relinked)] == [(ids[2], "tampered"), ("(sequence 2)", "missing")]
    # A record planted with a huge number and no valid signature moves nothing, and a detail nested too deeply
    # for the JSON parser is tampered, not a crash.
    planted = copy_without()
    _relink(planted, ids[2], lambda claim: claim.update(sequence=3_000_000))
    _relink(planted, ids[1], lambda claim: claim.update(rows=float("inf")))  # JSON's Infinity: not a count
    planted_problems = problems(planted)
    assert [p[:2] for p in planted_problems] == [
        (ids[1], "tampered"), (ids[2], "tampered"), ("(sequence 2)", "missing")
    ]
    assert planted_problems[-1][2].endswith("or are among those whose signatures are reported tampered")
    # An audit row of a release without a release id, and a release registered as unsigned that is gone.
    orphan = copy_without()
    rows = orphan.read("audit")
    ours = rows.filter(pc.equal(rows.column("event_id"), f"{ids[0]}:released"))
    nameless = ours.set_column(0, "event_id", pa.array(["x:released"])).set_column(
        ours.schema.get_field_index("release_id"), "release_id", pa.array([None], pa.string()))
    orphan.insert_new("audit", nameless.cast(AUDIT_SCHEMA))
    assert [p[:2] for p in problems(orphan, unsigned=frozenset({"r-legacy-gone"}))] == [
        ("(no release id)", "tampered"), ("r-legacy-gone", "missing")
    ]
    nested = copy_without()
    rows = nested.read("audit")
    deep = pc.if_else(pc.equal(rows.column("event_id"), f"{ids[0]}:released"), "[" * 100_000 + "]" * 100_000,
                      rows.column("detail"))
    _overwrite(nested, "audit", rows.set_column(rows.schema.get_field_index("detail"), "detail", deep), AUDIT_SCHEMA)
    assert problems(nested) == [(ids[0], "tampered", "the signature record is unreadable: nested too deeply")]

    # ... and so does everyone once the key holder signs the next release: its link comes from the key holder's
    # memory, not from the store, so it names the release removed and no number is given out twice. Its charge
    # comes back too: the key holder rebuilds the period's budget row from its own record of its charges.
    _remove_whole_releases(store, {ids[3]})
    assert run_batch(hours[4], in_process=True).status == "released"
    audit = store.read("audit")
    (newest,) = [json.loads(r["detail"])[SIGNATURE_FIELD] for r in audit.to_pylist()
                 if r["action"] == "release" and r["release_id"] == ids[4]]
    assert (newest["sequence"], newest["previous"]) == (5, [ids[3]])
    assert ids[3] in store.read("budget").column("release_ids")[0].as_py()
    assert "budget_restored" in audit.column("action").to_pylist()
    after = problems(store)
    assert [p[:2] for p in after] == [(ids[3], "missing")] and "charged to the budget but not published" in after[0][2]
    gone = problems(copy_without(ids[3]))  # its charge removed again: the next signature still names it
    assert [p[:2] for p in gone] == [(ids[3], "missing")] and f"release {ids[4]}" in gone[0][2]
    one = verify_releases(store, keys, release_id=ids[2])
    assert [(c.release_id, c.status) for c in one] == [(ids[2], "verified")]
    assert [(c.release_id, c.status) for c in verify_releases(store, keys, release_id=ids[3])] == [
        (ids[3], "missing")
    ]

def test_the_chain_state_starts_from_the_store_and_then_from_the_key_holders_memory(tmp_path: Path) -> None:
    """Without a state, the first link follows the store's highest authentic sequence (a forged record with a
    higher number is passed over), or the newest release signed before the chain; from then on the numbers come
    from the state, and a release re-run gets the link it had."""
    from datetime import UTC, datetime

    from fusion.store.provenance import CHAIN_STATE, ReleaseSignature, next_link

    store = Store(tmp_path / "store")
    store.ensure_tables()
    private, public = generate_signing_key()
    state = tmp_path / "keys"

    def record(release_id: str, minute: int, link: ChainLink | None, *, key: bytes = private,
               signed: bool = True) -> None:
        claim = ReleaseSignature(release_id, "a", 1, "b", (), sequence=None if link is None else link.sequence,
                                 previous=None if link is None else link.previous)
        signature = replace(claim, signature=sign(key, claim.message()).hex()).to_doc()
        detail = {SIGNATURE_FIELD: signature} if signed else {}
        row = {"event_id": f"{release_id}:released", "at": datetime(2026, 1, 1, 0, minute, tzinfo=UTC),
               "actor_role": "key_holder", "actor": "f", "action": "release", "release_id": release_id,
               "interval_start": None, "interval_end": None, "reason": None, "content_sha256": None,
               "detail": json.dumps(detail)}
        store.insert_new("audit", pa.Table.from_pylist([row], schema=AUDIT_SCHEMA))

    def link(release_id: str) -> ChainLink:
        return next_link(store, release_id, state_dir=state, public_keys=[public])

    record("r-old-1", 1, None)  # signed before the chain
    record("r-old-2", 2, None, signed=False)  # published before the key holder had a signing key
    assert link("r-a") == ChainLink(1, ("r-old-2",))
    assert link("r-a") == ChainLink(1, ("r-old-2",))  # a re-run: the same place
    assert link("r-b") == ChainLink(2, ("r-a",))  # from the state: r-a's record is not in the store yet

    (state / CHAIN_STATE).unlink()  # a lost state: rebuilt from what the store holds under authentic signatures
    record("r-a", 3, ChainLink(1, ("r-old-2",)))
    record("r-b", 4, ChainLink(2, ("r-a",)))
    record("r-forged", 5, ChainLink(90, ("r-b",)), key=generate_signing_key()[0])
    assert link("r-c") == ChainLink(3, ("r-b",))
    other = Store(tmp_path / "other-store")  # a store created anew: the state is not its chain
    other.ensure_tables()
    with pytest.raises(FusionError, match="belongs to another store"):
        next_link(other, "r-d", state_dir=state, public_keys=[public])
    (state / CHAIN_STATE).write_text("{not json")
    with pytest.raises(FusionError, match=r"chain state .* is unreadable"):
        link("r-d")


@pytest.mark.e2e
def test_releases_signed_before_budget_claims_still_verify(make_federation, tmp_path: Path) -> None:
    """A release signed in format v1 (no budget claim, no rejects digest) verifies as before and is left out of
    the budget and rejects checks; a v2 signature's budget claim is signed: stripped or edited, the release reads
    as tampered."""
    fed = make_federation(noise=True, seed=5)
    plan = plan_release(fed.config, START, END)
    assert run_batch(plan).status == "released"
    keys = load_key_holder_public_keys(fed.config)
    store = Store(fed.config.store_path)
    audit = store.read("audit")
    details = audit.column("detail").to_pylist()
    index = audit.column("action").to_pylist().index("release")
    doc = json.loads(details[index])
    signed = doc[SIGNATURE_FIELD]
    assert signed["budget"]["period"] == plan.period.name and signed["budget"]["composition"] == "parallel"
    assert ReleaseSignature.from_doc(signed).message().startswith(b"fusion/release/v2\n")

    def with_signature(signature: dict, name: str) -> Store:  # type: ignore[type-arg]
        copy = tmp_path / name
        shutil.copytree(fed.config.store_path, copy)
        edited = list(details)
        edited[index] = json.dumps({**doc, SIGNATURE_FIELD: signature})
        _overwrite(
            Store(copy),
            "audit",
            audit.set_column(audit.schema.get_field_index("detail"), "detail", pa.array(edited, pa.string())),
            AUDIT_SCHEMA,
        )
        return Store(copy)

    rid = plan.key.release_id
    key = load_key_holder_signing_key(fed.config)
    old = replace(ReleaseSignature.from_doc(signed), budget=None, rejects=None, signature="")
    assert old.message().startswith(b"fusion/release/v1\n")
    v1 = replace(old, signature=sign(key, old.message()).hex()).to_doc()
    assert "budget" not in v1 and "rejects" not in v1
    assert [(c.release_id, c.status) for c in verify_releases(with_signature(v1, "v1"), keys)] == [(rid, "verified")]
    stripped = {k: v for k, v in signed.items() if k != "budget"}
    assert [c.status for c in verify_releases(with_signature(stripped, "stripped"), keys)] == ["tampered"]
    raised = {**signed, "budget": {**signed["budget"], "epsilon_cap": 100.0}}
    assert [c.status for c in verify_releases(with_signature(raised, "raised"), keys)] == ["tampered"]


@pytest.mark.e2e
def test_verify_finds_each_change_to_a_releases_reject_tallies(make_federation, tmp_path: Path) -> None:
    """The signature covers the release's `rejects` rows (every column but recorded_at): a count rewritten, a row
    removed or added reads as tampered; their order, and their recording time, are no part of it."""
    fed = make_federation(noise=True, seed=5)
    plan = plan_release(fed.config, START, END)
    assert run_batch(plan).status == "released"
    keys = load_key_holder_public_keys(fed.config)
    rid = plan.key.release_id
    original = Path(fed.config.store_path)
    rejects = Store(original).read("rejects")
    audit = Store(original).read("audit").to_pylist()
    signed = next(json.loads(r["detail"])[SIGNATURE_FIELD] for r in audit if r["action"] == "release")
    assert signed["rejects"]["rows"] == rejects.num_rows > 0

    def verified_after(table: pa.Table) -> list[tuple[str, str]]:
        copy = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(original, copy)
        _overwrite(Store(copy), "rejects", table, REJECTS_SCHEMA)
        return [(c.status, c.reason) for c in verify_releases(Store(copy), keys)]

    counts = rejects.column("count").to_numpy().copy()
    counts[0] += 5000.0
    rewritten = rejects.set_column(rejects.schema.get_field_index("count"), "count", pa.array(counts))
    assert verified_after(rewritten) == [("tampered", "the reject tallies in `rejects` differ from those signed")]
    n = rejects.num_rows
    assert verified_after(rejects.slice(1)) == [("tampered", f"{n - 1} rows in `rejects`, {n} signed")]
    assert verified_after(pa.concat_tables([rejects, rejects.slice(0, 1)]))[0][0] == "tampered"
    assert verified_after(rejects.take(list(range(n))[::-1])) == [("verified", "")]  # order and files are no part
    later = pc.add(rejects.column("recorded_at").cast(pa.int64()), 1).cast(rejects.schema.field("recorded_at").type)
    moved = rejects.set_column(rejects.schema.get_field_index("recorded_at"), "recorded_at", later)
    assert verified_after(moved) == [("verified", "")]  # recorded_at is not covered (racing passes' times differ)
    assert rid in rejects.column("release_id").to_pylist()


def _charged_period(tmp_path: Path, releases: int = 1) -> tuple[list[tuple[str, BudgetClaim]], dict[str, object]]:
    """`releases` releases of one day charged by the ledger at event level, each with the budget claim the key holder
    signs with it, and the period's `budget` row as the ledger wrote it."""
    ledger = BudgetLedger(Store(tmp_path))
    signed = []
    for k in range(releases):
        rid, sha = f"r-{k}", f"{k:064x}"
        charge = ReleaseCharge(mechanism=MECHANISM, start=DAY.start, end=DAY.end, composition=Composition.PARALLEL)
        spent = ledger.spend(period=DAY, release_id=rid, aggregate_sha256=sha, charge=charge, cap=2.0, delta=DELTA)
        doc = budget_claim(
            period=DAY, charge=charge, cap=2.0, delta=DELTA, epsilon_after=spent.epsilon_after, charged_for=sha
        )
        signed.append((rid, parse_budget_claim(json.loads(json.dumps(doc)))))
    (row,) = ledger.rows().to_pylist()
    return signed, row


def _ledger_reasons(signed: list[tuple[str, BudgetClaim]], rows: list[dict[str, object]]) -> list[str]:
    findings = budget_checks(signed, rows)
    assert all(f.status == "ledger" and f.period == DAY.name for f in findings), findings
    return [f.reason for f in findings]


def test_a_budget_row_whose_spend_is_not_a_number_passes_no_check(tmp_path: Path) -> None:
    """NaN compares false with everything: a spend of NaN (or one past every number) is not 'at least what the
    signed releases show', and neither is an RDP cross-check of NaN."""
    signed, row = _charged_period(tmp_path)
    assert _ledger_reasons(signed, [row]) == []
    for spent in (float("nan"), float("inf"), -0.0, None):
        (reason,) = _ledger_reasons(signed, [{**row, "epsilon_spent": spent}])
        assert "less than its signed releases show" in reason
    (reason,) = _ledger_reasons(signed, [{**row, "epsilon_rdp": float("nan")}])
    assert reason.startswith("its budget row records an RDP epsilon of nan")
    curve = list(row["rdp"])  # type: ignore[call-overload]
    (reason,) = _ledger_reasons(signed, [{**row, "rdp": [float("nan"), *curve[1:]]}])
    assert reason == "its budget row's RDP curve is below its signed releases' (at order 2, among others)"
    (reason,) = _ledger_reasons(signed, [{**row, "epsilon_cap": float("nan")}])
    assert "epsilon_cap nan in the row, 2.0 signed" in reason


def test_a_budget_row_must_name_the_terms_its_releases_were_signed_under(tmp_path: Path) -> None:
    """The signature covers the period's bounds, cap, delta and composition rule, and the spend and RDP curve its
    releases compose to: a row naming others (a cap raised, a delta loosened, a period stretched, an RDP curve
    lowered) disagrees with the signed releases."""
    signed, row = _charged_period(tmp_path)
    later = DAY.end + timedelta(days=365)
    changed = {
        "epsilon_cap": (100.0, "epsilon_cap 100.0 in the row, 2.0 signed"),
        "delta": (1e-3, f"delta 0.001 in the row, {DELTA} signed"),
        "period_start": (DAY.start - timedelta(days=1), "period_start 2025-12-31 00:00:00+00:00 in the row"),
        "period_end": (later, f"period_end {later} in the row, {DAY.end} signed"),
        "composition": ("sequential", "composition sequential in the row, parallel signed"),
    }
    for field, (value, shown) in changed.items():
        reasons = _ledger_reasons(signed, [{**row, field: value}])
        assert reasons[0].startswith("its budget row names other terms than the signed releases ['r-0']"), field
        assert shown in reasons[0], reasons
    lowered = [x / 2 for x in row["rdp"]]  # type: ignore[attr-defined]
    assert _ledger_reasons(signed, [{**row, "rdp": lowered}]) == [
        "its budget row's RDP curve is below its signed releases' (at order 2, among others)"
    ]
    assert _ledger_reasons(signed, [{**row, "rdp": lowered[:-1]}]) == [
        f"its budget row's RDP curve has {len(lowered) - 1} orders, not {len(lowered)}"
    ]
    (reason,) = _ledger_reasons(signed, [{**row, "epsilon_rdp": 0.0}])
    assert reason.startswith("its budget row records an RDP epsilon of 0.0000, less than its signed releases'")
    # A row opened before the ledger kept mechanisms names no composition rule (and no mechanisms): it adds its
    # releases' RDP curves, whatever rule the releases charged to it since were signed with. Its rule taken out
    # while its mechanisms stay is no such row.
    assert _ledger_reasons(signed, [{**row, "composition": None, "mechanisms": None}]) == []
    (reason,) = _ledger_reasons(signed, [{**row, "composition": None}])
    assert "composition None in the row, parallel signed" in reason


def test_a_budget_row_may_hold_more_than_its_signed_releases(tmp_path: Path) -> None:
    """A release charged, then lost in a crash before it was published, is in the row but signed nowhere: the row's
    spend and RDP curve are then above the signed releases', which is no disagreement."""
    signed, row = _charged_period(tmp_path, releases=2)
    assert row["epsilon_spent"] > signed[0][1].epsilon_after  # type: ignore[operator]
    assert _ledger_reasons(signed[:1], [row]) == []


def test_a_second_budget_row_for_a_period_is_found_whichever_is_read_first(tmp_path: Path) -> None:
    """The ledger keeps one row per period (opening one inserts it only where none is): a second row, the signed
    releases' or an empty one, is reported whatever order the rows are read in."""
    signed, row = _charged_period(tmp_path)
    empty = {**row, "epsilon_spent": 0.0, "releases": 0, "release_ids": [], "aggregates": [], "mechanisms": []}
    reason = "the budget table holds 2 rows for the period, where the ledger keeps one (rows added)"
    assert _ledger_reasons(signed, [empty, row]) == [reason]
    assert _ledger_reasons(signed, [row, empty]) == [reason]
    assert _ledger_reasons(signed, [row, row]) == [reason]

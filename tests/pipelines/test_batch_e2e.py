"""End to end on small data: real Beam, real TenSEAL, real Delta tables, real DuckDB."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from fusion.errors import FusionError, ReleaseRefused
from fusion.keys.holder import create_keys, load_secret_context_bytes, secret_key_file
from fusion.keys.registry import load_signing_key
from fusion.release.estimates import Z95
from fusion.release.exchange import (
    aggregation_status_path,
    contribution_path,
    contributions_dir,
    join,
    public_context_path,
    read_bytes,
    refusal_path,
    write_bytes,
)
from fusion.release.plan import ReleasePlan, plan_release
from fusion.release.planning import privacy_plan, releases_that_fit
from fusion.store.delta import Store
from fusion.store.ledger import BudgetExceeded
from pipelines.batch import run_batch
from pipelines.release import release
from pipelines.run import run_aggregate, run_contributions, run_unmask
from pipelines.unmask import acknowledge
from privacy import he
from privacy.accountant import skellam_epsilon
from privacy.envelope import (
    MAGIC_V2,
    EnvelopeHeader,
    envelope_header,
    max_envelope_bytes,
    pack_envelope,
    payload_digest,
    unpack_envelope,
)
from privacy.signing import generate_signing_key
from tests.conftest import END, METRICS, START, Federation

pytestmark = pytest.mark.e2e

#: Entity level, where a period's releases compose sequentially (at event level disjoint ones compose in parallel).
ENTITY_LEVEL = 'unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2'


def reference_cells(fed: Federation) -> pa.Table:
    """Count and clamped sum per (metric, region, hour), computed by DuckDB directly on the raw feed files."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sources = []
    for inst in fed.config.institutions:
        feed = inst.feeds[0]
        path = fed.config.resolve(feed.path)
        reader = {
            "parquet": f"read_parquet('{path}')",
            "csv": f"read_csv('{path}', all_varchar=true)",
            "jsonl": f"read_json('{path}', format='newline_delimited', columns={{entity_id: 'VARCHAR', "
            "region: 'VARCHAR', metric: 'VARCHAR', event_time: 'VARCHAR', value: 'DOUBLE'})",
        }
        sources.append(
            f"SELECT metric, region, CAST(event_time AS TIMESTAMPTZ) AS t, CAST(value AS DOUBLE) AS v "
            f"FROM {reader[feed.format.value]}"
        )
    bounds = " UNION ALL ".join(
        f"SELECT '{m}' AS metric, {lo} AS lo, {hi} AS hi" for m, (_, lo, hi, _, _) in METRICS.items()
    )
    return con.sql(f"""
        WITH readings AS ({" UNION ALL ".join(sources)}), bounds AS ({bounds})
        SELECT r.metric, region, time_bucket(INTERVAL 1 HOUR, t) AS window_start,
               count(*)::DOUBLE AS count, sum(least(greatest(v, lo), hi)) AS sum
        FROM readings r JOIN bounds b ON r.metric = b.metric
        GROUP BY ALL ORDER BY ALL
    """).to_arrow_table()


def released_cells(fed: Federation) -> pa.Table:
    con = duckdb.connect()
    con.register("releases", Store(fed.config.store_path).read("releases"))
    return con.sql("SELECT * FROM releases ORDER BY metric, region, window_start").to_arrow_table()


def joined(fed: Federation) -> dict[str, np.ndarray]:
    con = duckdb.connect()
    con.register("ref", reference_cells(fed))
    con.register("rel", released_cells(fed))
    out = con.sql("""
        SELECT rel.*, coalesce(ref.count, 0) AS true_count, coalesce(ref.sum, 0) AS true_sum
        FROM rel LEFT JOIN ref USING (metric, region, window_start)
    """).to_arrow_table()
    return {name: out.column(name).to_numpy(zero_copy_only=False) for name in out.column_names}


def test_noise_off_equals_duckdb_reference(make_federation):
    fed = make_federation(noise=False)
    plan = plan_release(fed.config, START, END)
    summary = run_batch(plan)
    assert summary.status == "released"
    assert summary.cells == plan.layout.cells == len(METRICS) * 3 * 6
    cells = joined(fed)
    assert len(cells["count"]) == plan.layout.cells
    assert (cells["true_count"] > 0).all()
    np.testing.assert_array_equal(cells["count"], cells["true_count"])
    np.testing.assert_allclose(cells["sum"], cells["true_sum"], rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(cells["mean"], cells["true_sum"] / cells["true_count"], rtol=1e-12)
    assert (cells["count_sd"] == 0).all() and (cells["noise"] == "off (test mode)").all()
    for inst, raw in fed.raw.items():
        counts = summary.row_counts[inst]
        assert counts == {"read": raw.num_rows, "accepted": raw.num_rows, "rejected": {}}


def test_noise_on_is_consistent_with_reported_sd(make_federation):
    fed = make_federation(noise=True, seed=11, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_batch(plan)
    cells = joined(fed)
    contributors = len(fed.config.institutions)
    # Each contributor sealed v / (quorum - 1) and removed its excess layers once all three were included: the
    # noise left is the floor, v * n / (n - 1), not the sealed n * v / (quorum - 1).
    variance = contributors * plan.params.total_variance / (contributors - 1)
    assert variance == pytest.approx(plan.params.layers.total(contributors))
    assert plan.params.share_variance == pytest.approx(plan.params.total_variance / (plan.params.quorum - 1))
    weights = {m: e.count_weight for m, e in zip(METRICS, plan.params.encodings, strict=True)}
    units = {m: e.sum_unit() for m, e in zip(METRICS, plan.params.encodings, strict=True)}
    centres = {m: e.centre for m, e in zip(METRICS, plan.params.encodings, strict=True)}
    # The reported noise scale is exactly the calibrated one, in value units.
    np.testing.assert_allclose(cells["count_sd"], [np.sqrt(variance) / weights[m] for m in cells["metric"]])
    # The sum is (centred sum) + centre * count: both slots' independent noise shows in its SD.
    expected_sum_sd = [
        np.hypot(np.sqrt(variance) * units[m], centres[m] * np.sqrt(variance) / weights[m]) for m in cells["metric"]
    ]
    np.testing.assert_allclose(cells["sum_sd"], expected_sum_sd)
    np.testing.assert_allclose(cells["count_ci_high"] - cells["count"], Z95 * cells["count_sd"])
    # `fusion plan` predicted exactly these error bars before anything was spent.
    _, predicted = privacy_plan(fed.config, contributors=contributors)
    by_metric = {row["metric"]: row for row in predicted.to_pylist()}
    np.testing.assert_allclose(cells["count_sd"], [by_metric[m]["count_sd"] for m in cells["metric"]], rtol=1e-12)
    np.testing.assert_allclose(cells["sum_sd"], [by_metric[m]["sum_sd"] for m in cells["metric"]], rtol=1e-12)
    # The noise itself: standardised errors of counts and sums look like N(0, 1).
    z = np.concatenate(
        [
            (cells["count"] - cells["true_count"]) / cells["count_sd"],
            (cells["sum"] - cells["true_sum"]) / cells["sum_sd"],
        ]
    )
    assert not np.allclose(z, 0)
    chi2 = float(np.sum(z**2))
    low, high = stats.chi2.ppf([1e-4, 1 - 1e-4], df=len(z))
    assert low < chi2 < high, f"sum of squared standardised errors {chi2:.1f} outside [{low:.1f}, {high:.1f}]"
    # Seeded noise can be regenerated by anyone holding the config: it is labelled as such and protects nothing.
    assert (cells["noise"] == "skellam (seeded, test mode)").all() and np.isinf(cells["epsilon"]).all()
    assert plan.params.epsilon <= fed.config.privacy.epsilon  # what the same config charges without a seed


def test_rerun_of_an_interval_does_not_duplicate(make_federation):
    fed = make_federation(noise=True)
    plan = plan_release(fed.config, START, END)
    assert run_batch(plan).status == "released"
    before = Store(fed.config.store_path).read("releases").num_rows
    assert run_batch(plan).status == "already_released"
    assert release(plan, Store(fed.config.store_path)).status == "already_released"
    assert Store(fed.config.store_path).read("releases").num_rows == before


def test_a_store_failing_mid_release_stops_the_batch_in_one_line_and_the_next_run_releases_once(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk turns read-only once the institutions have sealed: Delta's error (and its writer's panic) became
    one line naming the store, and the run stops where a kill would; the next run releases what was sealed, once,
    charged once."""
    from deltalake.exceptions import DeltaError
    from deltalake.table import TableMerger

    from fusion.store.failures import StoreUnavailable

    fed = make_federation(noise=True)
    plan = plan_release(fed.config, START, END)
    store = fed.config.store_path

    def read_only(self: TableMerger) -> dict[str, object]:
        raise DeltaError(f"Generic LocalFileSystem error: Unable to open file {store}/budget/part-0.parquet: "
                         "Read-only file system (os error 30)")

    monkeypatch.setattr(TableMerger, "execute", read_only)  # the budget ledger's charge, the release's first write
    with pytest.raises(StoreUnavailable) as raised:
        run_batch(plan)
    assert str(raised.value).startswith(f"the store {store} cannot be used now: Read-only file system (os error 30).")
    assert "\n" not in str(raised.value) and Store(store).read("releases").num_rows == 0
    monkeypatch.undo()
    summary = run_batch(plan)
    assert summary.status == "released" and summary.envelopes == len(fed.config.institutions)
    (budget,) = Store(store).read("budget").to_pylist()
    assert budget["release_ids"] == [plan.key.release_id]
    assert Store(store).read("releases").num_rows == plan.layout.cells


def unmask_and_aggregate(plan: ReleasePlan) -> dict:
    """The unmask round (every pending institution answers the roster), then the aggregator's second run."""
    status = json.loads(read_bytes(aggregation_status_path(plan.config.exchange_path, plan.key)))
    assert status["status"] == "awaiting_unmask", status
    run_unmask(plan, [plan.config.institution(i) for i in status["unmask_pending"]])
    return run_aggregate(plan)


def test_quorum_not_met_is_refused_and_audited(make_federation):
    fed = make_federation(noise=True, quorum=3)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions[:2])
    with pytest.raises(ReleaseRefused, match="quorum"):
        run_aggregate(plan)
    store = Store(fed.config.store_path)
    with pytest.raises(ReleaseRefused, match="quorum"):
        release(plan, store)
    audit = store.read("audit").to_pylist()
    assert [a["action"] for a in audit] == ["release_refused"]
    assert store.read("releases").num_rows == 0


def test_bad_envelopes_are_refused_with_reasons_and_the_rest_released(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    directory = contributions_dir(fed.config.exchange_path, plan.key)
    with open(join(directory, "garbage.fenv"), "wb") as handle:
        handle.write(b"not an envelope")
    # A real header with one field of another JSON type, and a small file claiming a million ciphertexts: both are
    # unreadable (they used to fail the whole aggregation with a TypeError, or inflate gigabytes).
    doc = json.loads(envelope_header(read_bytes(contribution_path(fed.config.exchange_path, plan.key, "alpha")))
                     .to_json())
    typed = {"contributors": [["alpha"]], "payload_sha256": payload_digest([])}  # the payload matches
    for name, changed, count in (("typed.fenv", typed, 0), ("bomb.fenv", {}, 1_000_000)):
        head = json.dumps({**doc, **changed}).encode()
        write_bytes(join(directory, name), MAGIC_V2 + struct.pack(">I", len(head)) + head + struct.pack(">I", count))
    # A file larger than any envelope of this layout is refused unread (sparse here: it costs no disk).
    with open(join(directory, "huge.fenv"), "wb") as handle:
        handle.truncate(max_envelope_bytes(he.ciphertexts_for(plan.layout.slots)) + 1)
    # An envelope from another interval, copied in, is refused as such.
    other = plan_release(fed.config, END, END + (END - START))
    run_contributions(other, fed.config.institutions[:1])
    shutil.copy(contribution_path(fed.config.exchange_path, other.key, "alpha"), join(directory, "alpha-old.fenv"))
    result = run_aggregate(plan)
    reasons = sorted(r["reason"].split(":")[0] for r in result["refused"])
    assert reasons == ["unreadable"] * 4 + ["wrong_interval"]
    (huge,) = [r["reason"] for r in result["refused"] if r["source"].endswith("huge.fenv")]
    assert "more than the" in huge
    assert result["contributors"] == ["alpha", "beta", "gamma"]
    result = unmask_and_aggregate(plan)
    outcome = release(plan, Store(fed.config.store_path))
    assert outcome.status == "released"
    audit = Store(fed.config.store_path).read("audit").to_pylist()
    assert sum(a["action"] == "envelope_refused" for a in audit) == len(result["refused"])


def test_only_the_key_holder_needs_the_secret_key(make_federation, tmp_path):
    fed = make_federation(noise=True)
    plan = plan_release(fed.config, START, END)
    secret = secret_key_file(fed.config)
    hidden = tmp_path / "vault.ctx"
    shutil.move(secret, hidden)  # institutions and the aggregator run without the secret key anywhere
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    unmask_and_aggregate(plan)
    with pytest.raises(FusionError, match="secret key is missing"):
        release(plan, Store(fed.config.store_path))
    shutil.move(hidden, secret)
    secret.chmod(0o644)
    with pytest.raises(FusionError, match="chmod 600"):
        release(plan, Store(fed.config.store_path))
    secret.chmod(0o600)
    assert release(plan, Store(fed.config.store_path)).status == "released"


def test_forged_replayed_and_duplicate_envelopes_are_refused_with_reasons(make_federation):
    fed = make_federation(
        noise=False,
        quorum=1,
        institutions=[("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl"), ("delta", "csv")],
    )
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    exchange = fed.config.exchange_path
    directory = contributions_dir(exchange, plan.key)

    def envelope(institution: str) -> tuple[EnvelopeHeader, list[bytes]]:
        return unpack_envelope(read_bytes(contribution_path(exchange, plan.key, institution)))

    alpha_header, alpha_cts = envelope("alpha")
    beta_header, beta_cts = envelope("beta")
    gamma_header, gamma_cts = envelope("gamma")
    # A replay: an exact copy of alpha's signed envelope under another name. Alpha still counts, once.
    shutil.copy(contribution_path(exchange, plan.key, "alpha"), join(directory, "alpha-copy.fenv"))
    # Beta signs a second, different envelope: ambiguous, so both of beta's are refused.
    beta_key = load_signing_key(fed.config, "beta")
    second = replace(beta_header, nonce="f" * 32)
    write_bytes(join(directory, "beta-second.fenv"), pack_envelope(second, beta_cts, signing_key=beta_key))
    # Gamma's envelope, unsigned; and delta's re-signed by gamma (a forgery under delta's name).
    write_bytes(contribution_path(exchange, plan.key, "gamma"), pack_envelope(gamma_header, gamma_cts))
    delta_header, delta_cts = envelope("delta")
    write_bytes(
        contribution_path(exchange, plan.key, "delta"),
        pack_envelope(delta_header, delta_cts, signing_key=load_signing_key(fed.config, "gamma")),
    )
    # A tampered payload under alpha's valid signature, and an envelope from an institution nobody registered.
    tampered = bytearray(pack_envelope(alpha_header, alpha_cts, signing_key=load_signing_key(fed.config, "alpha")))
    tampered[-10] ^= 0xFF
    write_bytes(join(directory, "alpha-tampered.fenv"), bytes(tampered))
    intruder = replace(alpha_header, contributors=("intruder",))
    write_bytes(
        join(directory, "intruder.fenv"), pack_envelope(intruder, alpha_cts, signing_key=generate_signing_key()[0])
    )

    first = run_aggregate(plan)
    assert sorted((r["institution"], r["reason"]) for r in first["refused"]) == [
        ("", "tampered"),
        ("alpha", "replayed"),
        ("beta", "duplicate"),
        ("beta", "duplicate"),
        ("delta", "bad_signature"),
        ("gamma", "unsigned"),
        ("intruder", "unregistered_institution"),
    ]
    # Only alpha's envelope is valid: the others are declared absent and alpha removes its masks with them.
    assert first["status"] == "awaiting_unmask" and first["absent"] == ["beta", "delta", "gamma"]
    run_unmask(plan, [fed.config.institution("alpha")])
    result = run_aggregate(plan)
    assert result["status"] == "aggregated" and result["contributors"] == ["alpha"]
    reasons = sorted((r["institution"], r["reason"]) for r in result["refused"])
    # Beta's envelopes now come from an institution declared absent: refused as such, whatever they hold.
    assert ("beta", "declared_absent") in reasons and ("alpha", "replayed") in reasons
    outcome = release(plan, Store(fed.config.store_path))
    assert outcome.contributors == ("alpha",)
    audit = Store(fed.config.store_path).read("audit").to_pylist()
    assert sorted(a["reason"] for a in audit if a["action"] == "envelope_refused") == sorted(r for _, r in reasons)
    # Every mask cancelled: the released counts are exactly alpha's (noise is off).
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == fed.raw["alpha"].num_rows


def test_envelopes_under_another_public_context_are_refused(make_federation):
    fed = make_federation(noise=True, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    create_keys(fed.config, overwrite=True)  # the key holder rotates its keys after the institutions sealed
    with pytest.raises(ReleaseRefused, match="quorum"):
        run_aggregate(plan)
    refusal = json.loads(read_bytes(refusal_path(fed.config.exchange_path, plan.key)))
    assert sorted(r["reason"] for r in refusal["refused"]) == ["wrong_he_context"] * 3


def test_an_envelope_with_unreadable_ciphertexts_is_refused_not_fatal(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    path = contribution_path(fed.config.exchange_path, plan.key, "gamma")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    bogus = [b"\x00" * 64 for _ in ciphertexts]  # consistent with its (signed) header, but not ciphertexts
    write_bytes(path, pack_envelope(header, bogus, signing_key=load_signing_key(fed.config, "gamma")))
    result = run_aggregate(plan)
    assert result["contributors"] == ["alpha", "beta"]
    assert [r["reason"] for r in result["refused"]] == ["unreadable_ciphertext"]


def test_a_ciphertext_of_another_size_is_refused_before_the_roster_closes_on_it(make_federation):
    """A valid ciphertext of the federation's context but fewer slots than its place: it loaded, passed, and
    stopped the sum of every envelope once the roster had closed on it (no release of the interval, ever)."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    path = contribution_path(fed.config.exchange_path, plan.key, "gamma")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    context = he.load_public_context(read_bytes(public_context_path(fed.config.exchange_path)))
    short = he.encrypt_vector(context, np.arange(7, dtype=np.int64))
    write_bytes(path, pack_envelope(header, short + ciphertexts[1:], signing_key=load_signing_key(fed.config, "gamma")))
    result = run_aggregate(plan)
    assert result["contributors"] == ["alpha", "beta"]
    assert [(r["institution"], r["reason"]) for r in result["refused"]] == [("gamma", "wrong_layout")]
    if result["status"] == "awaiting_unmask":
        run_unmask(plan, [i for i in fed.config.institutions if i.id in result["unmask_pending"]])
        assert run_aggregate(plan)["status"] == "aggregated"
    assert release(plan, Store(fed.config.store_path)).status == "released"


@pytest.mark.parametrize("claimed", [-1e15, float("nan"), float("inf"), 0.0, 1e12])
def test_a_contribution_claiming_another_noise_variance_is_refused(make_federation, claimed):
    """Each contribution states the variance it sealed, and the aggregate sums them for the key holder's error bars
    and its plausibility check: negative, the decode failed after the budget was charged; NaN switched the check
    off; zero or huge, the error bars were wrong. A contribution must state the plan's share."""
    fed = make_federation(noise=True, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    path = contribution_path(fed.config.exchange_path, plan.key, "gamma")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    forged = replace(header, noise_variance=claimed)
    write_bytes(path, pack_envelope(forged, ciphertexts, signing_key=load_signing_key(fed.config, "gamma")))
    result = run_aggregate(plan)
    assert [(r["institution"], r["reason"]) for r in result["refused"]] == [("gamma", "wrong_noise_variance")]
    assert result["contributors"] == ["alpha", "beta"]


def test_the_key_holder_refuses_an_aggregate_stating_an_impossible_noise_variance(make_federation):
    from pipelines.release import _check_noise_variance

    fed = make_federation(noise=True, quorum=2)
    plan = plan_release(fed.config, START, END)
    v, share = plan.params.total_variance, plan.params.share_variance
    three = ("alpha", "beta", "gamma")
    header = plan.envelope_header(kind="aggregate", contributors=three, noise_variance=3 * share,
                                  context_sha256="0" * 64, reject_counts={})
    _check_noise_variance(plan, header)  # nothing removed
    _check_noise_variance(plan, replace(header, noise_variance=v))  # the floor
    for variance in (float("nan"), -1.0, 0.0, v / 2, 3 * share * 1.01):
        with pytest.raises(ReleaseRefused, match="noise variance"):
            _check_noise_variance(plan, replace(header, noise_variance=variance))


def inverse_cdf(values: list[float], q: float) -> float:
    """The smallest value v with (readings <= v) / n >= q: the quantile a histogram's CDF crossing brackets."""
    ordered = sorted(values)
    return ordered[max(0, int(np.ceil(q * len(ordered) - 1e-9)) - 1)]


def test_stddev_and_quantiles_with_noise_off_match_duckdb(make_federation):
    fed = make_federation(noise=False, statistics="variance = true\nquantiles = true\nhistogram_bins = 20")
    plan = plan_release(fed.config, START, END)
    assert run_batch(plan).status == "released"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    raw = pa.concat_tables([t.select(["metric", "region", "event_time", "value"]) for t in fed.raw.values()])
    con.register("raw", raw)
    bounds = " UNION ALL ".join(
        f"SELECT '{m}' AS metric, {lo} AS lo, {hi} AS hi" for m, (_, lo, hi, _, _) in METRICS.items()
    )
    reference = con.sql(f"""
        WITH b AS ({bounds})
        SELECT raw.metric, region, time_bucket(INTERVAL 1 HOUR, event_time) AS window_start,
               stddev_pop(least(greatest(value, lo), hi)) AS sd, list(least(greatest(value, lo), hi)) AS vs
        FROM raw JOIN b ON raw.metric = b.metric GROUP BY ALL
    """).to_arrow_table()
    con.register("ref", reference)
    con.register("rel", released_cells(fed))
    rows = (
        con.sql("SELECT rel.*, ref.sd, ref.vs FROM rel JOIN ref USING (metric, region, window_start)")
        .to_arrow_table()
        .to_pylist()
    )
    assert len(rows) == plan.layout.cells
    for row in rows:
        encoding = plan.params.encodings[list(METRICS).index(row["metric"])]
        # Squares are kept at 1/w of the SUM's resolution: each reading's rounding moves the variance by at most
        # w * unit^2 / 2 (worst case; on average the errors cancel).
        tolerance = encoding.count_weight * encoding.sum_unit() ** 2 / 2
        assert abs(row["stddev"] ** 2 - row["sd"] ** 2) <= tolerance, row
        width = (encoding.upper - encoding.lower) / 20
        for name, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9)):
            truth = inverse_cdf(row["vs"], q)
            assert row[f"{name}_ci_low"] <= truth <= row[f"{name}_ci_high"], (name, truth, row)
            assert abs(row[name] - truth) <= width, (name, truth, row)
        assert row["p10"] <= row["median"] <= row["p90"]


def test_the_plan_counts_the_releases_a_period_admits(make_federation):
    fed = make_federation(noise=True)  # event level: releases of disjoint intervals compose in parallel
    assert releases_that_fit(plan_release(fed.config, START, END).params, 1.0) is None
    fed = make_federation(noise=True, subdir="entity", extra_privacy=ENTITY_LEVEL)  # sequential
    params = plan_release(fed.config, START, END).params
    assert releases_that_fit(params, params.epsilon) == 1
    k = releases_that_fit(params, 3.0)
    assert k is not None and params.mechanism is not None
    assert skellam_epsilon([params.mechanism] * k, delta=params.delta) <= 3.0
    assert skellam_epsilon([params.mechanism] * (k + 1), delta=params.delta) > 3.0


def test_the_plan_says_when_a_release_needs_more_contributions_than_the_quorum(make_federation):
    """Five institutions, quorum 3, c = 0: each sealed share is v / 2, so the unmask round needs 4 signatures on
    one roster (no two rosters both answered), and a release with only the quorum is refused: `fusion plan` says so."""
    five = [("alpha", "csv"), ("beta", "csv"), ("gamma", "csv"), ("delta", "csv"), ("epsilon", "csv")]
    plan, _ = privacy_plan(make_federation(noise=True, quorum=3, institutions=five, entities=3).config)
    assert (plan.quorum, plan.roster_signatures) == (3, 4)
    assert plan.fewest_contributors.startswith("a release needs 4 contributions, not the quorum of 3")
    plan, _ = privacy_plan(make_federation(noise=True, quorum=4, institutions=five, entities=3, subdir="q4").config)
    assert plan.fewest_contributors == "a release needs the quorum, 4 contributions"


def test_a_release_past_the_period_cap_is_refused_before_any_work(make_federation):
    # Entity level (releases compose sequentially), and the cap defaults to epsilon: one release per day.
    fed = make_federation(noise=True, extra_privacy=ENTITY_LEVEL)
    first = plan_release(fed.config, START, END)
    assert run_batch(first).status == "released"
    second = plan_release(fed.config, END, END + (END - START))  # the same UTC day
    with pytest.raises(BudgetExceeded, match=r"needs epsilon .* is left"):
        run_batch(second)
    store = Store(fed.config.store_path)
    refusals = [a for a in store.read("audit").to_pylist() if a["action"] == "budget_refused"]
    assert len(refusals) == 1 and refusals[0]["release_id"] == second.key.release_id
    assert not (fed.directory / "exchange" / second.key.interval_name).exists()  # nothing was contributed
    budget = store.read("budget").to_pylist()
    assert budget[0]["releases"] == 1 and budget[0]["epsilon_spent"] <= fed.config.privacy.cap


FOUR = [("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl"), ("delta", "csv")]
FIVE = [*FOUR, ("epsilon", "parquet")]  # two may be missing: 3 of 5 still sign one roster (more than 5 / 2)


@pytest.mark.parametrize("missing", [1, 2])
def test_the_recovery_round_releases_the_exact_sum_of_those_present(make_federation, missing):
    fed = make_federation(noise=False, quorum=2, institutions=FIVE)
    plan = plan_release(fed.config, START, END)
    present = list(fed.config.institutions[: len(FIVE) - missing])
    absent = sorted(i.id for i in fed.config.institutions[len(FIVE) - missing :])
    run_contributions(plan, present)
    status = run_aggregate(plan)
    assert status["status"] == "awaiting_unmask" and status["absent"] == absent
    run_unmask(plan, present)
    assert run_aggregate(plan)["status"] == "aggregated"
    # An absent institution's envelope arriving late is refused: its masks keep it unreadable.
    run_contributions(plan, [fed.config.institution(a) for a in absent])
    late = run_aggregate(plan)
    assert late["status"] == "aggregated"
    assert sorted(r["reason"] for r in late["refused"]) == ["declared_absent"] * missing
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(fed.raw[i.id].num_rows for i in present)


def test_survivors_dropping_out_during_the_round_do_not_stall_a_release_with_institutions_absent(make_federation):
    """epsilon never contributes; of the four included, gamma acknowledges the roster and then drops out, delta
    never shows up. The answers of alpha and beta (quorum 2) reveal every seed and every mask key held with
    epsilon, so the aggregator removes all the masks itself and releases the exact sum of all four."""
    fed = make_federation(noise=False, quorum=2, institutions=FIVE)
    plan = plan_release(fed.config, START, END)
    present = list(fed.config.institutions[:4])
    run_contributions(plan, present)
    assert run_aggregate(plan)["absent"] == ["epsilon"]
    acknowledge(plan, "gamma")  # gamma signs, then is gone
    answers = run_unmask(plan, present[:2])
    assert all(a.path for a in answers) and answers[0].acknowledged == ("alpha", "beta", "gamma")
    status = run_aggregate(plan)
    assert status["status"] == "aggregated", status
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(fed.raw[i.id].num_rows for i in present)


def test_a_single_decrypted_envelope_is_indistinguishable_from_uniform(make_federation):
    """Even the key holder colluding with the aggregator learns nothing from one institution's envelope."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    _, ciphertexts = unpack_envelope(read_bytes(contribution_path(fed.config.exchange_path, plan.key, "beta")))
    secret = he.load_secret_context(load_secret_context_bytes(fed.config))
    values = he.decrypt_vector(secret, ciphertexts, plan.layout.slots).astype(np.float64)
    residues = (values % he.PLAIN_MODULUS) / he.PLAIN_MODULUS
    # 72 slots. Under uniformity the p-value is uniform, so a threshold of 1e-4 failed one run in 10,000 (it did,
    # once, at p = 1.7e-5; 400 reruns gave uniform p-values, the lowest 0.0024). Unmasked slots put their
    # residues next to 0 or 1: a third of them takes the p-value below 1e-6 (300 trials: at most 1.2e-7), and
    # the median check catches a vector left unmasked. (Mask uniformity itself: large samples in tests/privacy.)
    assert stats.kstest(residues, "uniform").pvalue > 1e-6
    # Unmasked, the same slots would be small counts and sums: nowhere near uniform mod t.
    assert np.median(np.abs(values)) > he.PLAIN_MODULUS / 8


def test_validly_signed_envelopes_for_another_layout_or_parameters_are_refused(make_federation):
    fed = make_federation(noise=False, quorum=1)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    exchange = fed.config.exchange_path
    for institution, field, value in (("beta", "layout_digest", "0" * 64), ("gamma", "parameters_digest", "1" * 64)):
        path = contribution_path(exchange, plan.key, institution)
        header, ciphertexts = unpack_envelope(read_bytes(path))
        forged = replace(header, **{field: value})
        write_bytes(path, pack_envelope(forged, ciphertexts, signing_key=load_signing_key(fed.config, institution)))
    first = run_aggregate(plan)
    assert sorted((r["institution"], r["reason"]) for r in first["refused"]) == [
        ("beta", "wrong_layout"),
        ("gamma", "wrong_parameters"),
    ]

"""Arrow schemas of the common-knowledge store's tables: a public contract, documented in the README."""

from __future__ import annotations

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

#: One row per released cell (metric x region x window). All statistics are noisy; every one carries its
#: noise standard deviation and a 95% interval. Columns added after a store was created (mean_sd, ratio_mean)
#: are nullable, and fusion/store.py adds them to an older table (NULL in its earlier rows).
RELEASES_SCHEMA = pa.schema(
    [
        pa.field("release_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        pa.field("contributors", pa.int32(), nullable=False),
        pa.field("count", pa.float64(), nullable=False),
        pa.field("count_sd", pa.float64(), nullable=False),
        pa.field("count_ci_low", pa.float64(), nullable=False),
        pa.field("count_ci_high", pa.float64(), nullable=False),
        pa.field("sum", pa.float64(), nullable=False),
        pa.field("sum_sd", pa.float64(), nullable=False),
        pa.field("sum_ci_low", pa.float64(), nullable=False),
        pa.field("sum_ci_high", pa.float64(), nullable=False),
        pa.field("mean", pa.float64(), nullable=True),
        pa.field("mean_ci_low", pa.float64(), nullable=True),
        pa.field("mean_ci_high", pa.float64(), nullable=True),
        # The unclipped ratio centre + centred sum / count and its delta-method SD (NULL with the mean), so models
        # can weight cells by their noise: var = (centred_sd^2 + (ratio - centre)^2 count_sd^2) / count^2.
        pa.field("mean_sd", pa.float64(), nullable=True),
        pa.field("ratio_mean", pa.float64(), nullable=True),
        pa.field("stddev", pa.float64(), nullable=True),
        pa.field("stddev_ci_low", pa.float64(), nullable=True),
        pa.field("stddev_ci_high", pa.float64(), nullable=True),
        pa.field("p10", pa.float64(), nullable=True),
        pa.field("p10_ci_low", pa.float64(), nullable=True),
        pa.field("p10_ci_high", pa.float64(), nullable=True),
        pa.field("median", pa.float64(), nullable=True),
        pa.field("median_ci_low", pa.float64(), nullable=True),
        pa.field("median_ci_high", pa.float64(), nullable=True),
        pa.field("p90", pa.float64(), nullable=True),
        pa.field("p90_ci_low", pa.float64(), nullable=True),
        pa.field("p90_ci_high", pa.float64(), nullable=True),
        pa.field("epsilon", pa.float64(), nullable=False),
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("noise", pa.string(), nullable=False),
        pa.field("released_at", _TS, nullable=False),
    ]
)

#: Every run, release, refusal and rejected envelope.
AUDIT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("at", _TS, nullable=False),
        pa.field("actor_role", pa.string(), nullable=False),
        pa.field("actor", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("release_id", pa.string(), nullable=True),
        pa.field("interval_start", _TS, nullable=True),
        pa.field("interval_end", _TS, nullable=True),
        pa.field("reason", pa.string(), nullable=True),
        pa.field("content_sha256", pa.string(), nullable=True),
        pa.field("detail", pa.string(), nullable=True),
    ]
)

#: Per release, institution and published reason (schemas.reasons.PUBLISHED_REASONS), the NOISY number of rows
#: rejected: a tally slot of the release's own vector, charged with it, with its noise sd and 95% interval like
#: every other count (fusion/rejects.py). Exact counts, and the rows themselves, stay with each institution.
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("release_id", pa.string(), nullable=False),
        pa.field("institution", pa.string(), nullable=False),
        pa.field("interval_start", _TS, nullable=False),
        pa.field("interval_end", _TS, nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("count", pa.float64(), nullable=True),
        pa.field("count_sd", pa.float64(), nullable=True),
        pa.field("count_ci_low", pa.float64(), nullable=True),
        pa.field("count_ci_high", pa.float64(), nullable=True),
        pa.field("recorded_at", _TS, nullable=False),
    ]
)

#: The budget ledger: one row per privacy period, updated in place (a compare-and-swap on `releases`).
#: `epsilon_spent` is the PLD epsilon of the period's releases composed as `composition` says: "parallel" (event
#: level: the worst instant's releases) or "sequential" (entity level). `mechanisms` holds, per release (in the
#: order of `release_ids`), its interval and Skellam mechanism (total variance on every slot; a privacy unit moves
#: at most `coordinates` slots by `shift` integer units each; NULL variance: noise off, test mode, charged
#: nothing). `rdp` is the Renyi-DP curve of the same composition at the accountant's orders and `epsilon_rdp` its
#: conversion, a looser bound that `epsilon_spent` never exceeds. Rows written before these three columns existed
#: hold NULL there: their RDP curves add (sequentially) and `epsilon_spent` is the curve's conversion.
BUDGET_MECHANISM = pa.struct(
    [
        pa.field("interval_start", _TS),
        pa.field("interval_end", _TS),
        pa.field("variance", pa.float64()),
        pa.field("coordinates", pa.int64()),
        pa.field("shift", pa.int64()),
    ]
)
BUDGET_SCHEMA = pa.schema(
    [
        pa.field("period", pa.string(), nullable=False),
        pa.field("period_start", _TS, nullable=False),
        pa.field("period_end", _TS, nullable=False),
        pa.field("epsilon_cap", pa.float64(), nullable=False),
        pa.field("epsilon_spent", pa.float64(), nullable=False),
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("releases", pa.int64(), nullable=False),
        pa.field("release_ids", pa.list_(pa.string()), nullable=False),
        pa.field("aggregates", pa.list_(pa.string()), nullable=False),
        pa.field("rdp", pa.list_(pa.float64()), nullable=False),
        pa.field("updated_at", _TS, nullable=False),
        pa.field("composition", pa.string(), nullable=True),
        pa.field("mechanisms", pa.list_(BUDGET_MECHANISM), nullable=True),
        pa.field("epsilon_rdp", pa.float64(), nullable=True),
    ]
)

#: Every attempt of a scheduled or backfilled batch run. An attempt's claim row (`run_id` =
#: pipeline/interval_start/attempt, status `running` until `lease_until`) is inserted conditionally, so only one
#: runner holds it, and is updated with the outcome when the attempt ends. A runner that loses the claim records
#: its own `skipped` row (`run_id` + "/" + runner). `rows` is the release's noisy total count (covered by
#: epsilon): exact row counts never leave the institutions. `host`, `pid` and `process_started` (on Linux
#: "<boot id>/<pid namespace>/<start ticks>") name the runner's process, so a claim whose process is provably
#: gone is taken over at once (fusion/runner_process.py); NULL in rows written before they were recorded.
RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("pipeline", pa.string(), nullable=False),
        pa.field("interval_start", _TS, nullable=False),
        pa.field("interval_end", _TS, nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("runner", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("started", _TS, nullable=False),
        pa.field("finished", _TS, nullable=True),
        pa.field("lease_until", _TS, nullable=False),
        pa.field("release_id", pa.string(), nullable=True),
        pa.field("rows", pa.int64(), nullable=True),
        pa.field("cells", pa.int64(), nullable=True),
        pa.field("epsilon", pa.float64(), nullable=True),
        pa.field("error", pa.string(), nullable=True),
        pa.field("host", pa.string(), nullable=True),
        pa.field("pid", pa.int64(), nullable=True),
        pa.field("process_started", pa.string(), nullable=True),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "budget": BUDGET_SCHEMA,
    "releases": RELEASES_SCHEMA,
    "audit": AUDIT_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "runs": RUNS_SCHEMA,
}

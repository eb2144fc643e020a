"""Arrow schemas of the common-knowledge store's tables: a public contract, documented in docs/reference/store.md."""

from __future__ import annotations

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

#: One row per released cell (metric x region x window). All statistics are noisy; every one carries its
#: noise standard deviation and a 95% interval. Columns added after a store was created (mean_sd, ratio_mean,
#: variance, variance_sd) are nullable, and fusion/store/delta.py adds them to an older table (NULL in its earlier
#: rows).
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
        # The readings' variance, signed (negative where the noise drew it below zero: never clipped, so averages
        # over cells are unbiased) and its delta-method SD; released wherever the mean is, with the sum of squares.
        pa.field("variance", pa.float64(), nullable=True),
        pa.field("variance_sd", pa.float64(), nullable=True),
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
#: every other count (fusion/release/rejects.py). Exact counts, and the rows themselves, stay with each institution.
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
NORM_BOUND = pa.struct([pa.field("l1", pa.float64()), pa.field("l2", pa.float64())])
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
        # Per mechanism (NULL entries: the per-slot shape): the L1 and L2 norm bounds of a training round's
        # mechanism (privacy.accountant.NormBoundMechanism), accounted by RDP alone. NULL in rows without one.
        pa.field("norm_bounds", pa.list_(NORM_BOUND), nullable=True),
    ]
)

#: Every attempt of a scheduled or backfilled batch run. An attempt's claim row (`run_id` =
#: pipeline/interval_start/attempt, status `running` until `lease_until`) is inserted conditionally, so only one
#: runner holds it, and is updated with the outcome when the attempt ends. A runner that loses the claim records
#: its own `skipped` row (`run_id` + "/" + runner). `rows` is the release's noisy total count (covered by
#: epsilon): exact row counts never leave the institutions. `host`, `pid` and `process_started` (on Linux
#: "<boot id>/<pid namespace>/<start ticks>") name the runner's process, so a claim whose process is provably
#: gone is taken over at once (fusion/runtime/runner_process.py); NULL in rows written before they were recorded.
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

#: Forecasts of released series (forecasting/), post-processing of the releases: they spend no budget. One row per
#: forecast window: `forecast_id` names one model's forecast of one series (metric, statistic, region) from one
#: origin, issued by `fusion forecast` (purpose "forecast") or, for each rolling origin and model, by `fusion
#: backtest` ("backtest"). `sd` and the ci bounds are of the true value; the release_ bounds of the next noisy
#: release (the true value's spread plus the expected noise `noise_sd` of a future cell), both scaled by
#: `calibration_factor` (learned on earlier backtest origins; 1 before any backtest).
FORECASTS_SCHEMA = pa.schema(
    [
        pa.field("forecast_id", pa.string(), nullable=False),
        pa.field("purpose", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("params", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("statistic", pa.string(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("issued_at", _TS, nullable=False),
        pa.field("origin", _TS, nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        pa.field("horizon", pa.int32(), nullable=False),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("sd", pa.float64(), nullable=False),
        pa.field("ci80_low", pa.float64(), nullable=False),
        pa.field("ci80_high", pa.float64(), nullable=False),
        pa.field("ci95_low", pa.float64(), nullable=False),
        pa.field("ci95_high", pa.float64(), nullable=False),
        pa.field("noise_sd", pa.float64(), nullable=False),
        pa.field("release_sd", pa.float64(), nullable=False),
        pa.field("release_ci80_low", pa.float64(), nullable=False),
        pa.field("release_ci80_high", pa.float64(), nullable=False),
        pa.field("release_ci95_low", pa.float64(), nullable=False),
        pa.field("release_ci95_high", pa.float64(), nullable=False),
        pa.field("calibration_factor", pa.float64(), nullable=False),
        pa.field("mase_scale", pa.float64(), nullable=True),
        pa.field("releases_version", pa.int64(), nullable=False),
        pa.field("input_release_ids", pa.list_(pa.string()), nullable=False),
    ]
)

#: Each forecast window scored once its release has landed: the released value (NULL where the cell was withheld),
#: its noise SD, the error, z = error / release_sd and whether the release intervals held it. Backtest forecasts
#: are scored as they are issued (their windows are released already).
FORECAST_SCORES_SCHEMA = pa.schema(
    [
        pa.field("forecast_id", pa.string(), nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("purpose", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("statistic", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("origin", _TS, nullable=False),
        pa.field("horizon", pa.int32(), nullable=False),
        pa.field("release_id", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=True),
        pa.field("noise_sd", pa.float64(), nullable=True),
        pa.field("error", pa.float64(), nullable=True),
        pa.field("scaled_error", pa.float64(), nullable=True),
        pa.field("z", pa.float64(), nullable=True),
        pa.field("covered80", pa.bool_(), nullable=True),
        pa.field("covered95", pa.bool_(), nullable=True),
        pa.field("scored_at", _TS, nullable=False),
        pa.field("releases_version", pa.int64(), nullable=False),
    ]
)

#: Recommendations of the mechanisms (mechanisms/): advisory only, never executed by Fusion (`binding` is always
#: false). Append-only, one row per item in long form (item_type, item_key, value, unit: dispatch MW, LMP and its
#: energy and congestion parts, shadow prices, payments, frontier points, objectives), each row repeating its
#: recommendation's header. `recommendation_id` is the first 32 hex digits of `digest`, the SHA-256 of the
#: content (header and items; mechanisms/records.py), which `fusion recommend --replay` recomputes from the store
#: versions in `inputs`. `signature`: the mechanisms operator's Ed25519 signature over the id, digest, supersedes,
#: created_at and signer. A refused attempt (an infeasible network, a load missing for a bus) is recorded too,
#: `outcome` = 'refused' with the `refusal`, and no items beyond one `refusal` row.
RECOMMENDATIONS_SCHEMA = pa.schema(
    [
        pa.field("recommendation_id", pa.string(), nullable=False),
        pa.field("digest", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("mechanism", pa.string(), nullable=False),
        pa.field("mechanism_version", pa.string(), nullable=False),
        pa.field("created_at", _TS, nullable=False),
        pa.field("valid_from", _TS, nullable=False),
        pa.field("valid_to", _TS, nullable=False),
        pa.field("regions", pa.list_(pa.string()), nullable=False),
        pa.field("inputs", pa.string(), nullable=False),
        pa.field("parameters", pa.string(), nullable=False),
        pa.field("summary", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("refusal", pa.string(), nullable=True),
        pa.field("item_type", pa.string(), nullable=False),
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=True),
        pa.field("unit", pa.string(), nullable=True),
        pa.field("supersedes", pa.string(), nullable=True),
        pa.field("binding", pa.bool_(), nullable=False),
        pa.field("signer", pa.string(), nullable=False),
        pa.field("signature", pa.string(), nullable=False),
    ]
)

#: Decisions on recommendations by authorities registered in the registry (`[[authorities]]`: public keys, scope
#: of regions and kinds, and a k-of-n threshold): one row per signer, so a decision needing k signatures is
#: effective once k of its authority's signers have signed the same `decision_id` (a hash of its content). An
#: override carries the adopted items (the MW it fixes, or the frontier point chosen), the MW it moves and its cost
#: impact found by re-solving the recommendation's problem with it fixed. A refused attempt (no reason code, an
#: unregistered or out-of-scope key, a tampered or superseded recommendation) is recorded with `outcome` =
#: 'refused' and never counts.
DECISION_ITEM = pa.struct(
    [
        pa.field("item_key", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("unit", pa.string()),
    ]
)
DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("recommendation_id", pa.string(), nullable=False),
        pa.field("recommendation_sha256", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("authority", pa.string(), nullable=False),
        pa.field("signer", pa.string(), nullable=False),
        pa.field("signer_key", pa.string(), nullable=False),
        pa.field("decided_at", _TS, nullable=False),
        pa.field("effective_from", _TS, nullable=True),
        pa.field("effective_to", _TS, nullable=True),
        pa.field("reason_code", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=True),
        pa.field("adopted", pa.list_(DECISION_ITEM), nullable=False),
        pa.field("deviation_mw", pa.float64(), nullable=True),
        pa.field("cost_impact", pa.float64(), nullable=True),
        pa.field("previous_decision_id", pa.string(), nullable=True),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("refusal", pa.string(), nullable=True),
        pa.field("signature", pa.string(), nullable=False),
    ]
)

#: Models trained across institutions (training/), one row per committed round: the flat float32 parameters after
#: it (public to the federation), what the round released (its id, the SHA-256 of each contribution envelope and
#: of the aggregate the ledger charged) and cost: `noise_variance` is the total Skellam variance in the sum,
#: `calibrated_variance` the part no admissible coalition knows (v), `epsilon` the whole run's so far (every charge
#: its rounds made, an attempt lost in a crash and drawn anew included).
MODELS_SCHEMA = pa.schema(
    [
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("settings_sha256", pa.string(), nullable=False),
        pa.field("parameters", pa.list_(pa.float32()), nullable=False),
        pa.field("parameters_sha256", pa.string(), nullable=False),
        pa.field("clip", pa.float64(), nullable=False),
        pa.field("scale", pa.float64(), nullable=False),
        pa.field("learning_rate", pa.float64(), nullable=False),
        pa.field("noise_variance", pa.float64(), nullable=False),
        pa.field("calibrated_variance", pa.float64(), nullable=False),
        pa.field("epsilon", pa.float64(), nullable=False),
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("contributors", pa.list_(pa.string()), nullable=False),
        pa.field("count_estimate", pa.float64(), nullable=False),
        pa.field("release_id", pa.string(), nullable=False),
        pa.field("envelope_digests", pa.list_(pa.string()), nullable=False),  # "institution:sha256"
        pa.field("aggregate_sha256", pa.string(), nullable=False),
        pa.field("held_out_accuracy", pa.float64(), nullable=True),
        pa.field("velocity", pa.list_(pa.float32()), nullable=True),  # the momentum, to resume (NULL: none)
        pa.field("committed_at", _TS, nullable=False),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "budget": BUDGET_SCHEMA,
    "releases": RELEASES_SCHEMA,
    "audit": AUDIT_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "runs": RUNS_SCHEMA,
    "forecasts": FORECASTS_SCHEMA,
    "forecast_scores": FORECAST_SCORES_SCHEMA,
    "recommendations": RECOMMENDATIONS_SCHEMA,
    "decisions": DECISIONS_SCHEMA,
    "models": MODELS_SCHEMA,
}

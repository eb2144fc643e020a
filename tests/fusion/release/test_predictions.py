"""`fusion plan`'s predictions against what decoding reports: exact for counts, sums and means, the stddev's against
its spread over noise draws, and the quantiles' reproducible."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from fusion.config.parameters import ReleaseParameters
from fusion.release.estimates import decode_release
from fusion.release.predictions import READINGS, metric_noise, noise_table, predicted_noise
from privacy.accountant import calibrate_variance
from privacy.encoding import balanced_encodings, encode_readings, encode_squares, event_level_sensitivity
from privacy.layout import PartitionLayout
from privacy.skellam import SkellamNoise, seeded_generator

START = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
ENCODINGS = tuple(balanced_encodings([(-20.0, 40.0, 0.1), (0.0, 500.0, 1.0)]))


def parameters(epsilon: float = 1.0) -> ReleaseParameters:
    sensitivity = event_level_sensitivity(list(ENCODINGS), components=3)
    variance = calibrate_variance(epsilon=epsilon, delta=1e-6, l1=sensitivity.l1, l2=sensitivity.l2)
    return ReleaseParameters(encodings=ENCODINGS, sensitivity=sensitivity, total_variance=variance, quorum=1,
                             epsilon=epsilon, delta=1e-6, noise=True)


def test_count_sum_and_mean_predictions_are_the_decoded_sds() -> None:
    """A mean at the clamp range's centre from n readings: decode_release reports exactly the predicted SDs."""
    params = parameters()
    layout = PartitionLayout.for_interval(("temp", "load"), ("r",), START, START + 3 * HOUR, HOUR,
                                          ("count", "sum", "sumsq"))
    totals = np.zeros(layout.slots, dtype=np.int64)
    metric_idx, _, window_idx = layout.cell_coordinates()
    weights = np.array([e.count_weight for e in ENCODINGS])[metric_idx]
    layout.block(totals, "count")[:] = np.array(READINGS)[window_idx] * weights  # window w holds READINGS[w]
    table = decode_release(totals, layout=layout, params=params, units=("degC", "kW"),
                           noise_variance=params.total_variance, contributors=1, release_id="r", released_at=START)
    predicted = predicted_noise(ENCODINGS, noise_variance=params.total_variance, variance=True, quantiles=False,
                                bins=16)
    for row, m, w in zip(table.to_pylist(), metric_idx, window_idx, strict=True):
        p = predicted[m]
        assert row["count_sd"] == pytest.approx(p["count_sd"], rel=1e-12)
        assert row["sum_sd"] == pytest.approx(p["sum_sd"], rel=1e-12)
        assert row["count_ci_high"] - row["count"] == pytest.approx(p["count_ci_halfwidth"], rel=1e-12)
        assert row["mean_sd"] == pytest.approx(p[f"mean_sd_n{READINGS[w]}"], rel=1e-12)


def load_cells(values: np.ndarray, cells: int, params: ReleaseParameters, *, seed: int) -> pa.Table:
    """A release of `cells` hourly windows of temp and load: every load cell holds `values` (its rows are the last
    `cells`), temp's stay empty; every slot noised with the parameters' variance (test-seeded)."""
    weight, centred = encode_readings(values, np.ones(values.size, dtype=np.int64), ENCODINGS)
    exact = np.array([weight.sum(), centred.sum(), encode_squares(centred, weight).sum()])
    layout = PartitionLayout.for_interval(("temp", "load"), ("r",), START, START + cells * HOUR, HOUR,
                                          ("count", "sum", "sumsq"))
    totals = np.zeros(layout.slots, dtype=np.int64)
    for k, component in enumerate(("count", "sum", "sumsq")):
        layout.block(totals, component)[cells:] = exact[k]
    totals += SkellamNoise(params.total_variance, generator=seeded_generator(seed)).sample(layout.slots)
    return decode_release(totals, layout=layout, params=params, units=("degC", "kW"),
                          noise_variance=params.total_variance, contributors=1, release_id="r", released_at=START)


def test_the_stddev_prediction_matches_its_spread_over_noise_draws() -> None:
    """10,000 readings normal around the centre with SD a quarter of the range (the prediction's assumptions):
    over 400 noise draws the stddev's SD is the predicted one and its reported half-width the predicted one,
    each within 10%."""
    params = parameters(epsilon=4.0)
    encoding = ENCODINGS[1]  # load, [0, 500] kW
    n = 10_000
    values = np.clip(np.round(np.random.default_rng(2).normal(250.0, 125.0, n)), 0, 500)
    draws = 400
    table = load_cells(values, draws, params, seed=4)
    stddev = np.array(table.column("stddev").to_pylist()[draws:], dtype=float)
    half = (np.array(table.column("stddev_ci_high").to_pylist()[draws:], dtype=float)
            - np.array(table.column("stddev_ci_low").to_pylist()[draws:], dtype=float)) / 2
    predicted = metric_noise(encoding, noise_variance=params.total_variance, variance=True, quantiles=False, bins=16)
    assert np.std(stddev) == pytest.approx(predicted[f"stddev_sd_n{n}"], rel=0.1)
    assert np.median(half) == pytest.approx(predicted[f"stddev_ci_halfwidth_n{n}"], rel=0.1)


def test_quantile_predictions_are_reproducible_and_shrink_with_more_readings() -> None:
    params = parameters(epsilon=1.0)
    first = metric_noise(ENCODINGS[0], noise_variance=params.total_variance, variance=False, quantiles=True, bins=16)
    again = metric_noise(ENCODINGS[0], noise_variance=params.total_variance, variance=False, quantiles=True, bins=16)
    assert first == again  # seeded simulation: the same plan prints the same numbers
    for name in ("p10", "median", "p90"):
        widths = [first[f"{name}_ci_halfwidth_n{n}"] for n in READINGS]
        assert all(math.isfinite(w) and 0 < w < 60 for w in widths)
        assert widths == sorted(widths, reverse=True)


def test_the_printed_table_has_a_row_per_statistic_and_a_column_per_metric() -> None:
    params = parameters()
    rows = [{"metric": m, "unit": u, **p} for (m, u), p in zip(
        (("temp", "degC"), ("load", "kW")),
        predicted_noise(ENCODINGS, noise_variance=params.total_variance, variance=True, quantiles=False, bins=16),
        strict=True)]
    table = noise_table(rows)
    assert table.column_names == ["statistic", "temp (degC)", "load (kW)"]
    assert table.column("statistic").to_pylist() == ["count", "sum"] + [f"mean n={n}" for n in READINGS] + [
        f"stddev n={n}" for n in READINGS] + [f"stddev shown from spread n={n}" for n in READINGS]
    assert all("(+-" in cell for cell in table.column("load (kW)").to_pylist()[: -len(READINGS)])
    assert all(cell.startswith(">= ") or cell == "never" for cell in table.column("load (kW)").to_pylist()[-3:])


@pytest.mark.parametrize("above", [0.8, 1.25])
def test_the_predicted_spread_from_which_a_stddev_is_shown_is_the_decoders(above: float) -> None:
    """1,000 readings a cell, 200 cells centred in the range with SD `above` times the predicted smallest spread
    whose estimate is released: withheld in every cell below it, shown in every cell above it."""
    params = parameters(epsilon=1.0)
    encoding = ENCODINGS[1]
    n = 1000
    spread = metric_noise(encoding, noise_variance=params.total_variance, variance=True, quantiles=False,
                          bins=16, readings=(n,))[f"stddev_shown_from_n{n}"]
    assert math.isfinite(spread) and 0 < spread < 250
    values = np.clip(np.round(np.random.default_rng(8).normal(250.0, above * spread, n)), 0, 500)
    cells = 200
    table = load_cells(values, cells, params, seed=5)
    shown = [v is not None for v in table.column("stddev").to_pylist()[cells:]]
    assert all(shown) if above > 1 else not any(shown)


def test_too_few_readings_for_the_counts_noise_never_show_a_stddev() -> None:
    """Below VARIANCE_COUNT_SDS count noise SDs of readings the decoder withholds the variance and the stddev's
    estimate whatever the spread: the plan says "never" there."""
    from fusion.release.estimates import VARIANCE_COUNT_SDS

    params = parameters(epsilon=1.0)
    encoding = ENCODINGS[1]
    count_sd = math.sqrt(params.total_variance) / encoding.count_weight
    few, enough = int(VARIANCE_COUNT_SDS * count_sd) - 1, int(VARIANCE_COUNT_SDS * count_sd) + 50
    row = metric_noise(encoding, noise_variance=params.total_variance, variance=True, quantiles=False, bins=16,
                       readings=(few, enough))
    assert math.isinf(row[f"stddev_shown_from_n{few}"])
    assert math.isfinite(row[f"stddev_shown_from_n{enough}"])

"""Quantiles of several releases computed in one call (a stream's burst of windows) are, bit for bit, those of
decoding each release alone: a crash re-run that decodes one of them alone must reproduce the rows it signed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from fusion.config.parameters import ReleaseParameters
from fusion.release.estimates import decode_release, release_quantiles
from privacy.accountant import calibrate_variance
from privacy.encoding import balanced_encodings, encode_readings, event_level_sensitivity
from privacy.layout import PartitionLayout, bin_components
from privacy.skellam import SkellamNoise, seeded_generator

START = datetime(2026, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
BINS = 8
LOWER, UPPER = 200.0, 260.0


def window(
    hour: int, regions: tuple[str, ...], *, seed: int
) -> tuple[np.ndarray, PartitionLayout, ReleaseParameters, float]:
    """(noisy totals, layout, parameters, variance) of one hourly window of voltage readings per region."""
    encodings = tuple(balanced_encodings([(LOWER, UPPER, 0.1)]))
    components = ("count", "sum", *bin_components(BINS))
    sensitivity = event_level_sensitivity(list(encodings), components=len(components))
    epsilon = 0.5 + 0.25 * (seed % 3)  # windows under different noise levels
    variance = calibrate_variance(epsilon=epsilon, delta=1e-6, l1=sensitivity.l1, l2=sensitivity.l2)
    params = ReleaseParameters(
        encodings=encodings,
        sensitivity=sensitivity,
        total_variance=variance,
        quorum=1,
        epsilon=epsilon,
        delta=1e-6,
        noise=True,
    )
    start = START + hour * HOUR
    layout = PartitionLayout.for_interval(("volts",), regions, start, start + HOUR, HOUR, components)
    rng = np.random.default_rng(seed)
    cells = layout.cells
    totals = np.zeros(layout.slots, dtype=np.int64)
    for cell in range(cells):
        values = np.clip(rng.normal(230 + 5 * cell, 4 + cell, int(rng.integers(0, 3000))), LOWER, UPPER)
        weight, centred = encode_readings(np.round(values, 1), np.zeros(values.size, dtype=np.int64), encodings)
        totals[cell] = weight.sum()
        totals[cells + cell] = centred.sum()
        counts = np.histogram(values, bins=BINS, range=(LOWER, UPPER))[0]
        for j, n in enumerate(counts):
            totals[(2 + j) * cells + cell] = n * encodings[0].count_weight
    totals += SkellamNoise(variance, generator=seeded_generator(seed)).sample(totals.size)
    return totals, layout, params, variance


def decode(
    release: tuple[np.ndarray, PartitionLayout, ReleaseParameters, float],
    quantiles: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    totals, layout, params, variance = release
    return decode_release(
        totals,
        layout=layout,
        params=params,
        units=("V",),
        noise_variance=variance,
        contributors=2,
        release_id="r",
        released_at=START,
        quantiles=quantiles,
    )


def test_quantiles_decoded_together_are_bit_for_bit_those_decoded_alone() -> None:
    regions = [("a",), ("a", "b", "c"), ("a", "b"), ("a",), ("a", "b", "c", "d", "e")]
    releases = [window(hour, r, seed=hour + 1) for hour, r in enumerate(regions)]
    together = release_quantiles(releases)
    released = 0
    for release, quantiles in zip(releases, together, strict=True):
        alone, joint = decode(release), decode(release, quantiles)
        assert alone.equals(joint)  # every column, NaNs and nulls in the same places
        released += int(np.isfinite(np.asarray(joint.column("median").to_numpy(zero_copy_only=False), float)).sum())
    assert released > 5  # most cells are busy enough for quantiles: the comparison is not of NULLs alone


def test_no_release_no_call() -> None:
    assert release_quantiles([]) == []

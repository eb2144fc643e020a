"""Training rows from the feeds' metrics (training/feed_rows.py), on the demo federation's feeds."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fusion.config.federation import load_config
from fusion.config.training import ModelConfig
from fusion.demo.federation import build_demo
from training.feed_rows import feed_rows, split_at, step_means

MODEL = {
    "name": "air",
    "features": ("air_temp",),
    "target": "air_temp",
    "horizon": "1h",
    "target_bins": (1.0, 6.0),
    "start": "2026-01-01T00:00",
    "end": "2026-01-01T06:00",
}


def test_rows_come_from_each_institutions_own_readings(tmp_path: Path) -> None:
    config = load_config(build_demo(tmp_path / "demo", days=1))
    model = ModelConfig(**MODEL)  # type: ignore[arg-type]
    assert model.class_count == 3
    met = config.institution("metservice")
    read = feed_rows(config, model, met)
    rows, times = read.rows, read.times
    assert read.unreadable == {}
    # 8 stations in each of 4 regions, rows at hours 0, 2 and 4 (each with its next hour as target).
    assert rows.features.shape == (8 * 4 * 3, 1 + 4 + 2)
    start = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert sorted(set(((times - start) / 3600).astype(int))) == [0, 2, 4]  # a reading is in one row only
    # The reference: hourly means of one station, straight from its feed's readings.
    means = step_means(
        config, met, ("air_temp",), datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 6, tzinfo=UTC), 3600.0
    ).means.to_pylist()
    station = means[0]["entity_id"]
    series = {m["step"]: m["value"] for m in means if m["entity_id"] == station}
    first = min(series)
    expected_feature = (series[first] + 40.0) / 90.0  # scaled by the metric's clamp bounds [-40, 50]
    expected_class = int(np.searchsorted([1.0, 6.0], series[first + 1], side="right"))
    assert rows.features[0, 0] == pytest.approx(expected_feature, rel=1e-6)
    assert rows.targets[0] == expected_class
    assert np.allclose(rows.features[:, 1:5].sum(axis=1), 1.0)  # region one-hot
    # The utility measures no air temperature: it takes no part in this model.
    assert feed_rows(config, model, config.institution("gridco")).rows.targets.size == 0
    early, late = split_at(rows, times, datetime(2026, 1, 1, 3, tzinfo=UTC))
    assert early.targets.size == 64 and late.targets.size == 32
    # A damaged feed file is skipped whole and reported, as a release skips it: none of its readings is used.
    port = config.institution("portlogix")
    assert feed_rows(config, model, port).rows.targets.size > 0
    (tmp_path / "demo" / "feeds" / "portlogix" / "2026-01-01.parquet").write_bytes(b"PAR1 cut short in a copy")
    damaged = feed_rows(config, model, port)
    assert damaged.rows.targets.size == 0 and [Path(p).name for p in damaged.unreadable] == ["2026-01-01.parquet"]
    (line,) = damaged.report("portlogix")
    assert "institution portlogix: feed file" in line and "unreadable (ArrowInvalid" in line
    assert "none of its readings is used" in line


def test_a_feed_model_needs_a_horizon_and_increasing_bins() -> None:
    with pytest.raises(ValidationError, match="horizon"):
        ModelConfig(**{**MODEL, "horizon": None})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="must increase"):
        ModelConfig(**{**MODEL, "target_bins": (6.0, 1.0)})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="classes"):
        ModelConfig(**{**MODEL, "classes": 5})  # type: ignore[arg-type]
    # Feed rows average several readings each: removing one changes a row, so none may claim one unit per row.
    with pytest.raises(ValidationError, match=r"models\.\w[\w-]*\.unit_rows: rows from the feeds average"):
        ModelConfig(**{**MODEL, "unit_rows": True})  # type: ignore[arg-type]

"""Beam's runners leave empty scratch directories in the system temp directory; a Fusion pipeline leaves none."""

from __future__ import annotations

import tempfile
from pathlib import Path

import apache_beam as beam
import pytest

from pipelines.run import beam_options, beam_scratch


def _run_trivial_pipeline() -> None:
    with beam.Pipeline(options=beam_options()) as pipeline:
        _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2)


@pytest.fixture
def system_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "system-temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_bare_beam_pipeline_leaves_scratch_directories(system_temp: Path) -> None:
    """The premise: without beam_scratch, the DirectRunner leaves directories behind."""
    _run_trivial_pipeline()
    assert list(system_temp.iterdir())


def test_a_pipeline_in_beam_scratch_leaves_nothing_and_restores_the_temp_directory(system_temp: Path) -> None:
    with beam_scratch():
        assert tempfile.gettempdir() != str(system_temp)
        _run_trivial_pipeline()
    assert list(system_temp.iterdir()) == []
    assert tempfile.gettempdir() == str(system_temp)

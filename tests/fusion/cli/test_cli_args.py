"""What `fusion` does with arguments its commands do not take, and with error text that looks like markup."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.cli.core import _extra_args_error, main


@pytest.mark.parametrize(
    "command,extra,expected",
    [
        ("batch", [], None),
        ("batch", ["--runner=DirectRunner", "--direct_num_workers=2"], None),  # Beam's own options pass
        ("batch", ["--runer=Foo"], "unknown options --runer: neither `fusion batch` options"),
        ("contribute", ["--wiat", "5"], "unexpected arguments --wiat 5"),
        ("sql", ["--formt", "csv"], "unknown arguments --formt csv: `fusion sql --help`"),
        ("verify", ["--runner=DirectRunner"], "unknown arguments --runner=DirectRunner"),  # no pipeline: no Beam
        ("batch", ["--runner=apache_beam.runners.render.RenderRunner", "--render_output=/tmp/x.svg"], None),
        ("batch", ["--direct_num_workers=two"], "invalid Beam option values in --direct_num_workers=two"),
    ],
)
def test_only_pipeline_commands_take_beam_options_and_only_beams(command: str, extra: list[str],
                                                                 expected: str | None) -> None:
    refused = _extra_args_error(command, extra)
    assert refused == expected if expected is None else expected in (refused or "")


def test_a_mistyped_option_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--config", "x.toml", "SELECT 1", "--formt", "csv"]) == 2
    assert "--formt csv" in capsys.readouterr().err


def test_error_text_is_printed_as_written_not_as_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import config_text

    config = tmp_path / "federation.toml"
    config.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    assert main(["schedule", "--config", str(config), "--once"]) == 1
    assert "has no [[schedules]] section" in " ".join(capsys.readouterr().err.split())


def test_stream_refusals_group_by_kind_and_lags_read_as_durations() -> None:
    from fusion.cli.stream import _duration, _reason_kind

    one = "release r-0123456789abcdef01234567 needs epsilon 0.3 in period 2026-01-02"
    two = "release r-fedcba9876543210fedcba98 needs epsilon 0.3 in period 2026-01-02"
    assert _reason_kind(one) == _reason_kind(two) == "release <release> needs epsilon 0.3 in period 2026-01-02"
    overlap = "institution a already sealed 20260101T0000Z-20260102T0000Z, which overlaps 20260101T0100Z-20260101T0200Z"
    assert _reason_kind(overlap) == "institution a already sealed <interval>, which overlaps <interval>"
    assert [_duration(s) for s in (7.4, 65, 3 * 3600 + 120, 29_100_287)] == ["7s", "1m 5s", "3h 2m", "336d 19h"]
    assert _duration(-1805) == "-30m 5s"  # readings ahead of the clock (within max_clock_skew)


def test_in_process_batch_refuses_beam_options_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fusion batch --in-process` builds no pipeline, so Beam options would be silently ignored: it refuses."""
    from tests.conftest import config_text

    config = tmp_path / "federation.toml"
    config.write_text(config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2))
    code = main(["batch", "--config", str(config), "--start", "2026-01-01T00:00", "--end", "2026-01-02T00:00",
                 "--in-process", "--direct_num_workers=2"])
    assert code != 0
    assert "--in-process builds no Beam pipeline" in capsys.readouterr().err.replace("\n", " ")

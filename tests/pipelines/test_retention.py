"""The exchange's retention: released intervals' folders leave once their release is old enough, and nothing else
does (real releases: Beam-free in-process batch, TenSEAL, Delta store)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.errors import ConfigError
from fusion.release.exchange import PUBLIC_CONTEXT, ReleaseKey
from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines import release as release_module
from pipelines.batch import run_batch
from pipelines.retention import interval_folders, prune_exchange
from tests.conftest import END, START, Federation

pytestmark = pytest.mark.e2e

MIDDLE = START + timedelta(hours=3)
LATER = (END, END + timedelta(hours=1))  # an interval with a folder in the exchange and no release


def _interval(start: datetime, end: datetime) -> str:
    return ReleaseKey("f", start, end, "", "").interval_name


def _released_twice(make_federation: Callable[..., Federation]) -> Federation:
    fed = make_federation()
    for start, end in ((START, MIDDLE), (MIDDLE, END)):
        assert run_batch(plan_release(fed.config, start, end)).status == "released"
    return fed


def _unreleased_folder(fed: Federation) -> Path:
    folder = Path(fed.config.exchange_path) / _interval(*LATER) / "contributions"
    folder.mkdir(parents=True)
    (folder / "alpha.fenv").write_bytes(b"sealed, never aggregated")
    return folder.parent


def test_only_released_intervals_past_the_retention_leave_the_exchange(
    make_federation: Callable[..., Federation],
) -> None:
    fed = _released_twice(make_federation)
    unreleased = _unreleased_folder(fed)
    exchange = Path(fed.config.exchange_path)
    released = [_interval(START, MIDDLE), _interval(MIDDLE, END)]
    assert interval_folders(str(exchange)) == sorted([*released, unreleased.name])

    recent = prune_exchange(fed.config, retention=timedelta(days=1))
    assert recent.removed == [] and sorted(recent.kept_recent) == released
    assert recent.kept_unreleased == [unreleased.name]

    later = datetime.now(UTC) + timedelta(days=2)
    dry = prune_exchange(fed.config, retention=timedelta(days=1), now=later, dry_run=True)
    assert dry.removed == released and dry.removed_bytes and dry.removed_bytes > 100_000
    assert all((exchange / name).is_dir() for name in released)  # a dry run removes nothing

    done = prune_exchange(fed.config, retention=timedelta(days=1), now=later)
    assert done.removed == released and done.removed_bytes == dry.removed_bytes
    assert not any((exchange / name).exists() for name in released)
    assert unreleased.is_dir() and (exchange / PUBLIC_CONTEXT).is_file()  # the rest stays
    # The releases stay whole: verified against the key holder's signature from the store alone, and a run of a
    # released interval stops at the store.
    assert main(["verify", "--config", str(fed.config_path)]) == 0
    assert run_batch(plan_release(fed.config, START, MIDDLE)).status == "already_released"
    assert not (exchange / released[0]).exists()


def test_an_interval_whose_release_crashed_after_its_audit_row_keeps_its_folder_until_published(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release's audit row is committed before its rows: a pass that crashed in between is re-run from the
    exchange (its roster and answers), so the folder must stay, though the audit trail records a release."""
    fed = make_federation()

    class Crash(Exception):
        pass

    def crash_after_audit(step: str) -> None:
        if step == "after_audit":
            raise Crash(step)

    monkeypatch.setattr(release_module, "crash_point", crash_after_audit)
    with pytest.raises(Crash):
        run_batch(plan_release(fed.config, START, MIDDLE))
    monkeypatch.undo()
    name = _interval(START, MIDDLE)
    assert Store(fed.config.store_path).read("releases").num_rows == 0
    later = datetime.now(UTC) + timedelta(days=2)
    kept = prune_exchange(fed.config, retention=timedelta(0), now=later)
    assert kept.removed == [] and kept.kept_unreleased == [name]  # it removed the folder before
    assert run_batch(plan_release(fed.config, START, MIDDLE)).status == "released"  # re-run from the exchange
    assert prune_exchange(fed.config, retention=timedelta(0), now=later).removed == [name]


def test_a_retention_in_the_config_prunes_after_each_release(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    text = fed.config_path.read_text().replace('window = "1h"', 'window = "1h"\nexchange_retention = "0s"', 1)
    fed.config_path.write_text(text)
    assert fed.config.exchange_retention == timedelta(0)
    unreleased = _unreleased_folder(fed)
    for start, end in ((START, MIDDLE), (MIDDLE, END)):
        assert run_batch(plan_release(fed.config, start, end)).status == "released"
        assert not (Path(fed.config.exchange_path) / _interval(start, end)).exists()  # its own, at once
    assert unreleased.is_dir()


def test_the_command_needs_a_retention_and_reports_what_it_removes(
    make_federation: Callable[..., Federation], capsys: pytest.CaptureFixture[str]
) -> None:
    fed = _released_twice(make_federation)
    config = str(fed.config_path)
    assert main(["prune-exchange", "--config", config]) == 1
    assert "exchange_retention" in capsys.readouterr().err
    assert main(["prune-exchange", "--config", config, "--older-than", "soon"]) == 1
    assert "--older-than" in capsys.readouterr().err
    assert main(["prune-exchange", "--config", config, "--older-than", "0s", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 released interval folder(s)" in out and _interval(START, MIDDLE) in out
    assert len(interval_folders(fed.config.exchange_path)) == 2
    assert main(["prune-exchange", "--config", config, "--older-than", "0s"]) == 0
    assert "removed 2" in capsys.readouterr().out and interval_folders(fed.config.exchange_path) == []


def test_a_bad_retention_fails_at_load_naming_the_field(make_federation: Callable[..., Federation]) -> None:
    fed = make_federation()
    text = fed.config_path.read_text().replace('window = "1h"', 'window = "1h"\nexchange_retention = "a while"')
    fed.config_path.write_text(text)
    with pytest.raises(ConfigError, match=r"federation\.exchange_retention"):
        load_config(fed.config_path)


def test_a_prune_that_fails_after_a_release_leaves_it_published_and_says_why(
    make_federation: Callable[..., Federation], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fed = make_federation()
    text = fed.config_path.read_text().replace('window = "1h"', 'window = "1h"\nexchange_retention = "0s"', 1)
    fed.config_path.write_text(text)

    def refused(path: str) -> None:
        raise PermissionError(f"[Errno 13] Permission denied: '{path}'")

    monkeypatch.setattr("pipelines.retention.remove_tree", refused)
    assert run_batch(plan_release(fed.config, START, MIDDLE)).status == "released"
    assert "exchange was not pruned: PermissionError" in caplog.text
    assert (Path(fed.config.exchange_path) / _interval(START, MIDDLE)).is_dir()  # left for the next prune


def test_the_stream_prunes_after_its_releases(make_federation: Callable[..., Federation]) -> None:
    from pipelines.stream_driver import StreamDriver
    from tests.pipelines.test_stream import land, stream_federation

    fed = stream_federation(make_federation)
    text = fed.config_path.read_text().replace('window = "1h"', 'window = "1h"\nexchange_retention = "0s"', 1)
    fed.config_path.write_text(text)
    for hour in range(6):
        land(fed, hour)
    driver = StreamDriver(fed.config, clock=lambda: END)
    driver.step()
    released = Store(fed.config.store_path).read("releases").column("window_start").to_pylist()
    assert len(set(released)) == 6
    assert interval_folders(fed.config.exchange_path) == []

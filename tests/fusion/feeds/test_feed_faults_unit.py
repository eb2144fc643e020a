"""Feed faults without Beam (issue 18): reading a CSV line that is not UTF-8, files without a mapped column,
missing daily files, damaged Parquet in the scan (one pass and staged), and the reject-rate verdict."""

from __future__ import annotations

import gzip
import lzma
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from fusion.config.federation import FeedConfig, load_config
from fusion.errors import ConfigError, FusionError
from fusion.feeds.files import feed_files, feed_listing, read_feed_file
from fusion.feeds.report import FileTally, RejectLevel, interval_reject_rate, judge_rejects
from fusion.feeds.scan import FeedScanner, ShardScan, staged_path, staged_raw_path
from fusion.release.plan import ReleasePlan, plan_release
from schemas.readings import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE
from tests.conftest import END, START, config_text, readings, write_feed

HEADER = b'"entity_id","region","metric","event_time","value"\n'


def _row(entity: bytes, value: bytes = b"1.5") -> bytes:
    return b'"' + entity + b'","north","temp","2026-01-01T01:00:00+00:00",' + value + b"\n"


def _csv_feed(path: Path) -> FeedConfig:
    return FeedConfig(name="main", path=str(path), format="csv")


# -- point 8: one CSV line that is not UTF-8 -------------------------------------------------------------------


def test_a_csv_line_that_is_not_utf8_is_one_malformed_line_and_the_rest_is_read(tmp_path: Path) -> None:
    """pyarrow refused the whole file ("invalid UTF8 data"), so one bad byte lost every row of it."""
    path = tmp_path / "feed.csv"
    path.write_bytes(HEADER + _row(b"e1") + _row(b"e\xff2") + _row(b"e3", b"") + _row(b"e4"))
    batches = list(read_feed_file(str(path), _csv_feed(path), batch_rows=100))
    table = pa.concat_tables(b.table for b in batches)
    assert table.column("entity_id").to_pylist() == ["e1", "e3", "e4"]
    assert table.column("value").to_pylist() == ["1.5", None, "1.5"]  # an empty field is still missing
    assert [m for b in batches for m in b.malformed] == [(3, "e\\xff2,north,temp,2026-01-01T01:00:00+00:00,1.5,")]


def test_undecodable_rows_are_found_in_every_batch_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "feed.csv"
    rows = [_row(b"e%d" % i) for i in range(3000)]
    for bad in (5, 1500, 2999):
        rows[bad] = _row(b"bad\xc3(%d" % bad)
    path.write_bytes(HEADER + b"".join(rows))
    batches = list(read_feed_file(str(path), _csv_feed(path), batch_rows=700))
    assert sum(b.table.num_rows for b in batches) == 2997
    assert [n for b in batches for n, _ in b.malformed] == [7, 1502, 3001]  # lines: the header is line 1


# -- point 4: a file without a mapped column -------------------------------------------------------------------


def test_a_file_without_a_required_column_says_so_even_when_it_holds_no_rows(tmp_path: Path) -> None:
    csv_path, parquet_path, empty_path = tmp_path / "a.csv", tmp_path / "a.parquet", tmp_path / "b.csv"
    csv_path.write_bytes(HEADER.replace(b'"value"', b'"reading"') + _row(b"e1"))
    empty_path.write_bytes(HEADER.replace(b'"metric"', b'"kind"'))
    pq.write_table(pa.table({"entity_id": ["e1"], "reading": [1.0]}), parquet_path)
    parquet_feed = FeedConfig(name="main", path=str(parquet_path), format="parquet", columns={"region": "zone"})
    assert [b.missing_columns for b in read_feed_file(str(csv_path), _csv_feed(csv_path), batch_rows=10)] == [
        ("value",)
    ]
    assert [b.missing_columns for b in read_feed_file(str(empty_path), _csv_feed(empty_path), batch_rows=10)] == [
        ("metric",)
    ]
    [batch] = read_feed_file(str(parquet_path), parquet_feed, batch_rows=10)
    assert batch.missing_columns == ("zone", "metric", "event_time", "value") and batch.table.num_rows == 1


def test_reject_rate_counts_the_intervals_rows_only() -> None:
    assert interval_reject_rate(100, {"missing_column": 100}) == 1.0
    assert interval_reject_rate(100, {"out_of_range": 20}) == 0.2
    assert interval_reject_rate(100, {"duplicate": 60}) == 0.0  # a resent file is not bad data
    assert interval_reject_rate(0, {}) == 0.0
    # A daily file read by an hourly release: 2,280 rows with a time, 95 of them this hour, and 120 rows without
    # a readable time (5%) that may belong to any hour: they count in proportion, 5 here, so 5% again.
    assert interval_reject_rate(2400, {"out_of_interval": 2185, "missing_field": 120}) == pytest.approx(0.05)


def test_the_verdict_warns_then_stops_naming_the_files_and_reasons(tmp_path: Path) -> None:
    config = load_config(_write_config(tmp_path, 'warn_reject_rate = 0.2\nmax_reject_rate = 0.6'))
    beta = config.institution("beta")
    assert (beta.warn_reject_rate, beta.max_reject_rate) == (0.2, 0.6)
    alpha = config.institution("alpha")
    assert alpha.max_reject_rate is None and alpha.stop_rate(entity_level=False) == 0.5  # the default
    files = {
        "f/a.csv": FileTally(10, Counter(missing_field=5, out_of_interval=3)),
        "f/b.csv": FileTally(10, Counter(missing_column=10), "missing_column", "lacks column(s) 'value'"),
        "f/c.csv": FileTally(10, Counter(duplicate=2)),
    }
    ok = judge_rejects(beta, read=100, rejected={"missing_field": 15}, files=files)
    warn = judge_rejects(beta, read=100, rejected={"missing_field": 25}, files=files)
    stop = judge_rejects(beta, read=100, rejected={"missing_column": 70}, files=files)
    assert [v.level for v in (ok, warn, stop)] == [RejectLevel.OK, RejectLevel.WARN, RejectLevel.STOP]
    assert "warn_reject_rate of 20%" in warn.message and "max_reject_rate of 60%" in stop.message
    assert stop.message.index("f/b.csv") < stop.message.index("f/a.csv") and "f/c.csv" not in stop.message
    assert "missing_column=10; lacks column(s) 'value'" in stop.message and "missing_field=5" in stop.message


def test_at_entity_level_an_unset_max_reject_rate_never_withholds(tmp_path: Path) -> None:
    """One entity's rejected rows are not bounded, so at entity level they alone could take the rate past 0.5 and
    withhold the institution's contribution, a public fact: unset, the stop rate there is 1 (warn only)."""
    config = load_config(_write_config(tmp_path, 'warn_reject_rate = 0.2\nmax_reject_rate = 0.6'))
    alpha, beta = config.institution("alpha"), config.institution("beta")
    assert alpha.stop_rate(entity_level=True) == 1.0 and beta.stop_rate(entity_level=True) == 0.6  # set: kept
    files = {"f/a.csv": FileTally(100, Counter(out_of_range=60))}
    at_entity = judge_rejects(alpha, read=100, rejected={"out_of_range": 60}, files=files, entity_level=True)
    at_reading = judge_rejects(alpha, read=100, rejected={"out_of_range": 60}, files=files)
    assert (at_entity.level, at_reading.level) == (RejectLevel.WARN, RejectLevel.STOP)
    assert judge_rejects(beta, read=100, rejected={"out_of_range": 61}, files=files, entity_level=True).level is (
        RejectLevel.STOP
    )


def test_a_warning_above_the_stop_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"institutions\[1\].*warn_reject_rate 0.7 is above max_reject_rate 0.5"):
        load_config(_write_config(tmp_path, "warn_reject_rate = 0.7"))


def _write_config(root: Path, beta: str = "") -> Path:
    text = config_text(institutions=[("alpha", "parquet"), ("beta", "csv")], quorum=2, noise=False, seed=7)
    text = text.replace('id = "beta"', f'id = "beta"\n{beta}', 1)
    (root / "federation.toml").write_text(text)
    return root / "federation.toml"


# -- points 5 and 15: missing daily files, named by their own path ---------------------------------------------


def test_a_missing_day_is_listed_by_its_own_path(tmp_path: Path) -> None:
    for day in ("2026-01-01", "2026-01-03"):
        (tmp_path / day).mkdir()
        (tmp_path / day / "a.csv").write_text("")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    listing = feed_listing(str(tmp_path / "{date}" / "*.csv"), start, start + timedelta(days=3))
    assert [Path(p).parent.name for p in listing.paths] == ["2026-01-01", "2026-01-03"]
    assert listing.missing == (str(tmp_path / "2026-01-02" / "*.csv"),)
    assert feed_listing(str(tmp_path / "none-*.csv"), start, start).missing == (str(tmp_path / "none-*.csv"),)


def test_an_empty_match_names_the_days_paths_not_the_template(tmp_path: Path) -> None:
    start = datetime(2026, 1, 5, tzinfo=UTC)
    with pytest.raises(FusionError) as refused:
        feed_files(str(tmp_path / "{date}" / "*.csv"), start, start + timedelta(hours=30))
    message = str(refused.value)
    assert "{date}" not in message
    assert str(tmp_path / "2026-01-05" / "*.csv") in message and str(tmp_path / "2026-01-06" / "*.csv") in message


# -- point 2: damaged Parquet in the scan ----------------------------------------------------------------------


@pytest.fixture
def damaged_plan(tmp_path: Path) -> tuple[ReleasePlan, list[Path], int]:
    """alpha's feed: one good Parquet file, and a truncated and a zeroed-page one (keys are not needed to scan)."""
    config_path = _write_config(tmp_path)
    folder = tmp_path / "feeds" / "alpha"
    good = readings("alpha", entities=3, rng=np.random.default_rng(1))
    write_feed(good, folder / "good.parquet", "parquet")
    truncated, zeroed = folder / "truncated.parquet", folder / "zeroed.parquet"
    truncated.write_bytes((folder / "good.parquet").read_bytes()[:300])
    pq.write_table(readings("alpha-z", entities=3, rng=np.random.default_rng(2)), zeroed, row_group_size=30)
    chunk = pq.ParquetFile(zeroed).metadata.row_group(2).column(4)
    assert chunk.path_in_schema == "value"
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(zeroed.read_bytes())
    data[start : start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    zeroed.write_bytes(bytes(data))
    return plan_release(load_config(config_path), START, END), [truncated, zeroed], good.num_rows


def test_a_damaged_parquet_file_is_one_malformed_record_in_a_one_pass_scan(damaged_plan) -> None:
    """DuckDB's and pyarrow's errors used to end the run, naming no file."""
    plan, damaged, rows = damaged_plan
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    scan = scanner.scan(0, 1)
    assert scan.table(scanner.schema).num_rows == rows  # the good file, and nothing of the damaged ones
    assert scan.rows_read == rows + 2 and scan.rejected == Counter(malformed_record=2)
    assert scan.unreadable == {str(p) for p in damaged}
    letters = pa.concat_tables(t for _, t in scan.dead_letters)
    assert sorted(letters.column(DEAD_LETTER_SOURCE).to_pylist()) == sorted(str(p) for p in damaged)
    assert set(letters.column(DEAD_LETTER_REASON).to_pylist()) == {"malformed_record"}
    assert {scan.files[str(p)].reason for p in damaged} == {"malformed_record"}


def test_a_damaged_parquet_file_stages_no_rows(damaged_plan, tmp_path: Path) -> None:
    plan, damaged, _ = damaged_plan
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    src = next(i for i, (_, path) in enumerate(scanner.sources) if path == str(damaged[1]))
    prefix = str(tmp_path / "staged" / "zeroed")
    (tmp_path / "staged").mkdir()
    counts = ShardScan()
    letters = list(scanner.stage(src, prefix, 2, counts))
    assert counts.rows_read == 1 and counts.rejected == Counter(malformed_record=1)
    assert [name.endswith("-unreadable") for name, _ in letters] == [True]
    assert [pa.ipc.open_file(staged_path(prefix, shard)).read_all().num_rows for shard in (0, 1)] == [0, 0]
    assert not Path(staged_raw_path(prefix)).exists()


def _scan_beside_a_good_csv(tmp_path: Path, name: str, damage: Callable[[bytes], bytes]) -> tuple[ShardScan, int]:
    """(the scan of beta's feed: a good CSV and `name`, another CSV's bytes as `damage` leaves them, its good rows)."""
    text = config_text(institutions=[("beta", "csv")], quorum=1, noise=False, seed=7)
    (tmp_path / "federation.toml").write_text(text.replace('"feeds/beta/*.csv"', '"feeds/beta/*.csv*"'))
    folder = tmp_path / "feeds" / "beta"
    good = readings("beta", entities=2, rng=np.random.default_rng(1))
    write_feed(good, folder / "good.csv", "csv")
    write_feed(readings("beta-bad", entities=2, rng=np.random.default_rng(2)), folder / "bad.csv", "csv")
    (folder / name).write_bytes(damage((folder / "bad.csv").read_bytes()))
    (folder / "bad.csv").unlink()
    plan = plan_release(load_config(tmp_path / "federation.toml"), START, END)
    scanner = FeedScanner(plan, plan.config.institution("beta"))
    scan = scanner.scan(0, 1)
    assert scan.table(scanner.schema).num_rows == good.num_rows
    return scan, good.num_rows


@pytest.mark.parametrize("suffix", [".xz", ".zst"])
def test_a_corrupt_xz_or_zstd_csv_is_dead_lettered_whole_and_the_other_files_read(tmp_path: Path, suffix: str) -> None:
    """Their decompressors raise errors of their own (LZMAError, ZstdError), which were not damage: the run failed."""

    def corrupt(raw: bytes) -> bytes:
        packed = lzma.compress(raw) if suffix == ".xz" else zstandard.ZstdCompressor().compress(raw)
        middle = len(packed) // 2
        return packed[:middle] + bytes(b ^ 0xFF for b in packed[middle : middle + 64]) + packed[middle + 64 :]

    scan, _ = _scan_beside_a_good_csv(tmp_path, f"bad.csv{suffix}", corrupt)
    assert scan.unreadable == {str(tmp_path / "feeds" / "beta" / f"bad.csv{suffix}")}


def test_a_truncated_gzip_csv_is_dead_lettered_whole_and_the_other_files_read(tmp_path: Path) -> None:
    """Its lines up to the cut used to be accepted, the one cut short with a wrong value."""
    scan, good = _scan_beside_a_good_csv(tmp_path, "cut.csv.gz", lambda raw: gzip.compress(raw)[:-40])
    assert scan.unreadable == {str(tmp_path / "feeds" / "beta" / "cut.csv.gz")}
    assert scan.rows_read == good + 1 and scan.rejected == Counter(malformed_record=1)
    [(_, letters)] = scan.dead_letters
    assert "truncated" in letters.column("_text")[0].as_py()

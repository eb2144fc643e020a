"""Feed faults end to end (issue 18): damaged Parquet files, a CSV line that is not UTF-8, a file without a mapped
column, missing daily files. One bad file or one absent institution costs that file or that institution, never
the interval: the rest is released when the quorum holds, and what went wrong is counted, dead-lettered, shown and
audited. Each scenario runs its pipeline once (module-scoped fixtures) and its tests read the outcome.
"""

from __future__ import annotations

import gzip
import json
import pickle
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.pvalue import TaggedOutput

from fusion.cli.core import main
from fusion.config.federation import load_config
from fusion.errors import InternalError, ReleaseRefused, shared_message
from fusion.release.exchange import contribution_path, exists
from fusion.release.plan import plan_release
from fusion.runtime.schedule import Interval, RunStatus
from fusion.store.delta import Store
from pipelines.batch import BatchSummary, run_batch
from pipelines.run import dead_letter_dir
from pipelines.scheduler import _attempt
from pipelines.stream import DEAD, REJECTS, StreamValidate
from pipelines.stream_driver import StreamDriver
from schemas.readings import DEAD_LETTER_REASON, DEAD_LETTER_ROW, DEAD_LETTER_SOURCE
from tests.conftest import END, START, Federation, config_text, readings, write_feed

pytestmark = pytest.mark.e2e

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
EXT = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl"}


def build_federation(
    root: Path,
    institutions: list[tuple[str, str]],
    *,
    quorum: int,
    entities: int = 4,
    days: int = 1,
    extra: str = "",
    dated: bool = False,
) -> Federation:
    """A federation like conftest's `make_federation`, in `root` (so a module-scoped fixture can build it): noise
    off, test mode. `dated`: each feed is `feeds/<id>/{date}/*.<ext>`, one folder of readings per day."""
    from fusion.keys.holder import create_federation_keys

    rng = np.random.default_rng(18)
    raw = {}
    for inst, fmt in institutions:
        ext = EXT[fmt]
        tables = [readings(inst, entities=entities, rng=rng, start=START + day * DAY) for day in range(days)]
        raw[inst] = pa.concat_tables(tables)
        for day, table in enumerate(tables):
            folder = root / "feeds" / inst / ((START + day * DAY).date().isoformat() if dated else "")
            half = table.num_rows // 2
            write_feed(table.slice(0, half), folder / f"part-{day}a.{ext}", fmt)
            write_feed(table.slice(half), folder / f"part-{day}b.{ext}", fmt)
    period = 'period = "7d"' if days > 1 else ""  # a release of several days needs a period that holds them
    text = config_text(institutions=institutions, quorum=quorum, noise=False, seed=7, extra_privacy=period) + extra
    if dated:
        for inst, fmt in institutions:
            text = text.replace(f'"feeds/{inst}/*.{EXT[fmt]}"', f'"feeds/{inst}/{{date}}/*.{EXT[fmt]}"')
    config_path = root / "federation.toml"
    config_path.write_text(text)
    config = load_config(config_path)
    create_federation_keys(config, [inst for inst, _ in institutions])
    return Federation(directory=root, config_path=config_path, raw=raw)


def zero_a_column_chunk(path: Path, *, row_group: int, column: str) -> None:
    """Overwrite one column chunk's pages with zero bytes: the footer still reads, the pages do not."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group)
    meta = next(chunk.column(i) for i in range(chunk.num_columns) if chunk.column(i).path_in_schema == column)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + meta.total_compressed_size] = bytes(meta.total_compressed_size)
    path.write_bytes(bytes(data))


def rename_csv_column(path: Path, old: str, new: str) -> None:
    header, rest = path.read_text().split("\n", 1)
    path.write_text(header.replace(f'"{old}"', f'"{new}"') + "\n" + rest)


def dead_letters(federation: Federation, institution: str) -> list[dict[str, Any]]:
    """The institution's dead letters for [START, END)."""
    plan = plan_release(federation.config, START, END)
    directory = Path(dead_letter_dir(plan, federation.config.institution(institution)))
    return [row for f in sorted(directory.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def audit(federation: Federation, action: str) -> list[dict[str, Any]]:
    rows = Store(federation.config.store_path).read("audit").to_pylist()
    return [{**r, "detail": json.loads(r["detail"])} for r in rows if r["action"] == action]


def released_count(federation: Federation) -> float:
    return sum(Store(federation.config.store_path).read("releases").column("count").to_pylist())


def reconciles(report: dict[str, Any]) -> bool:
    return report["read"] == report["accepted"] + sum(report["rejected"].values())


# -- damaged Parquet, a CSV line that is not UTF-8, a CSV without its value column: one `fusion batch` ------------


@dataclass
class Damaged:
    federation: Federation
    summary: BatchSummary
    corrupt: list[Path]  # alpha's damaged Parquet files
    utf8_rows: int  # good rows of beta's file with one bad line
    renamed: list[Path]  # gamma's CSV files whose value column was renamed


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Damaged:
    federation = build_federation(
        tmp_path_factory.mktemp("damaged"), [("alpha", "parquet"), ("beta", "csv"), ("gamma", "csv")], quorum=2
    )
    feeds = federation.directory / "feeds"
    good = (feeds / "alpha" / "part-0a.parquet").read_bytes()
    corrupt = [feeds / "alpha" / name for name in ("truncated.parquet", "random.parquet", "zeroed.parquet")]
    corrupt[0].write_bytes(good[: len(good) // 2])
    corrupt[1].write_bytes(np.random.default_rng(2).bytes(len(good)))
    extra = readings("alpha-zeroed", entities=3, rng=np.random.default_rng(3))  # the footer reads, a page does not
    pq.write_table(extra, corrupt[2], row_group_size=40)
    zero_a_column_chunk(corrupt[2], row_group=1, column="value")

    more = readings("beta-utf8", entities=2, rng=np.random.default_rng(4))
    utf8 = feeds / "beta" / "utf8.csv"
    write_feed(more, utf8, "csv")
    lines = utf8.read_bytes().split(b"\n")
    lines.insert(10, b'"bad-\xff\xfe","north","temp","2026-01-01T01:00:00+00:00",1.5')
    utf8.write_bytes(b"\n".join(lines))

    renamed = sorted((feeds / "gamma").glob("*.csv"))
    for path in renamed:
        rename_csv_column(path, "value", "reading")
    summary = run_batch(plan_release(federation.config, START, END))
    return Damaged(federation, summary, corrupt, more.num_rows, renamed)


def test_damaged_parquet_files_are_dead_lettered_counted_and_the_rest_released(damaged: Damaged) -> None:
    """Truncated, random and zeroed-page Parquet used to fail the interval for everyone with a pyarrow or DuckDB
    traceback naming no file."""
    assert damaged.summary.status == "released"
    report = damaged.summary.row_counts["alpha"]
    rows = damaged.federation.raw["alpha"].num_rows
    assert report["accepted"] == rows and report["rejected"] == {"malformed_record": 3} and reconciles(report)
    assert sorted(report["files"]) == sorted(str(p) for p in damaged.corrupt)
    assert {f["reason"] for f in report["files"].values()} == {"malformed_record"}
    assert all("unreadable" in f["fault"] for f in report["files"].values())
    letters = dead_letters(damaged.federation, "alpha")
    assert sorted(r[DEAD_LETTER_SOURCE] for r in letters) == sorted(str(p) for p in damaged.corrupt)
    assert all(r[DEAD_LETTER_REASON] == "malformed_record" and "unreadable" in r["_text"] for r in letters)
    refused = audit(damaged.federation, "feed_file_refused")
    assert sorted(r["detail"]["path"] for r in refused if r["actor"] == "alpha") == sorted(map(str, damaged.corrupt))
    assert {(r["actor_role"], r["reason"]) for r in refused if r["actor"] == "alpha"} == {
        ("institution", "malformed_record")
    }
    assert all(set(r["detail"]) == {"institution", "path"} for r in refused)  # the error text stays local


def test_a_csv_line_that_is_not_utf8_loses_only_that_line(damaged: Damaged) -> None:
    """It used to fail the batch with a Beam traceback (and the stream to accept none of the file's rows)."""
    report = damaged.summary.row_counts["beta"]
    rows = damaged.federation.raw["beta"].num_rows + damaged.utf8_rows
    assert report["accepted"] == rows and report["rejected"] == {"malformed_record": 1} and reconciles(report)
    [letter] = dead_letters(damaged.federation, "beta")
    assert letter[DEAD_LETTER_SOURCE].endswith("utf8.csv") and letter[DEAD_LETTER_ROW] == 11  # its line
    assert letter["_text"].startswith("bad-\\xff\\xfe,north,temp,")  # the undecodable bytes, shown
    assert "files" not in report  # the file itself was read


def test_a_file_without_its_value_column_is_a_schema_error_and_stops_the_institution(damaged: Damaged) -> None:
    """A renamed value column used to make every row `missing_field`, and the release spent its budget on data
    that had all failed. Now the file's rows are `missing_column`, and above max_reject_rate (50%) the
    institution seals nothing, saying which files and why; the release goes ahead without it."""
    report = damaged.summary.row_counts["gamma"]
    rows = damaged.federation.raw["gamma"].num_rows
    assert report["read"] == rows and report["rejected"] == {"missing_column": rows} and reconciles(report)
    assert sorted(report["files"]) == [str(p) for p in damaged.renamed]
    assert all(f["reason"] == "missing_column" and "'value'" in f["fault"] for f in report["files"].values())
    withheld = report["withheld"]
    assert "100.0%" in withheld and "max_reject_rate" in withheld and "--accept-rejects" in withheld
    assert all(str(p) in withheld for p in damaged.renamed) and "missing_column=" in withheld
    config = damaged.federation.config
    assert not exists(contribution_path(config.exchange_path, plan_release(config, START, END).key, "gamma"))
    letters = dead_letters(damaged.federation, "gamma")
    assert len(letters) == rows and {r[DEAD_LETTER_REASON] for r in letters} == {"missing_column"}
    assert {r["value"] for r in letters} == {None} and None not in {r["entity_id"] for r in letters}  # as read
    [event] = audit(damaged.federation, "contribution_withheld")
    assert event["actor"] == "gamma" and event["reason"] == "rejected rows above max_reject_rate"
    assert event["detail"] == {"institution": "gamma", "files": [str(p) for p in damaged.renamed]}  # no counts


def test_the_release_holds_exactly_the_contributing_institutions_readings(damaged: Damaged) -> None:
    assert damaged.summary.envelopes == 2
    raw = damaged.federation.raw
    assert released_count(damaged.federation) == raw["alpha"].num_rows + raw["beta"].num_rows + damaged.utf8_rows


# -- missing daily files: one rule ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def missing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Federation, BatchSummary]:
    """Two days of `{date}` feeds: alpha has both, beta lacks its second day, gamma has no file at all."""
    federation = build_federation(
        tmp_path_factory.mktemp("missing"),
        [("alpha", "parquet"), ("beta", "parquet"), ("gamma", "parquet")],
        quorum=2,
        days=2,
        dated=True,
    )
    feeds = federation.directory / "feeds"
    for path in [*(feeds / "beta" / "2026-01-02").iterdir(), *(feeds / "gamma").rglob("*.parquet")]:
        path.unlink()
    return federation, run_batch(plan_release(federation.config, START, START + 2 * DAY))


def test_a_missing_day_is_reported_per_institution_and_day(missing: tuple[Federation, BatchSummary]) -> None:
    """A missing day used to be skipped silently, and an institution with none fail the whole batch."""
    federation, summary = missing
    assert summary.status == "released" and summary.envelopes == 2
    reports = summary.row_counts
    assert "missing" not in reports["alpha"]
    [beta_day] = reports["beta"]["missing"]
    assert beta_day.endswith("feeds/beta/2026-01-02/*.parquet")  # the day's path, not the {date} template
    assert [Path(p).parent.name for p in reports["gamma"]["missing"]] == ["2026-01-01", "2026-01-02"]
    assert "no feed file" in reports["gamma"]["withheld"] and "{date}" not in reports["gamma"]["withheld"]
    assert all(reconciles(r) for r in reports.values())
    day_one = federation.raw["beta"].filter(pc.less(federation.raw["beta"].column("event_time"), START + DAY))
    assert reports["beta"]["read"] == reports["beta"]["accepted"] == day_one.num_rows
    assert released_count(federation) == federation.raw["alpha"].num_rows + day_one.num_rows


def test_missing_files_and_the_absent_institution_are_audited(missing: tuple[Federation, BatchSummary]) -> None:
    federation, _ = missing
    rows = audit(federation, "feed_file_missing")
    assert sorted((r["actor"], Path(r["detail"]["path"]).parent.name) for r in rows) == [
        ("beta", "2026-01-02"),
        ("gamma", "2026-01-01"),
        ("gamma", "2026-01-02"),
    ]
    assert {r["reason"] for r in rows} == {"missing_file"}
    [absent] = audit(federation, "contribution_withheld")
    assert absent["actor"] == "gamma" and absent["reason"] == "no feed file"


# -- the operator decides: `fusion contribute` and `fusion batch` below the quorum, then --accept-rejects --------


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    federation = build_federation(tmp_path_factory.mktemp("refused"), [("alpha", "parquet"), ("beta", "csv")], quorum=2)
    for path in sorted((federation.directory / "feeds" / "beta").glob("*.csv")):
        rename_csv_column(path, "value", "reading")
    return federation


def _fusion(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def test_the_operator_sees_why_and_decides_with_accept_rejects(
    refused: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    config, interval = str(refused.config_path), ["--start", START.isoformat(), "--end", END.isoformat()]
    beta_file = str(refused.directory / "feeds" / "beta" / "part-0a.csv")

    code, _, err = _fusion(capsys, "contribute", "--config", config, "--institution", "beta", *interval)
    assert code == 1 and "missing_column" in err and beta_file in err and "--accept-rejects" in err

    code, _, err = _fusion(capsys, "batch", "--config", config, *interval)  # quorum 2 cannot hold without beta
    assert code == 1 and "quorum not met" in err and beta_file in err and "missing_column" in err
    assert "lacks column(s) 'value'" in err  # the file's schema error, named
    assert [(e["actor"], e["reason"]) for e in audit(refused, "contribution_withheld")] == [
        ("beta", "rejected rows above max_reject_rate")
    ]

    code, out, err = _fusion(capsys, "batch", "--config", config, *interval, "--accept-rejects")
    assert code == 0, err
    assert "contributed: --accept-rejects" in out and "cells released" in out
    assert released_count(refused) == refused.raw["alpha"].num_rows  # beta's envelope holds no reading


def test_shared_records_of_a_refusal_name_institutions_and_reasons_never_counts(tmp_path: Path) -> None:
    """The refusal's message tells the operator each institution's reject rate and its files' exact counts; the
    scheduler's `runs` table, which every reader of the store can query, records only who and why (it used to
    record the whole message, and with it the exact rows the institution read and rejected)."""
    federation = build_federation(tmp_path, [("alpha", "parquet"), ("beta", "csv")], quorum=2)
    for path in sorted((federation.directory / "feeds" / "beta").glob("*.csv")):
        rename_csv_column(path, "value", "reading")
    with pytest.raises(ReleaseRefused) as refused:
        run_batch(plan_release(federation.config, START, END))
    local = str(refused.value)
    assert "100.0%" in local and "missing_column=" in local  # the operator's own view, in full
    shared = shared_message(refused.value)
    assert shared == (
        "aggregation refused: quorum not met: 1 valid contribution(s), the federation requires 2. Withheld: "
        "institution beta: rejected rows above max_reject_rate"
    )
    assert shared_message(pickle.loads(pickle.dumps(refused.value))) == shared  # across worker processes too
    outcome = _attempt(federation.config, Store(federation.config.store_path), Interval(START, END),
                       now=lambda: END + HOUR, beam_args=())
    assert outcome.status is RunStatus.SKIPPED and outcome.error == shared
    counts = InternalError("row counts do not reconcile for beta: {'read': 12, 'accepted': 11}")
    assert shared_message(counts).startswith("InternalError (") and "12" not in shared_message(counts)


# -- the stream: the same faults, the same reason codes -----------------------------------------------------------


def test_the_stream_reads_the_rest_of_a_csv_with_a_bad_line_and_refuses_a_file_without_a_column(
    tmp_path: Path,
) -> None:
    """A CSV line that is not UTF-8 used to make `fusion stream` accept none of the file's rows."""
    stream = f'\n[stream]\nallowed_lateness = "0s"\npoll = "1s"\nstart = "{START.isoformat()}"\n'
    federation = build_federation(tmp_path, [("alpha", "parquet"), ("beta", "csv")], quorum=2, extra=stream)
    feeds = federation.directory / "feeds"
    first_hour = 0
    for inst in ("alpha", "beta"):
        for path in (feeds / inst).iterdir():
            path.unlink()
        table = federation.raw[inst]
        hour = table.filter(pc.less(table.column("event_time"), START + HOUR))
        fmt = federation.config.institution(inst).feeds[0].format.value
        write_feed(hour, feeds / inst / f"hour-00.{EXT[fmt]}", fmt)
        first_hour += hour.num_rows
    more = readings("beta-utf8", entities=1, rng=np.random.default_rng(5), hours=1)
    write_feed(more, feeds / "beta" / "utf8.csv", "csv")
    lines = (feeds / "beta" / "utf8.csv").read_bytes().split(b"\n")
    lines.insert(2, b'"bad-\xff","north","temp","2026-01-01T00:30:00+00:00",1.5')
    (feeds / "beta" / "utf8.csv").write_bytes(b"\n".join(lines))
    headless = readings("alpha-x", entities=1, rng=np.random.default_rng(6), hours=1).drop_columns(["value"])
    pq.write_table(headless, feeds / "alpha" / "no-value.parquet")

    driver = StreamDriver(federation.config, clock=lambda: START + 2 * HOUR)
    driver.step()
    assert driver.state.unwindowed == {"beta": {"malformed_record": 1}, "alpha": {"missing_column": headless.num_rows}}
    assert released_count(federation) == first_hour + more.num_rows
    dead = federation.directory / "deadletter" / "alpha" / "stream"
    [letters] = [pq.read_table(p) for p in dead.glob("*missing-column*.parquet")]
    assert set(letters.column(DEAD_LETTER_REASON).to_pylist()) == {"missing_column"}


def _stream_validated(tmp_path: Path, fmt: str, path: Path) -> tuple[int, dict[str, int], list[pa.Table]]:
    """What the stream's validation step makes of one file of beta's feed: (readings accepted, rejects, dead
    letters), without a pipeline."""
    config_path = tmp_path / "federation.toml"
    config_path.write_text(config_text(institutions=[("beta", fmt)], quorum=1, noise=False, seed=7))
    config = load_config(config_path)
    validate = StreamValidate(config, {"beta": str(tmp_path / "dead")})
    validate.setup()
    accepted, rejected, letters = 0, Counter[str](), []
    for output in validate.process(("beta", config.institution("beta").feeds[0], str(path))):
        if isinstance(output, TaggedOutput) and output.tag == DEAD:
            letters.append(output.value[1])
        elif isinstance(output, TaggedOutput) and output.tag == REJECTS:
            rejected.update(output.value[1])
        else:
            accepted += output[2].num_rows
    return accepted, dict(rejected), letters


def test_the_stream_dead_letters_a_truncated_gzip_csv(tmp_path: Path) -> None:
    """Its lines up to the cut used to be accepted, the one cut short with a wrong value."""
    path = tmp_path / "feeds" / "beta" / "cut.csv"
    write_feed(readings("beta", entities=2, rng=np.random.default_rng(3)), path, "csv")
    packed = gzip.compress(path.read_bytes())
    path.unlink()
    cut = path.with_name("cut.csv.gz")
    cut.write_bytes(packed[: len(packed) - 40])
    accepted, rejected, [letters] = _stream_validated(tmp_path, "csv", cut)
    assert accepted == 0 and rejected == {"malformed_record": 1}
    assert "truncated" in letters.column("_text")[0].as_py()


def test_the_stream_dead_letters_json_lines_that_are_not_objects_and_reads_the_rest(tmp_path: Path) -> None:
    """A first line `null` crashed the process (Arrow's JSON reader), at every restart; a later `null` was counted
    a reading missing its fields. Each is one malformed record."""
    path = tmp_path / "feeds" / "beta" / "gateway.jsonl"
    table = readings("beta", entities=2, rng=np.random.default_rng(8), hours=1)
    write_feed(table, path, "jsonl")
    path.write_bytes(b"null\n" + path.read_bytes() + b"[]\n42\n")
    accepted, rejected, [letters] = _stream_validated(tmp_path, "jsonl", path)
    assert accepted == table.num_rows and rejected == {"malformed_record": 3}
    assert letters.column("_text").to_pylist() == ["null", "[]", "42"]


def test_the_stream_finds_a_parquet_time_beyond_duckdbs_range_unparseable(tmp_path: Path) -> None:
    """One millisecond time of 10^16 (year 318,857) used to crash `fusion stream` at every restart."""
    table = readings("beta", entities=2, rng=np.random.default_rng(4))
    millis = pc.cast(table.column("event_time"), pa.int64()).to_numpy() // 1000
    millis[3] = 10**16
    path = tmp_path / "feeds" / "beta" / "p.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table.set_column(3, "event_time", pa.array(millis, pa.timestamp("ms", tz="UTC"))), path)
    accepted, rejected, [letters] = _stream_validated(tmp_path, "parquet", path)
    assert accepted == table.num_rows - 1 and rejected == {"unparseable_time": 1}
    assert letters.column(DEAD_LETTER_ROW).to_pylist() == [3]


@pytest.mark.parametrize("value_type", [pa.float16(), pa.decimal256(40, 2)], ids=str)
def test_the_stream_reads_values_in_types_duckdb_cannot_import(tmp_path: Path, value_type: pa.DataType) -> None:
    """`fusion batch` read these files (DuckDB's read_parquet takes them) but `fusion stream` crashed on them."""
    table = readings("beta", entities=1, rng=np.random.default_rng(4)).slice(0, 10)
    values = pa.array([0.5] * 9 + [1e4]).cast(value_type)  # the last out of range
    path = tmp_path / "feeds" / "beta" / "p.parquet"
    path.parent.mkdir(parents=True)
    entities = table.column("entity_id").cast(pa.string_view())
    pq.write_table(table.set_column(4, "value", values).set_column(0, "entity_id", entities), path)
    accepted, rejected, [letters] = _stream_validated(tmp_path, "parquet", path)
    assert accepted == 9 and rejected == {"out_of_range": 1}
    assert letters.column(DEAD_LETTER_ROW).to_pylist() == [9]

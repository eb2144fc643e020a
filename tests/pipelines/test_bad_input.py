"""The bad-input corpus through the real Beam contribution pipeline: every reject reason, counted and dead-lettered.

Each institution of a small federation gets, beside its good feed files, extra files in its own format holding a
row for every reason code (malformed lines for CSV and JSONL; a within-file duplicate and a copy of a good row
from another file). Counts in the local report, the envelope header and the dead-letter Parquet files must match
the corpus exactly.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.config.federation import Config, InstitutionConfig
from fusion.release.exchange import contribution_path, read_bytes
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from pipelines.run import dead_letter_dir, run_contributions
from privacy.envelope import unpack_envelope
from schemas.readings import (
    DEAD_LETTER_REASON,
    DEAD_LETTER_ROW,
    DEAD_LETTER_SOURCE,
    ENTITY_ID,
    EVENT_TIME,
    METRIC,
    REGION,
    SENSOR_ID,
    VALUE,
)
from schemas.reasons import PUBLISHED_REASONS, RejectReason
from schemas.validation import ReadingRules
from tests.conftest import END, START, Federation

pytestmark = pytest.mark.e2e

R = RejectReason
FIELDS = (ENTITY_ID, REGION, METRIC, EVENT_TIME, VALUE, SENSOR_ID)
INSTITUTIONS = [("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl")]


@dataclass(frozen=True)
class Case:
    """One corpus row: its fields as text (None: missing) and what should happen to it (None: accepted)."""

    reason: RejectReason | None
    fields: dict[str, str | None]

    @property
    def tag(self) -> str | None:
        return self.fields[SENSOR_ID]


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def text_cases(rules: ReadingRules, fixture_copy: dict[str, Any] | None) -> list[Case]:
    """A row for every reason validation assigns, a within-file duplicate, and (optionally) a good row's copy."""
    high = rules.plausible["temp"][1]

    def row(tag: str, reason: RejectReason | None, **overrides: str | None) -> Case:
        fields: dict[str, str | None] = {
            ENTITY_ID: f"corpus-{tag}",
            REGION: "north",
            METRIC: "temp",
            EVENT_TIME: _iso(START + timedelta(hours=1)),
            VALUE: "1.5",
            SENSOR_ID: tag,
        }
        fields.update(overrides)
        return Case(reason, fields)

    cases = [
        row("ok-edge", None, EVENT_TIME=_iso(START), VALUE=repr(high)),  # both bounds inclusive
        row("twice", None),
        row("twice", R.DUPLICATE),  # an exact copy of the row before it
        row("no-entity", R.MISSING_FIELD, entity_id=None),
        row("no-value", R.MISSING_FIELD, value=None),
        row("no-time", R.MISSING_FIELD, event_time=None),
        row("no-region", R.MISSING_FIELD, region=None),
        row("mistyped", R.MISTYPED_FIELD, value="abc"),
        row("bad-time", R.UNPARSEABLE_TIME, event_time="not a time"),
        row("late", R.OUT_OF_INTERVAL, event_time=_iso(END)),  # the end is exclusive
        row("early", R.OUT_OF_INTERVAL, event_time=_iso(START - timedelta(seconds=1))),
        row("metric", R.UNKNOWN_METRIC, metric="humidity"),
        row("region", R.UNKNOWN_REGION, region="atlantis"),
        row("nan", R.NON_FINITE_VALUE, value="NaN"),
        row("neg-inf", R.NON_FINITE_VALUE, value="-inf"),
        row("too-high", R.OUT_OF_RANGE, value=repr(high + 1.0)),
        row("first-wins", R.UNKNOWN_METRIC, metric="humidity", value="NaN", region="atlantis"),
    ]
    if fixture_copy is not None:
        cases.append(
            Case(
                R.DUPLICATE,
                {
                    **{f: str(fixture_copy[f]) for f in FIELDS[:3]},
                    EVENT_TIME: _iso(fixture_copy[EVENT_TIME]),
                    VALUE: repr(fixture_copy[VALUE]),
                    SENSOR_ID: None,
                },
            )
        )
    return cases


def native_cases(rules: ReadingRules, fixture_copy: dict[str, Any]) -> list[tuple[RejectReason | None, dict[str, Any]]]:
    """Parquet-native rows (timestamp, float64) with the faults a typed file can carry, and a good row's copy."""
    high = rules.plausible["temp"][1]

    def row(tag: str, reason: RejectReason | None, **overrides: Any) -> tuple[RejectReason | None, dict[str, Any]]:
        fields = {
            ENTITY_ID: f"native-{tag}",
            REGION: "south",
            METRIC: "temp",
            EVENT_TIME: START + timedelta(hours=2),
            VALUE: 2.0,
            SENSOR_ID: tag,
        }
        return reason, {**fields, **overrides}

    return [
        row("n-ok", None),
        row("n-null-value", R.MISSING_FIELD, value=None),
        row("n-null-time", R.MISSING_FIELD, event_time=None),
        row("n-nan", R.NON_FINITE_VALUE, value=math.nan),
        row("n-inf", R.NON_FINITE_VALUE, value=math.inf),
        row("n-late", R.OUT_OF_INTERVAL, event_time=END),
        row("n-range", R.OUT_OF_RANGE, value=high + 0.5),
        row("n-region", R.UNKNOWN_REGION, region="west"),
        (R.DUPLICATE, {**fixture_copy, SENSOR_ID: None}),
    ]


@dataclass
class Corpus:
    """What was added to one institution's feed directory, and what must come of it."""

    files: list[Path]
    reasons: list[RejectReason | None]  # per added (parsable) row
    tagged: Counter[tuple[str, str]]  # (sensor tag, reason) of every rejected tagged row
    malformed: list[str]  # the malformed lines' text
    rows_by_tag: dict[str, tuple[Path, int]]  # Parquet only: where each tagged row sits (file, row)

    @property
    def rows(self) -> int:
        return len(self.reasons) + len(self.malformed)

    def rejected(self) -> Counter[str]:
        counts = Counter(str(r) for r in self.reasons if r is not None)
        if self.malformed:
            counts[str(R.MALFORMED_RECORD)] += len(self.malformed)
        return counts


def _tagged(cases: list[tuple[RejectReason | None, dict[str, Any]]]) -> Counter[tuple[str, str]]:
    return Counter((f[SENSOR_ID], str(r)) for r, f in cases if r is not None and f[SENSOR_ID] is not None)


def write_corpus(directory: Path, fmt: str, rules: ReadingRules, fixture_copy: dict[str, Any]) -> Corpus:
    if fmt == "parquet":
        cases = text_cases(rules, None)
        text_path = directory / "corpus-text.parquet"
        pq.write_table(pa.table({f: pa.array([c.fields[f] for c in cases], pa.string()) for f in FIELDS}), text_path)
        natives = native_cases(rules, fixture_copy)
        native_path = directory / "corpus-native.parquet"
        pq.write_table(
            pa.table(
                {
                    **{f: pa.array([r[f] for _, r in natives], pa.string()) for f in (ENTITY_ID, REGION, METRIC)},
                    EVENT_TIME: pa.array([r[EVENT_TIME] for _, r in natives], pa.timestamp("us", tz="UTC")),
                    VALUE: pa.array([r[VALUE] for _, r in natives], pa.float64()),
                    SENSOR_ID: pa.array([r[SENSOR_ID] for _, r in natives], pa.string()),
                }
            ),
            native_path,
        )
        all_cases = [(c.reason, c.fields) for c in cases] + natives
        where = {c.tag: (text_path, i) for i, c in enumerate(cases) if c.tag and c.reason is not R.DUPLICATE}
        where |= {r[SENSOR_ID]: (native_path, i) for i, (_, r) in enumerate(natives) if r[SENSOR_ID]}
        return Corpus([text_path, native_path], [r for r, _ in all_cases], _tagged(all_cases), [], where)

    cases = text_cases(rules, fixture_copy)
    path = directory / f"corpus.{fmt}"
    if fmt == "csv":
        malformed = [f"corpus-extra,north,temp,{_iso(START)},1.0,extra-tag,ONE-TOO-MANY"]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(FIELDS)
            for i, case in enumerate(cases):
                writer.writerow(["" if case.fields[f] is None else case.fields[f] for f in FIELDS])
                if i == 3:
                    handle.write(malformed[0] + "\n")
    else:
        malformed = ["this is not json", json.dumps([1, 2, 3])]

        def jsonl(case: Case) -> str:
            record: dict[str, Any] = {}
            for f in FIELDS:
                value = case.fields[f]
                if value is None:
                    continue  # missing: the key is absent
                if f == VALUE:
                    try:
                        record[f] = float(value)  # a JSON number (NaN and -Infinity as Python's json writes them)
                        continue
                    except ValueError:
                        pass
                record[f] = value
            return json.dumps(record)

        lines = [jsonl(c) for c in cases]
        lines[5:5] = malformed[:1]
        lines[9:9] = ["", malformed[1]]  # a blank line is skipped, not counted
        path.write_text("\n".join(lines) + "\n")
    all_cases = [(c.reason, c.fields) for c in cases]
    return Corpus([path], [r for r, _ in all_cases], _tagged(all_cases), malformed, {})


def fixture_outcomes(table: pa.Table, rules: ReadingRules) -> list[RejectReason | None]:
    """The plain-Python verdict on the fixture's own (typed) readings."""
    out: list[RejectReason | None] = []
    for row in table.to_pylist():
        low, high = rules.plausible[row[METRIC]]
        assert row[REGION] in rules.regions and rules.start <= row[EVENT_TIME] < rules.end
        out.append(None if low <= row[VALUE] <= high else R.OUT_OF_RANGE)
    return out


def read_dead_letters(directory: str) -> list[dict[str, Any]]:
    files = sorted(Path(directory).glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@dataclass
class Outcome:
    federation: Federation
    plan: ReleasePlan
    config: Config
    corpora: dict[str, Corpus]
    fixture_rejects: dict[str, Counter[tuple[str, str, str]]]  # (entity, metric, reason) of fixture rows
    copies: dict[str, tuple[str, str]]  # (entity, metric) of the good fixture row copied into the corpus
    fixture_rows: dict[str, int]
    headers: dict[str, Any]  # institution -> its envelope header (reject counts only)
    reports: dict[str, dict[str, Any]]  # institution -> its local report (read, accepted, rejected)

    def institution(self, name: str) -> InstitutionConfig:
        return self.config.institution(name)


@pytest.fixture
def outcome(make_federation: Callable[..., Federation]) -> Outcome:
    federation = make_federation(institutions=INSTITUTIONS, noise=False, mode="test")
    config = federation.config
    plan = plan_release(config, START, END)
    rules = plan.rules
    corpora, fixture_rejects, fixture_rows, copies = {}, {}, {}, {}
    for name, fmt in INSTITUTIONS:
        raw = federation.raw[name]
        verdicts = fixture_outcomes(raw, rules)
        half = raw.num_rows // 2  # conftest writes the first half to part-0, the copy lands in another file
        first_good = next(i for i in range(half) if verdicts[i] is None)
        copy = raw.slice(first_good, 1).to_pylist()[0]
        corpora[name] = write_corpus(federation.directory / "feeds" / name, fmt, rules, copy)
        fixture_rows[name] = raw.num_rows
        fixture_rejects[name] = Counter(
            (r[ENTITY_ID], r[METRIC], str(v)) for r, v in zip(raw.to_pylist(), verdicts, strict=True) if v is not None
        )
        copies[name] = (copy[ENTITY_ID], copy[METRIC])
    reports = run_contributions(plan, config.institutions)
    headers = {
        i.id: unpack_envelope(read_bytes(contribution_path(config.exchange_path, plan.key, i.id)))[0]
        for i in config.institutions
    }
    return Outcome(
        federation,
        plan,
        config,
        corpora,
        fixture_rejects,
        copies,
        fixture_rows,
        headers,
        reports,
    )


def test_corpus_covers_every_reason(outcome: Outcome) -> None:
    batch_reasons = set(R) - {R.LATE}  # lateness exists only in a stream (tests/pipelines/test_stream.py)
    for name, fmt in INSTITUTIONS:
        expected = batch_reasons if fmt != "parquet" else batch_reasons - {R.MALFORMED_RECORD}
        assert set(outcome.corpora[name].rejected()) == {str(r) for r in expected}


def test_row_counts_reconcile_and_match_the_corpus(outcome: Outcome) -> None:
    assert set(outcome.headers) == {name for name, _ in INSTITUTIONS}
    for name, _ in INSTITUTIONS:
        corpus = outcome.corpora[name]
        fixture = outcome.fixture_rejects[name]
        rejected = corpus.rejected() + Counter(reason for (_, _, reason), n in fixture.items() for _ in range(n))
        read = outcome.fixture_rows[name] + corpus.rows
        counts = outcome.reports[name]
        assert counts["read"] == read, name
        assert counts["read"] == counts["accepted"] + sum(counts["rejected"].values()), name
        assert counts["rejected"] == dict(rejected), name
        assert counts["accepted"] == read - sum(rejected.values()), name
        header = outcome.headers[name]
        assert header.contributors == (name,)
        # No exact count travels: reject counts are noisy tallies inside the encrypted vector.
        assert header.reject_counts == {} and json.loads(header.to_json())["reject_counts"] == {}


def test_the_shared_store_gets_reject_counts_only_as_tallies_of_the_release(outcome: Outcome) -> None:
    """Per institution and published reason, one `rejects` row decoded from the release's own vector (exact here
    only because the noise is off in this test-mode federation), with its sd; reasons that may count one row in
    several releases (no time, outside the interval) stay with the institution."""
    assert run_batch(outcome.plan).status == "released"
    rows = Store(outcome.config.store_path).read("rejects").to_pylist()
    published = {str(r) for r in PUBLISHED_REASONS}
    assert {(r["institution"], r["reason"]) for r in rows} == {(n, p) for n, _ in INSTITUTIONS for p in published}
    for name, _ in INSTITUTIONS:
        exact = outcome.reports[name]["rejected"]
        for r in (r for r in rows if r["institution"] == name):
            assert r["count"] == exact.get(r["reason"], 0) and r["count_sd"] == 0, r
        assert set(exact) - published  # unpublished reasons exist in the corpus, and are not in the store


def test_dead_letters_hold_exactly_the_rejected_rows(outcome: Outcome) -> None:
    for name, fmt in INSTITUTIONS:
        corpus = outcome.corpora[name]
        feed_dir = outcome.federation.directory / "feeds" / name
        letters = read_dead_letters(dead_letter_dir(outcome.plan, outcome.institution(name)))
        counts = outcome.reports[name]["rejected"]
        assert Counter(r[DEAD_LETTER_REASON] for r in letters) == Counter(counts), name

        malformed = [r for r in letters if r[DEAD_LETTER_REASON] == R.MALFORMED_RECORD]
        assert sorted(r["_text"] for r in malformed) == sorted(corpus.malformed), name
        assert all(Path(r[DEAD_LETTER_SOURCE]) == corpus.files[0] for r in malformed)
        if fmt == "jsonl":  # physical, 1-based line numbers
            assert sorted(r[DEAD_LETTER_ROW] for r in malformed) == [6, 11]

        rows = [r for r in letters if r[DEAD_LETTER_REASON] != R.MALFORMED_RECORD]
        tagged = [r for r in rows if r.get(SENSOR_ID) is not None]
        assert Counter((r[SENSOR_ID], r[DEAD_LETTER_REASON]) for r in tagged) == corpus.tagged, name
        untagged = Counter((r[ENTITY_ID], r[METRIC], r[DEAD_LETTER_REASON]) for r in rows if r.get(SENSOR_ID) is None)
        # the fixture's own rejects, and the later of the two copies of the good row (in file, then row order)
        assert untagged == outcome.fixture_rejects[name] + Counter([(*outcome.copies[name], str(R.DUPLICATE))]), name

        for r in rows:
            if r[DEAD_LETTER_REASON] == R.DUPLICATE:  # the copy's own file and row
                source = Path(r[DEAD_LETTER_SOURCE])
                assert source.parent == feed_dir and r[DEAD_LETTER_ROW] >= 0, r
                if source.suffix == ".parquet":
                    original = pq.read_table(source).slice(r[DEAD_LETTER_ROW], 1).to_pylist()[0]
                    assert all(str(original[f]) == str(r[f]) for f in (ENTITY_ID, METRIC, REGION)), (original, r)
            elif r.get(SENSOR_ID) is not None:
                assert Path(r[DEAD_LETTER_SOURCE]) in corpus.files, r
            else:
                assert Path(r[DEAD_LETTER_SOURCE]).parent == feed_dir and Path(r[DEAD_LETTER_SOURCE]).stem.startswith(
                    "part-"
                )
        # Parquet: a dead letter's row number is the row of its file
        for r in tagged:
            if r[SENSOR_ID] in corpus.rows_by_tag and r[DEAD_LETTER_REASON] != R.DUPLICATE:
                path, index = corpus.rows_by_tag[r[SENSOR_ID]]
                assert (Path(r[DEAD_LETTER_SOURCE]), r[DEAD_LETTER_ROW]) == (path, index), r


def test_dead_letters_keep_the_raw_text(outcome: Outcome) -> None:
    """A rejected text row comes back exactly as written, so an operator can find and fix it."""
    letters = read_dead_letters(dead_letter_dir(outcome.plan, outcome.institution("beta")))
    by_tag = {r[SENSOR_ID]: r for r in letters if r.get(SENSOR_ID) and r[DEAD_LETTER_REASON] != R.DUPLICATE}
    high = outcome.plan.rules.plausible["temp"][1]
    assert by_tag["mistyped"][VALUE] == "abc"
    assert by_tag["bad-time"][EVENT_TIME] == "not a time"
    assert by_tag["too-high"][VALUE] == repr(high + 1.0)
    assert by_tag["no-entity"][ENTITY_ID] is None
    assert by_tag["first-wins"][DEAD_LETTER_REASON] == R.UNKNOWN_METRIC


def test_dead_letter_row_points_into_files_larger_than_a_batch(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "parquet")], quorum=1, entities=2)
    with federation.config_path.open("a") as handle:
        handle.write("[pipeline]\nbatch_rows = 1024\n")
    config = federation.config
    assert config.pipeline.batch_rows == 1024
    n, bad = 1100, 1050
    pq.write_table(
        pa.table(
            {
                ENTITY_ID: [f"big-{i}" for i in range(n)],
                REGION: ["east"] * n,
                METRIC: ["temp"] * n,
                EVENT_TIME: pa.array([START + timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
                VALUE: [math.nan if i == bad else 1.0 for i in range(n)],
            }
        ),
        federation.directory / "feeds" / "alpha" / "big.parquet",
    )
    plan = plan_release(config, START, END)
    run_contributions(plan, config.institutions)
    letters = read_dead_letters(dead_letter_dir(plan, config.institution("alpha")))
    big = [r for r in letters if r[DEAD_LETTER_SOURCE].endswith("big.parquet")]
    assert [(r[ENTITY_ID], r[DEAD_LETTER_REASON]) for r in big] == [(f"big-{bad}", str(R.NON_FINITE_VALUE))]
    assert big[0][DEAD_LETTER_ROW] == bad


def test_rows_of_other_intervals_never_decide_whether_an_institution_contributes(
    make_federation: Callable[..., Federation],
) -> None:
    """An hourly release of six-hour files rejects five sixths of each file as out_of_interval. With a configured
    per-cell cap below that count the release still goes ahead: only the published reasons are tallied, each
    clamped to the cap, so readings of other releases cannot stop this one (an un-noised, cross-release signal)."""
    federation = make_federation(noise=False)
    text = federation.config_path.read_text().replace('id = "alpha"', 'id = "alpha"\nmax_readings_per_cell = 12', 1)
    federation.config_path.write_text(text)
    hour = plan_release(federation.config, START, START + timedelta(hours=1))
    assert hour.params.cell_caps["alpha"] == 12
    summary = run_batch(hour)
    assert summary.status == "released"
    assert summary.row_counts["alpha"]["rejected"]["out_of_interval"] > 12
    rows = Store(federation.config.store_path).read("rejects").to_pylist()
    assert {r["reason"] for r in rows} == {str(r) for r in PUBLISHED_REASONS}

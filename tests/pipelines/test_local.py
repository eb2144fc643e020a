"""The role steps run in process (pipelines/local.py) release exactly what the Beam pipelines release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from fusion.release.plan import plan_release
from fusion.store.delta import Store
from pipelines.batch import run_batch
from schemas.readings import DEAD_LETTER_REASON
from tests.conftest import END, START

pytestmark = pytest.mark.e2e


def released(store_path: str) -> list[dict[str, object]]:
    table = Store(store_path).read("releases").drop_columns(["released_at"])
    return table.sort_by([("metric", "ascending"), ("region", "ascending"), ("window_start", "ascending")]).to_pylist()


def test_in_process_and_beam_releases_are_identical(make_federation):
    # Same feeds, same test seed: identical noise shares, so identical releases whichever way the steps run.
    statistics = "variance = true\nquantiles = true\nhistogram_bins = 8"
    by_beam = make_federation(noise=True, seed=11, subdir="beam", statistics=statistics)
    local = make_federation(noise=True, seed=11, subdir="local", statistics=statistics)
    # Naming the runner makes `run_batch` build the aggregator's pipelines too (and spread the scan shards).
    run_batch(plan_release(by_beam.config, START, END), beam_args=["--runner=DirectRunner"])
    summary = run_batch(plan_release(local.config, START, END), in_process=True)
    assert summary.status == "released" and summary.cells == 36
    assert released(by_beam.config.store_path) == released(local.config.store_path)
    beam_rejects = Store(by_beam.config.store_path).read("rejects").drop_columns(["recorded_at"]).to_pylist()
    local_rejects = Store(local.config.store_path).read("rejects").drop_columns(["recorded_at"]).to_pylist()
    assert sorted(map(str, beam_rejects)) == sorted(map(str, local_rejects))


@pytest.mark.parametrize("in_process", [False, True])
def test_text_feeds_are_parsed_once_however_many_scan_shards(make_federation, monkeypatch, in_process):
    # 3,600 readings an institution and 1,024 a scan shard: several shards each. The CSV and JSON-lines files are
    # parsed once into staged Parquet copies, which every shard scans; the release is the one-shard release.
    import fusion.feeds.scan
    from tests.fusion.feeds.test_scan import append_malformed

    def federation(subdir: str, extra: str = ""):
        made = make_federation(noise=True, seed=11, subdir=subdir, entities=100, extra=extra)
        append_malformed(made, "beta", "csv")
        append_malformed(made, "gamma", "jsonl")
        return made

    one, many = federation("one"), federation("many", "[pipeline]\nshard_rows = 1024\n")
    plan = plan_release(many.config, START, END)
    assert all(fusion.feeds.scan.scan_shards(plan, i) > 1 for i in many.config.institutions)
    parsed: list[str] = []
    read_feed_file = fusion.feeds.scan.read_feed_file

    def counting(path, *args, **kwargs):
        parsed.append(path)
        return read_feed_file(path, *args, **kwargs)

    monkeypatch.setattr(fusion.feeds.scan, "read_feed_file", counting)
    assert run_batch(plan, in_process=in_process).status == "released"
    text_files = sorted(str(p) for p in (many.directory / "feeds").rglob("*") if p.suffix in (".csv", ".jsonl"))
    assert sorted(parsed) == text_files  # each exactly once
    monkeypatch.setattr(fusion.feeds.scan, "read_feed_file", read_feed_file)
    run_batch(plan_release(one.config, START, END), in_process=in_process)
    assert released(many.config.store_path) == released(one.config.store_path)

    for name in ("alpha", "beta", "gamma"):
        dead = many.directory / "deadletter" / name
        assert not list(dead.rglob("_staging*")), "staged files are deleted after the run"
        report = json.loads(next(dead.rglob("report.json")).read_text())
        assert report["read"] == report["accepted"] + sum(report["rejected"].values())
        assert report == json.loads(next((one.directory / "deadletter" / name).rglob("report.json")).read_text())
        malformed = [
            row
            for path in dead.rglob("*.parquet")
            for row in pq.read_table(path).to_pylist()
            if row.get(DEAD_LETTER_REASON) == "malformed_record"
        ]
        assert len(malformed) == (0 if name == "alpha" else 1)


@pytest.mark.parametrize("entity_level", [False, True])
def test_staged_text_feeds_release_what_one_shard_releases(make_federation, entity_level):
    # Edge readings (rounding edges, invalid rows, exact duplicates) and an unparseable line in each text feed:
    # several scan shards, with the text files staged, release and count exactly what one shard does.
    from tests.fusion.feeds.test_scan import STATISTICS, append_malformed, write_edge_feeds

    extra = 'unit = "entity"\nmax_partitions = 4\nmax_readings_per_partition = 2' if entity_level else ""

    def federation(subdir: str, pipeline: str = ""):
        made = make_federation(noise=True, seed=11, subdir=subdir, statistics=STATISTICS, extra_privacy=extra,
                               extra=pipeline)
        write_edge_feeds(made)
        append_malformed(made, "beta", "csv")
        append_malformed(made, "gamma", "jsonl")
        return made

    one, several = federation("one"), federation("several", "[pipeline]\nshard_rows = 1024\n")
    plans = [plan_release(f.config, START, END) for f in (one, several)]
    import fusion.feeds.scan

    # Parquet's rows are counted; text's are estimated from the files' sizes.
    assert [fusion.feeds.scan.scan_shards(plans[1], i) for i in several.config.institutions] == [3, 4, 9]
    summaries = [run_batch(plan, in_process=True) for plan in plans]
    # Bounding draws which readings to keep per shard, so at entity level only how many it leaves out may differ.
    counts = [{i: {k: v for k, v in c.items() if k != "bounded"} for i, c in s.row_counts.items()} for s in summaries]
    assert counts[0] == counts[1]
    assert all(summaries[1].row_counts[i]["rejected"]["duplicate"] > 0 for i in ("alpha", "beta", "gamma"))
    if not entity_level:  # bounding draws its choices per shard, so entity-level releases differ by design
        assert released(several.config.store_path) == released(one.config.store_path)


def test_staged_files_a_crashed_run_left_are_removed_by_the_next(make_federation):
    # A run that dies after sealing (os._exit skips its clean-up) leaves staged files; the next run for the
    # interval removes them even for institutions it does not run again.
    from pipelines.contribute import staging_dir
    from pipelines.run import run_contributions

    federation = make_federation(extra="[pipeline]\nshard_rows = 1024\n")
    plan = plan_release(federation.config, START, END)
    run_contributions(plan, federation.config.institutions, in_process=True)
    left = []
    for institution in federation.config.institutions:
        path = Path(staging_dir(plan, institution)) / "00000-s0000.arrow"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"staged by a crashed run")
        left.append(path.parent)
    run_contributions(plan, federation.config.institutions, in_process=True)  # every envelope is already sealed
    assert not any(path.exists() for path in left)


def test_every_shard_reads_the_files_listed_when_the_run_was_planned(make_federation):
    # A file landing while a run is under way is in none of its shards (the next run reads it): it can never be
    # counted by some shards and not others, nor shift the positions by which staged files are found. The late
    # file here sorts first and copies another file, so reading it anywhere would show as duplicates.
    from fusion.feeds.scan import scan_shards
    from pipelines.contribute import PARTIAL, ContributeShard, MergePartials, StageFeed, scan_work
    from pipelines.local import combine, run_dofn

    federation = make_federation(entities=100, extra="[pipeline]\nshard_rows = 1024\n")
    plan = plan_release(federation.config, START, END)
    beta = federation.config.institution("beta")
    assert scan_shards(plan, beta) > 1
    work = scan_work(plan, [beta])
    staged, staging = run_dofn(StageFeed(plan, work.sources), work.staging)
    assert len(staged) == 2
    feeds = federation.directory / "feeds" / "beta"
    (feeds / "part-0-late.csv").write_text((feeds / "part-1.csv").read_text())
    partials, _ = run_dofn(ContributeShard(plan, work.sources), work.shards, dict(staged))
    total = combine(MergePartials(), [p for _, p in partials + staging[PARTIAL]])
    assert total.reconciles() and not total.rejected
    assert total.rows_read == total.rows_accepted == federation.raw["beta"].num_rows


@pytest.mark.parametrize(("beam_args", "in_process"), [([], True), (["--runner=DirectRunner"], False)])
def test_batch_runs_in_process_unless_beam_options_are_given(
    make_federation, monkeypatch: pytest.MonkeyPatch, beam_args: list[str], in_process: bool
) -> None:
    """`fusion batch` without Beam options runs the contributions in process (no pipeline is built); any Beam
    option (here the DirectRunner, named) builds the pipeline."""
    import pipelines.local

    fed = make_federation(subdir="default" if in_process else "named")
    local, built = [], []
    contribute = pipelines.local.contribute_locally
    monkeypatch.setattr(pipelines.local, "contribute_locally", lambda *a, **k: local.append(1) or contribute(*a, **k))
    run = beam.Pipeline.run
    monkeypatch.setattr(beam.Pipeline, "run", lambda self, *a, **k: built.append(1) or run(self, *a, **k))
    assert run_batch(plan_release(fed.config, START, END), beam_args=beam_args).status == "released"
    assert (bool(local), bool(built)) == (in_process, not in_process)


class _Slow(beam.DoFn):
    """Sleeps less for later elements (so threads finish out of order) and tags odd ones; counts its setups."""

    setups: ClassVar[list[beam.DoFn]] = []  # the instances themselves: kept alive, their ids stay distinct

    def setup(self):
        self.setups.append(self)

    def process(self, element):
        import time

        time.sleep(0.02 * (5 - element))
        yield element * 10
        if element % 2:
            yield beam.pvalue.TaggedOutput("odd", element)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_steps_run_side_by_side_give_their_outputs_in_order(workers):
    from pipelines.local import run_dofn, run_dofn_each

    _Slow.setups = []
    main, tagged = run_dofn_each(_Slow, [0, 1, 2, 3, 4], workers=workers)
    assert (main, dict(tagged)) == (lambda m, t: (m, dict(t)))(*run_dofn(_Slow(), [0, 1, 2, 3, 4]))
    assert main == [0, 10, 20, 30, 40] and tagged["odd"] == [1, 3]
    # Side by side, each element has an instance of its own (a DoFn's state is not shared between threads).
    assert len({id(d) for d in _Slow.setups[:-1]}) == (1 if workers == 1 else 5)


def test_one_worker_and_several_release_the_same(make_federation):
    # Many scan shards (staged text files, edge readings, rejects, duplicates, malformed lines): `[pipeline] workers`
    # only says how many steps run at a time; the cells, the rejects and every institution's report are the same.
    from tests.fusion.feeds.test_scan import STATISTICS, append_malformed, write_edge_feeds

    def federation(subdir: str, workers: int):
        made = make_federation(noise=True, seed=11, subdir=subdir, statistics=STATISTICS,
                               extra=f"[pipeline]\nshard_rows = 1024\nworkers = {workers}\n")
        write_edge_feeds(made)
        append_malformed(made, "beta", "csv")
        append_malformed(made, "gamma", "jsonl")
        return made

    feds = [federation(f"w{w}", w) for w in (1, 3)]
    for fed in feds:
        assert run_batch(plan_release(fed.config, START, END)).status == "released"
    assert released(feds[0].config.store_path) == released(feds[1].config.store_path)
    rejects = [Store(f.config.store_path).read("rejects").drop_columns(["recorded_at"]).to_pylist() for f in feds]
    assert sorted(map(str, rejects[0])) == sorted(map(str, rejects[1]))
    for name in ("alpha", "beta", "gamma"):
        reports = [json.loads(next((f.directory / "deadletter" / name).rglob("report.json")).read_text()) for f in feds]
        assert reports[0] == reports[1] and reports[0]["rejected"]
        letters = [sorted(str(r).replace(str(f.directory), "") for p in (f.directory / "deadletter" / name).rglob(
            "*.parquet") for r in pq.read_table(p).to_pylist()) for f in feds]
        assert letters[0] == letters[1]


class _Fails(beam.DoFn):
    started: ClassVar[list[int]] = []

    def process(self, element):
        import time

        self.started.append(element)
        if element == 0:
            raise ValueError("element 0 is bad")
        time.sleep(0.05)
        yield element


def test_a_failing_step_stops_the_steps_not_yet_started():
    from pipelines.local import run_dofn_each

    _Fails.started = []
    with pytest.raises(ValueError, match="element 0 is bad"):
        run_dofn_each(_Fails, list(range(20)), workers=2)
    assert 0 in _Fails.started and len(_Fails.started) < 20


class _LongScan(beam.DoFn):
    """Element 1 'scans' for 20 s unless interrupted; element 0 fails at once."""

    def setup(self):
        import threading

        self.stop = threading.Event()

    def interrupt(self):
        self.stop.set()

    def process(self, element):
        if element == 0:
            import time

            time.sleep(0.2)  # element 1 is running by now
            raise ValueError("element 0 is bad")
        if self.stop.wait(20):
            raise RuntimeError("interrupted")
        yield element


def test_a_failing_step_interrupts_the_scans_running_beside_it():
    import time

    from pipelines.local import run_dofn_each

    started = time.monotonic()
    with pytest.raises(ValueError, match="element 0 is bad"):
        run_dofn_each(_LongScan, [0, 1], workers=2)
    assert time.monotonic() - started < 5  # not the 20 s the other scan would have taken

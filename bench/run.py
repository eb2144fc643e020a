"""`make bench`: Fusion against plain DuckDB and PipelineDP, side by side on the same generated data.

    python -m bench.run --rows 10000000            # what `make bench` runs (N=... overrides the rows)

Every measurement runs in its own process (so peak memory is its own), one after another, in the same run; the
figures that matter are ratios against the references of the same run, which stay meaningful on a shared,
noisy machine. Prints a table and writes bench/results/<timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.generate import BenchData, generate

ROOT = Path(__file__).resolve().parent.parent
DEPS = ROOT / "bench" / ".deps"
#: Fresh-process runs of the per-release measurement (a release takes well under a second): the median is judged.
FIXED_RUNS = 3
#: The per-release measurement is repeated on a store holding this many days of earlier releases (24,000 cells a
#: day, 8.8M rows at a year): a release's cost must not grow with the store it writes to.
HISTORY_DAYS = 365

TARGETS = {
    "fusion_vs_duckdb_event": 0.35,
    "fusion_vs_duckdb_checked_event": 1.3,
    "fusion_vs_duckdb_entity": 0.25,
    "fusion_vs_duckdb_bounded_entity": 1.0,
    "fixed_seconds_max": 0.6,
    # Fusion's own: the per-release cost on a store holding a year of releases over that on a new store (it was
    # 10.1 s against 0.6 s while inserts and lookups read every release's keys).
    "store_history_ratio_max": 1.25,
    # Throughput "flat or rising" with the readings: each size at least this fraction of the previous one's rate
    # (the shared machine moves rates by more than a few percent from run to run).
    "scaling_min_ratio": 0.9,
    "fusion_vs_pipelinedp": 100.0,
    "he_share_max": 0.10,
    "envelope_bytes_per_component_max": 32.0,
    "peak_memory_mb_max": 1536.0,
    "sql_ratio_max": 1.5,
    # Streaming (bench/stream.py, bench/brokers.py): readings/s into released windows, and the seconds from a burst
    # of 24 windows becoming closable to the last of them being queryable (beyond the allowed lateness, 0 here).
    "stream_readings_per_s_min": 200_000.0,
    "stream_latency_s_max": 2.0,
}

#: What `--streaming` runs (each its own process, writing its own JSON under bench/results/).
STREAM_RUNS = {
    "directory": ["bench.stream", "--readings", "2000000"],
    "burst": ["bench.stream", "--burst", "24"],
    "brokers": ["bench.brokers", "--readings", "1500000", "--per-message", "1000", "--sources", "nats,mqtt"],
}


def measure_streaming(results_dir: Path, log: Any) -> dict[str, Any]:
    """The streaming figures: sustained readings/s from a feed directory and from each broker into released
    windows, and a burst's latency (each run's JSON written into `results_dir`); a run that fails (a broker not
    running) is recorded with its error."""
    results: dict[str, Any] = {}
    files = {"directory": "stream.json", "burst": "stream_burst.json", "brokers": "brokers.json"}
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, command in STREAM_RUNS.items():
        log(f"streaming: {' '.join(command)} ...")
        out = results_dir / files[name]
        argv = [sys.executable, "-m", *command, "--out", str(out if name != "burst" else results_dir / "stream.json")]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
            continue
        results[name] = json.loads(out.read_text())
    summary: dict[str, Any] = {}
    directory = results.get("directory", {})
    if "end_to_end_readings_per_s" in directory:
        summary["directory_readings_per_s"] = directory["end_to_end_readings_per_s"]
        summary["directory_ingest_readings_per_s"] = directory["ingest_readings_per_s"]
    for run in results.get("brokers", {}).get("runs", []):
        summary[f"{run['source']}_readings_per_s"] = run["readings_per_s_into_released_windows"]
        summary[f"{run['source']}_readings_per_cpu_s"] = run["readings_per_cpu_s"]
    if "latency_s_last_window" in results.get("burst", {}):
        summary["burst_windows"] = results["burst"]["windows_closable_together"]
        summary["burst_latency_s"] = results["burst"]["latency_s_last_window"]
    summary["errors"] = {name: r["error"] for name, r in results.items() if "error" in r}
    return summary


def _child(module: str, kind: str | None, args: dict[str, Any], *, extra_path: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-m", module] + ([kind] if kind else []) + [json.dumps(args)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH-RESULT "))
            return result
    raise RuntimeError(f"{module} {kind or ''} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def measure_all(
    data: BenchData,
    workdir: Path,
    *,
    pipelinedp_rows: int,
    sql_days: int,
    fixed_rows: int = 10_000,
    history_days: int = HISTORY_DAYS,
    entity_level: bool = True,
    noise: bool = True,
    beam_args: list[str] | None = None,
    in_process: bool | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run every measurement in turn; returns the raw figures and the derived ratios."""
    base = {"data": str(data.directory), "rows": data.rows, "institutions": list(data.institutions)}
    results: dict[str, Any] = {}
    log("duckdb: plain GROUP BY over the same Parquet ...")
    results["duckdb"] = _child("bench.measure", "duckdb", {**base, "workdir": str(workdir / "duckdb")})
    log("duckdb: the same checks and exact de-duplication, then the GROUP BY ...")
    results["duckdb_checked"] = _child(
        "bench.measure", "duckdb_checked", {**base, "workdir": str(workdir / "duckdb-checked")}
    )
    log("fusion: event level, end to end ...")
    results["fusion_event"] = _child(
        "bench.measure",
        "fusion",
        {
            **base,
            "workdir": str(workdir / "fusion-event"),
            "noise": noise,
            "beam_args": beam_args or [],
            "in_process": in_process,
        },
    )
    if entity_level:
        log("duckdb: the same checks, de-duplication and L0/Linf bounding (window functions), then the GROUP BY ...")
        results["duckdb_bounded"] = _child(
            "bench.measure", "duckdb_bounded", {**base, "workdir": str(workdir / "duckdb-bounded")}
        )
        log("fusion: entity level, end to end ...")
        results["fusion_entity"] = _child(
            "bench.measure",
            "fusion",
            {
                **base,
                "workdir": str(workdir / "fusion-entity"),
                "entity_level": True,
                "noise": noise,
                "beam_args": beam_args or [],
                "in_process": in_process,
            },
        )
    log("fusion: its per-reading work alone (scan, de-duplicate, bound, pack; no Beam, no sealing) ...")
    results["readings_event"] = _child("bench.measure", "readings", {**base, "workdir": str(workdir / "readings")})
    if entity_level:
        results["readings_entity"] = _child(
            "bench.measure", "readings", {**base, "workdir": str(workdir / "readings"), "entity_level": True}
        )
    if fixed_rows:
        small = generate(data.directory.parent / f"data-{fixed_rows}", fixed_rows, institutions=len(data.institutions))
        log(f"fusion: event level end to end on {fixed_rows:,} readings (the costs that do not grow with the data) ...")
        small_args = {
            "data": str(small.directory),
            "rows": small.rows,
            "institutions": list(small.institutions),
            "noise": noise,
            "beam_args": beam_args or [],
            "in_process": in_process,
        }

        def median_of_runs(key: str, args: dict[str, Any]) -> None:
            """A release takes well under a second, so one run carries the host's noise (0.60-0.70 s in three runs
            of one sitting): FIXED_RUNS fresh processes, the median reported (results[key]) and every run kept."""
            runs = [_child("bench.measure", "fusion", {**small_args, **args}) for _ in range(FIXED_RUNS)]
            results[key] = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
            results[f"{key}_runs_s"] = [run["seconds"] for run in runs]

        median_of_runs("fusion_fixed", {"workdir": str(workdir / "fusion-fixed")})
        if history_days:
            log(f"fusion: the same on a store already holding {history_days} days of releases ...")
            args = {"workdir": str(workdir / "fusion-fixed-history"), "history_days": history_days}
            median_of_runs("fusion_fixed_history", args)
            results["fusion_fixed_history"]["history_days"] = history_days
        log("fusion: the same, under cProfile, to itemise where the per-release time goes ...")
        results["fusion_fixed_profile"] = _child(
            "bench.measure",
            "fusion",
            {**small_args, "workdir": str(workdir / "fusion-fixed-profile"), "profile": True},
        )
    log("he: encrypt, sum, decrypt on the same layout ...")
    results["he"] = _child("bench.measure", "he", {**base, "workdir": str(workdir / "he")})
    if pipelinedp_rows > 0:
        log(f"pipelinedp: Beam backend at {pipelinedp_rows:,} rows ...")
        results["pipelinedp"] = _child(
            "bench.pipelinedp_ref", None, {"rows": pipelinedp_rows, "feeds": str(data.feeds)}, extra_path=DEPS
        )
    if sql_days > 0:
        log(f"sql: {sql_days} days of 15-minute releases, sandbox vs plain Parquet ...")
        results["sql"] = _child("bench.measure", "sql", {**base, "workdir": str(workdir), "days": sql_days})
    return {"raw": results, "summary": summarise(data, results)}


def worker_args(workers: int) -> list[str]:
    """Beam options for `workers` DirectRunner workers: the default (in memory) for one, worker processes else."""
    if workers == 1:
        return []
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def measure_scaling(
    sizes: list[int],
    workers: list[int],
    work: Path,
    *,
    institutions: int,
    entity_level: bool,
    noise: bool = True,
    beam_args: list[str] | None = None,
    measured: tuple[int, dict[str, Any]] | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """How throughput grows: Fusion end to end (and the DuckDB floor of the same data) at each size, with each
    number of DirectRunner workers. `measured`: (rows, raw results) of the main run, reused for its size at one
    worker instead of being measured again."""
    points: list[dict[str, Any]] = []
    for rows in sizes:
        data = generate(work / f"data-{rows}", rows, institutions=institutions)
        base = {"data": str(data.directory), "rows": rows, "institutions": list(data.institutions)}
        reuse = measured[1] if measured and measured[0] == rows else None
        if reuse is not None:
            floor = reuse["duckdb"]
        else:
            log(f"scaling: duckdb floor at {rows:,} readings ...")
            floor = _child("bench.measure", "duckdb", {**base, "workdir": str(work / "runs" / "duckdb")})
        one: dict[str, Any] = {}
        for count in workers:
            levels = [False, True] if entity_level else [False]
            point: dict[str, Any] = {"rows": rows, "workers": count, "duckdb_seconds": floor["seconds"]}
            for entity in levels:
                key = "fusion_entity" if entity else "fusion_event"
                if reuse is not None and count == 1 and key in reuse:
                    result = reuse[key]
                else:
                    log(
                        f"scaling: fusion {'entity' if entity else 'event'} level, {rows:,} readings, {count} worker(s)"
                    )
                    args = {
                        **base,
                        "workdir": str(work / "runs" / f"scaling-{key}"),
                        "entity_level": entity,
                        "noise": noise,
                        "beam_args": (beam_args or []) + worker_args(count),
                    }
                    result = _child("bench.measure", "fusion", args)
                point[f"{key}_seconds"] = result["seconds"]
                point[f"{key}_rows_per_s"] = rows / result["seconds"]
                point[f"{key}_vs_duckdb"] = floor["seconds"] / result["seconds"]
                point[f"{key}_peak_mib"] = result["peak_rss_mb"]
            point["fusion_vs_duckdb_event"] = point["fusion_event_vs_duckdb"]
            if count == 1:
                previous = [p for p in points if p["workers"] == 1]
                if previous:
                    point["vs_previous"] = point["fusion_event_rows_per_s"] / previous[-1]["fusion_event_rows_per_s"]
                    if "fusion_entity_rows_per_s" in point and "fusion_entity_rows_per_s" in previous[-1]:
                        point["vs_previous_entity"] = (
                            point["fusion_entity_rows_per_s"] / previous[-1]["fusion_entity_rows_per_s"]
                        )
                one = point
            elif one:
                point["vs_one_worker"] = point["fusion_event_rows_per_s"] / one["fusion_event_rows_per_s"]
            points.append(point)
    return points


def summarise(data: BenchData, raw: dict[str, Any]) -> dict[str, Any]:
    n = data.rows
    duck = raw["duckdb"]
    event = raw["fusion_event"]
    summary: dict[str, Any] = {
        "rows": n,
        "institutions": len(data.institutions),
        "duckdb_rows_per_s": n / duck["seconds"],
        "fusion_event_rows_per_s": n / event["seconds"],
        "fusion_vs_duckdb_event": duck["seconds"] / event["seconds"],
        "duckdb_checked_rows_per_s": n / raw["duckdb_checked"]["seconds"],
        "fusion_vs_duckdb_checked_event": raw["duckdb_checked"]["seconds"] / event["seconds"],
        "he_seconds": raw["he"]["seconds"],
        "he_share": raw["he"]["seconds"] / event["seconds"],
        "envelope_bytes_per_component": sum(event["envelope_bytes"]) / max(1, event["envelopes"]) / event["slots"],
        "peak_memory_mb": {"duckdb": duck["peak_rss_mb"], "fusion_event": event["peak_rss_mb"]},
        "fusion_event_stages_s": event["stages"],
        "readings_event_rows_per_s": n / raw["readings_event"]["seconds"],
        "readings_event_vs_duckdb": duck["seconds"] / raw["readings_event"]["seconds"],
        "scan_rows_per_s": n / raw["readings_event"]["scan_seconds"],
        "scan_vs_duckdb": duck["seconds"] / raw["readings_event"]["scan_seconds"],
    }
    if "fusion_fixed" in raw:
        summary["fixed_rows"] = sum(c["read"] for c in raw["fusion_fixed"]["row_counts"].values())
        summary["fixed_seconds"] = raw["fusion_fixed"]["seconds"]
        summary["fixed_runs_s"] = raw.get("fusion_fixed_runs_s", [raw["fusion_fixed"]["seconds"]])
        summary["fixed_stages_s"] = raw["fusion_fixed"]["stages"]
        summary["fixed_cpu_seconds"] = raw["fusion_fixed"]["cpu_seconds"]
    if "fusion_fixed_history" in raw:
        summary["history_days"] = raw["fusion_fixed_history"]["history_days"]
        summary["fixed_history_seconds"] = raw["fusion_fixed_history"]["seconds"]
        summary["fixed_history_runs_s"] = raw["fusion_fixed_history_runs_s"]
        summary["fixed_history_ratio"] = summary["fixed_history_seconds"] / summary["fixed_seconds"]
    if "fusion_fixed_profile" in raw:
        items = raw["fusion_fixed_profile"]["profile_self_seconds"]
        total = sum(items.values()) or 1.0
        summary["fixed_items_share"] = {name: value / total for name, value in items.items()}
    if "fusion_entity" in raw:
        entity = raw["fusion_entity"]
        summary["fusion_entity_rows_per_s"] = n / entity["seconds"]
        summary["fusion_vs_duckdb_entity"] = duck["seconds"] / entity["seconds"]
        summary["fusion_vs_duckdb_checked_entity"] = raw["duckdb_checked"]["seconds"] / entity["seconds"]
        if "duckdb_bounded" in raw:
            summary["duckdb_bounded_rows_per_s"] = n / raw["duckdb_bounded"]["seconds"]
            summary["fusion_vs_duckdb_bounded_entity"] = raw["duckdb_bounded"]["seconds"] / entity["seconds"]
            summary["peak_memory_mb"]["duckdb_bounded"] = raw["duckdb_bounded"]["peak_rss_mb"]
        summary["peak_memory_mb"]["fusion_entity"] = entity["peak_rss_mb"]
    if "readings_entity" in raw:
        summary["readings_entity_rows_per_s"] = n / raw["readings_entity"]["seconds"]
        summary["readings_entity_vs_duckdb"] = duck["seconds"] / raw["readings_entity"]["seconds"]
    if "pipelinedp" in raw:
        pdp = raw["pipelinedp"]
        summary["pipelinedp_rows"] = pdp["rows"]
        summary["pipelinedp_rows_per_s"] = pdp["rows"] / pdp["seconds"]
        summary["fusion_vs_pipelinedp"] = summary["fusion_event_rows_per_s"] / summary["pipelinedp_rows_per_s"]
        summary["peak_memory_mb"]["pipelinedp"] = pdp["peak_rss_mb"]
    if "sql" in raw:
        sql = raw["sql"]
        summary["sql_rows"] = sql["rows"]
        summary["sql_fusion_ms"] = 1000 * sql["fusion_seconds"]
        summary["sql_duckdb_ms"] = 1000 * sql["duckdb_seconds"]
        summary["sql_duckdb_store_files_ms"] = 1000 * sql["duckdb_store_files_seconds"]
        summary["sql_ratio"] = sql["fusion_seconds"] / sql["duckdb_seconds"]
    return summary


def masking_summary(scale: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of bench/scale.py's results: each federation size's figures, and the targets."""
    keys = ("institutions", "neighbours", "threshold", "absent", "envelope_overhead_bytes_max",
            "unmask_answer_bytes_max", "aggregator_s", "aggregator_s_per_institution", "key_holder_s")
    return {"runs": [{k: run[k] for k in keys} for run in scale["runs"]], "targets": scale["targets"]}


def table(summary: dict[str, Any]) -> Table:
    out = Table(title=f"Fusion bench: {summary['rows']:,} readings, {summary['institutions']} institutions")
    for column in ("measure", "value", "target", "met"):
        out.add_column(column, justify="right" if column != "measure" else "left")

    def row(label: str, value: str, target: str = "", met: bool | None = None) -> None:
        out.add_row(label, value, target, "" if met is None else ("yes" if met else "NO"))

    def target(key: str, label: str, value: float, text: str, *, at_most: bool = False) -> None:
        goal = TARGETS[key]
        row(
            label,
            text,
            f"{'<=' if at_most else '>='} {goal:g}{' s' if at_most else 'x'}",
            value <= goal if at_most else value >= goal,
        )

    row("DuckDB GROUP BY (non-private floor)", f"{summary['duckdb_rows_per_s']:,.0f} rows/s")
    row("DuckDB with Fusion's checks and exact de-duplication", f"{summary['duckdb_checked_rows_per_s']:,.0f} rows/s")
    if "duckdb_bounded_rows_per_s" in summary:
        row("  ... and L0/Linf bounding (window functions)", f"{summary['duckdb_bounded_rows_per_s']:,.0f} rows/s")
    row("Fusion event level, end to end", f"{summary['fusion_event_rows_per_s']:,.0f} rows/s")
    ratio = summary["fusion_vs_duckdb_checked_event"]
    target("fusion_vs_duckdb_checked_event", "  Fusion / DuckDB with the same checks", ratio, f"{ratio:.3f}x")
    ratio = summary["fusion_vs_duckdb_event"]
    target("fusion_vs_duckdb_event", "  Fusion / bare DuckDB", ratio, f"{ratio:.3f}x")
    if "fusion_entity_rows_per_s" in summary:
        row("Fusion entity level, end to end", f"{summary['fusion_entity_rows_per_s']:,.0f} rows/s")
        if "fusion_vs_duckdb_bounded_entity" in summary:
            ratio = summary["fusion_vs_duckdb_bounded_entity"]
            label = "  Fusion / DuckDB with the same checks and bounding"
            target("fusion_vs_duckdb_bounded_entity", label, ratio, f"{ratio:.3f}x")
        ratio = summary["fusion_vs_duckdb_entity"]
        target("fusion_vs_duckdb_entity", "  Fusion / bare DuckDB", ratio, f"{ratio:.3f}x")
    if "fixed_seconds" in summary:
        label = f"Per-release cost: Fusion end to end on {summary['fixed_rows']:,} readings"
        seconds = summary["fixed_seconds"]
        runs = summary.get("fixed_runs_s", [seconds])
        text = f"{seconds:.2f} s"
        if len(runs) > 1:
            text += f" (median of {len(runs)}: {min(runs):.2f}-{max(runs):.2f} s)"
        target("fixed_seconds_max", label, seconds, text, at_most=True)
        if "fixed_history_seconds" in summary:
            runs = summary["fixed_history_runs_s"]
            ratio = summary["fixed_history_ratio"]
            row(
                f"  the same on a store holding {summary['history_days']} days of releases",
                f"{summary['fixed_history_seconds']:.2f} s (runs {min(runs):.2f}-{max(runs):.2f} s): {ratio:.2f}x",
                f"<= {TARGETS['store_history_ratio_max']:g}x a new store's",
                ratio <= TARGETS["store_history_ratio_max"],
            )
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary["fixed_stages_s"].items())
        row("  its stages", stages)
        row("  its CPU time (this process)", f"{summary['fixed_cpu_seconds']:.2f} s")
        shares = sorted(summary.get("fixed_items_share", {}).items(), key=lambda item: -item[1])
        for name, share in shares:
            row(f"  {name}", f"{100 * share:.0f}% (~{share * seconds:.2f} s)")
    for point in summary.get("scaling", []):
        label = f"Scaling: {point['rows']:,} readings, {point['workers']} worker{'s' if point['workers'] > 1 else ''}"
        text = f"{point['fusion_event_rows_per_s']:,.0f} rows/s ({point['fusion_vs_duckdb_event']:.3f}x bare)"
        if "vs_previous" in point:
            text += f", {point['vs_previous']:.2f}x the last size"
        if "fusion_event_peak_mib" in point:
            text += f", peak {point['fusion_event_peak_mib']:,.0f} MiB"
        if "fusion_entity_rows_per_s" in point:
            text += f"; entity {point['fusion_entity_rows_per_s']:,.0f} rows/s"
            if "vs_previous_entity" in point:
                text += f", {point['vs_previous_entity']:.2f}x"
            if "fusion_entity_peak_mib" in point:
                text += f", peak {point['fusion_entity_peak_mib']:,.0f} MiB"
        if "vs_previous" in point:
            ratios = [point["vs_previous"], point.get("vs_previous_entity", point["vs_previous"])]
            row(
                label,
                text,
                f"flat or rising (>= {TARGETS['scaling_min_ratio']:g}x the last size, both levels)",
                min(ratios) >= TARGETS["scaling_min_ratio"],
            )
        elif "vs_one_worker" in point:
            row(label, text + f": {point['vs_one_worker']:.2f}x one worker")
        else:
            row(label, text)
    row("Fusion's scan alone (validate, encode, hash)", f"{summary['scan_rows_per_s']:,.0f} rows/s")
    row("  scan / DuckDB", f"{summary['scan_vs_duckdb']:.3f}x")
    per_reading = summary["readings_event_rows_per_s"]
    row("Fusion's per-reading work, event level (+ de-duplicate, pack)", f"{per_reading:,.0f} rows/s")
    row("  per-reading work / DuckDB: end to end's ceiling", f"{summary['readings_event_vs_duckdb']:.3f}x")
    if "readings_entity_rows_per_s" in summary:
        row("Fusion's per-reading work, entity level (+ bound)", f"{summary['readings_entity_rows_per_s']:,.0f} rows/s")
        row("  per-reading work / DuckDB: end to end's ceiling", f"{summary['readings_entity_vs_duckdb']:.3f}x")
    if "pipelinedp_rows_per_s" in summary:
        row(f"PipelineDP Beam ({summary['pipelinedp_rows']:,} rows)", f"{summary['pipelinedp_rows_per_s']:,.0f} rows/s")
        ratio = summary["fusion_vs_pipelinedp"]
        row("  Fusion / PipelineDP", f"{ratio:.1f}x", ">= 100x", ratio >= TARGETS["fusion_vs_pipelinedp"])
    share = summary["he_share"]
    row("HE share (encrypt + sum + decrypt)", f"{100 * share:.1f}%", "<= 10%", share <= TARGETS["he_share_max"])
    per = summary["envelope_bytes_per_component"]
    row("Envelope bytes per cell component", f"{per:.2f}", "<= 32", per <= TARGETS["envelope_bytes_per_component_max"])
    for name, mb in summary["peak_memory_mb"].items():
        limit = TARGETS["peak_memory_mb_max"] if name.startswith("fusion") else None
        row(f"Peak memory, {name}", f"{mb:,.0f} MiB", "< 1536 MiB" if limit else "", (mb < limit) if limit else None)
    if "sql_ratio" in summary:
        row(f"SQL time series ({summary['sql_rows']:,} release rows): sandbox", f"{summary['sql_fusion_ms']:.1f} ms")
        row("  plain DuckDB over a Parquet export", f"{summary['sql_duckdb_ms']:.1f} ms")
        row("  plain DuckDB over the store's own files", f"{summary['sql_duckdb_store_files_ms']:.1f} ms")
        ratio = summary["sql_ratio"]
        row("  sandbox / plain export", f"{ratio:.2f}x", "<= 1.5x", ratio <= TARGETS["sql_ratio_max"])
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["fusion_event_stages_s"].items())
    row("Fusion event-level stages", stages)
    streaming = summary.get("streaming", {})
    goal = TARGETS["stream_readings_per_s_min"]
    for key, label in (
        ("directory", "Stream from a feed directory, into released windows"),
        ("nats", "Stream from NATS JetStream, into released windows"),
        ("mqtt", "Stream from MQTT, into released windows"),
    ):
        if f"{key}_readings_per_s" in streaming:
            rate = streaming[f"{key}_readings_per_s"]
            row(label, f"{rate:,.0f} readings/s", f">= {goal:,.0f}/s", rate >= goal)
            if f"{key}_readings_per_cpu_s" in streaming:
                row(
                    "  per CPU second of the stream (the broker shares the cores)",
                    f"{streaming[f'{key}_readings_per_cpu_s']:,.0f}",
                )
    if "burst_latency_s" in streaming:
        latency, most = streaming["burst_latency_s"], TARGETS["stream_latency_s_max"]
        label = f"Stream: {streaming['burst_windows']} windows closable at once, the last queryable after"
        row(label, f"{latency:.2f} s", f"<= {most:g} s", latency <= most)
    for name, error in streaming.get("errors", {}).items():
        row(f"Stream run '{name}' failed", " ".join(error))
    masking = summary.get("masking_scale", {})
    for run in masking.get("runs", []):
        row(
            f"Many institutions: n = {run['institutions']} (masks with {run['neighbours']} neighbours, "
            f"{run['absent']} absent)",
            f"{run['envelope_overhead_bytes_max'] / 1024:.1f} KB beyond the ciphertexts; answer "
            f"{run['unmask_answer_bytes_max'] / 1024:.1f} KB; aggregator {run['aggregator_s']:.2f} s "
            f"({1000 * run['aggregator_s_per_institution']:.1f} ms an institution); key holder "
            f"{run['key_holder_s']:.2f} s (checking the aggregate, then decrypting)",
        )
    labels = {
        "overhead_bytes_at_500": "  per-party bytes beyond the ciphertexts, n = 500",
        "aggregator_per_institution_500_over_100": "  aggregator time per institution, n = 500 over n = 100 (linear)",
    }
    for name, result in masking.get("targets", {}).items():
        row(labels.get(name, f"  {name}"), f"{result['value']:,}", result["target"], result["met"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="readings in all (default 10M)")
    parser.add_argument("--institutions", type=int, default=5)
    parser.add_argument("--pipelinedp-rows", type=int, default=1_000_000, help="rows for PipelineDP (0: skip)")
    parser.add_argument("--sql-days", type=int, default=365, help="days of releases for the SQL test (0: skip)")
    parser.add_argument("--no-entity", action="store_true", help="skip the entity-level run")
    parser.add_argument(
        "--fixed-rows", type=int, default=10_000, help="readings for the per-release cost run (0: skip)"
    )
    parser.add_argument(
        "--history-days",
        type=int,
        default=HISTORY_DAYS,
        help="days of earlier releases in the store for the per-release cost's second measurement (0: skip)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out", help="data and scratch directory")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--beam-arg", action="append", default=[], help="extra Beam option for Fusion's runs")
    parser.add_argument(
        "--scaling",
        default="",
        help="comma-separated reading counts (e.g. 1000000,10000000,30000000): Fusion's throughput at each size, "
        "with each --scaling-workers count, as a table (default: none)",
    )
    parser.add_argument(
        "--scaling-workers",
        default="1,2",
        help="comma-separated DirectRunner worker counts for --scaling (more than one: --direct_num_workers with "
        "--direct_running_mode=multi_processing)",
    )
    parser.add_argument(
        "--beam",
        action="store_true",
        help="run Fusion's contributions as a Beam pipeline on the DirectRunner (fusion batch with a Beam option); "
        "by default the role steps run in process, as fusion batch runs them without Beam options",
    )
    parser.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure streaming: readings/s from a feed directory and from NATS JetStream and MQTT (the brokers "
        "must run on loopback) into released windows, and a burst's latency (bench/stream.py, bench/brokers.py)",
    )
    parser.add_argument(
        "--masking-scale",
        default="",
        help="comma-separated federation sizes (e.g. 5,20,100,500): double masking's costs as institutions grow "
        "(bench/scale.py, its own process; writes bench/results/scale.json) (default: skip)",
    )
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(f"generating {args.rows:,} readings for {args.institutions} institutions ...")
    data = generate(args.work / f"data-{args.rows}", args.rows, institutions=args.institutions)
    measured = measure_all(
        data,
        args.work / "runs",
        pipelinedp_rows=min(args.pipelinedp_rows, args.rows),
        sql_days=args.sql_days,
        fixed_rows=args.fixed_rows,
        history_days=args.history_days,
        entity_level=not args.no_entity,
        beam_args=args.beam_arg,
        in_process=False if args.beam else None,
        log=console.print,
    )
    if args.scaling:
        sizes = [int(size) for size in args.scaling.split(",") if size.strip()]
        workers = [int(count) for count in args.scaling_workers.split(",") if count.strip()]
        measured["summary"]["scaling"] = measure_scaling(
            sizes,
            workers,
            args.work,
            institutions=args.institutions,
            entity_level=not args.no_entity,
            beam_args=args.beam_arg,
            measured=(args.rows, measured["raw"]),
            log=console.print,
        )
    if args.streaming:
        measured["summary"]["streaming"] = measure_streaming(args.results, console.print)
    if args.masking_scale:
        console.print(f"masking at scale: {args.masking_scale} institutions ...")
        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / "scale.json"
        command = [sys.executable, "-m", "bench.scale", "--sizes", args.masking_scale, "--out", str(out)]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        measured["summary"]["masking_scale"] = masking_summary(json.loads(out.read_text()))
    report = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "targets": TARGETS,
        **measured,
    }
    console.print(table(report["summary"]))
    args.results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.results / f"{stamp}.json").write_text(text)
    (args.results / "latest.json").write_text(text)
    console.print(f"written {args.results / 'latest.json'}")
    return report


if __name__ == "__main__":
    main()

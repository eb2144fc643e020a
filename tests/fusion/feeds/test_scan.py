"""The DuckDB scan (fusion/feeds/scan.py) against the NumPy reference: validation by ReadingValidator, encoding by
privacy.encoding, packing by aggregate_readings. Same vectors, value for value, on values chosen to sit on
rounding edges; scan shards partition the readings; hashed de-duplication finds exactly the exact duplicates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.config.federation import InstitutionConfig
from fusion.feeds.files import mapped_columns, read_feed_file
from fusion.feeds.scan import (
    BIN,
    CELL,
    ENTITY,
    KEY,
    ROW,
    SOURCE,
    SUM,
    FeedScanner,
    ScanEncoding,
    ShardScan,
    encode_scanned,
    scan_shards,
    staged_sources,
)
from fusion.release.contribution import (
    aggregate_readings,
    deduplicate_reference,
    exact_bincount,
    find_duplicates,
    pack_encoded,
    shared_key_rows,
)
from fusion.release.plan import ReleasePlan, plan_release
from privacy.encoding import bin_index, encode_readings, encode_squares
from privacy.layout import SUMSQ
from schemas.readings import DEAD_LETTER_ROW, READING_SCHEMA
from schemas.validation import ReadingValidator
from tests.conftest import END, METRICS, REGIONS, START, Federation, write_feed

STATISTICS = "variance = true\nquantiles = true\nhistogram_bins = 8"


def edge_readings(rng: np.random.Generator, rows: int) -> pa.Table:
    """Readings whose values sit on rounding edges: half resolution steps (both signs), the clamp bounds and just
    beyond, -0.0, far outside the clamp (but plausible), plus a few invalid rows and exact duplicates."""
    names = list(METRICS)
    metric = rng.integers(0, len(names), size=rows)
    lower = np.array([METRICS[m][1] for m in names])[metric]
    upper = np.array([METRICS[m][2] for m in names])[metric]
    res = np.array([METRICS[m][3] for m in names])[metric]
    kind = rng.integers(0, 6, size=rows)
    steps = rng.integers(-300, 800, size=rows)
    value = np.where(kind == 0, (steps + 0.5) * res, rng.uniform(lower - 5 * res, upper + 5 * res))
    value = np.where(kind == 1, np.where(rng.random(rows) < 0.5, lower, upper), value)
    value = np.where(kind == 2, np.where(rng.random(rows) < 0.5, lower - res / 2, upper + res / 2), value)
    value = np.where(kind == 3, -0.0, value)
    low_plausible = np.array([METRICS[m][4][0] for m in names])[metric]
    high_plausible = np.array([METRICS[m][4][1] for m in names])[metric]
    value = np.clip(value, low_plausible, high_plausible)
    seconds = rng.integers(-600, int((END - START).total_seconds()) + 600, size=rows)  # a few out of the interval
    table = pa.table(
        {
            "entity_id": [f"e{i:03d}" for i in rng.integers(0, 40, size=rows)],
            "region": [REGIONS[i] for i in rng.integers(0, len(REGIONS), size=rows)],
            "metric": [names[i] for i in metric],
            "event_time": pa.array([START + timedelta(seconds=int(s)) for s in seconds], pa.timestamp("us", tz="UTC")),
            "value": value,
            "sensor_id": [None if i % 3 else f"s{i}" for i in range(rows)],
        },
        schema=READING_SCHEMA,
    )
    return pa.concat_tables([table, table.slice(5, 7), table.slice(100, 1)])  # 8 exact duplicates


def reference_vector(plan: ReleasePlan, institution: InstitutionConfig) -> tuple[np.ndarray, Counter[str], int]:
    """(packed vector, reject counts, rows read) the slow way: ReadingValidator, exact de-duplication over every
    field, aggregate_readings."""
    validator = ReadingValidator(plan.rules)
    accepted, rejected, read = [], Counter[str](), 0
    scanner = FeedScanner(plan, institution)
    for feed_index, path in scanner.sources:
        feed = institution.feeds[feed_index]
        for raw in read_feed_file(path, feed, batch_rows=4096):
            checked = validator.validate(raw.table, columns=mapped_columns(feed), time_format=feed.time_format.value)
            accepted.append(checked.accepted)
            rejected.update(checked.reasons)
            read += raw.rows
            rejected["malformed_record"] += len(raw.malformed)
    kept, duplicates = deduplicate_reference(pa.concat_tables(accepted))
    if duplicates.num_rows:
        rejected["duplicate"] += duplicates.num_rows
    vector = aggregate_readings(kept, layout=plan.layout, encodings=plan.params.encodings)
    return vector, +rejected, read


def scanned_vector(
    plan: ReleasePlan, institution: InstitutionConfig, shards: int
) -> tuple[np.ndarray, Counter[str], int]:
    vector = np.zeros(plan.layout.slots, dtype=np.int64)
    rejected: Counter[str] = Counter()
    read = 0
    for shard in range(shards):
        scanner = FeedScanner(plan, institution)
        scan = scanner.scan(shard, shards)
        encoded = scan.table(scanner.schema)
        duplicates = find_duplicates(
            encoded.column(KEY).to_numpy(),
            encoded.column(SOURCE).to_numpy(),
            encoded.column(ROW).to_numpy(),
            scanner.readings_at,
        )
        kept = np.ones(encoded.num_rows, dtype=bool)
        kept[duplicates.indices] = False
        sums = {SUM: encoded.column(SUM).to_numpy()[kept]}
        if plan.layout.has(SUMSQ):
            sums[SUMSQ] = encoded.column(SUMSQ).to_numpy()[kept]
        bins = encoded.column(BIN).to_numpy()[kept] if plan.layout.bins else None
        vector += pack_encoded(
            encoded.column(CELL).to_numpy()[kept], sums, layout=plan.layout, encodings=plan.params.encodings, bins=bins
        )
        rejected.update(scan.rejected)
        if duplicates.indices.size:
            rejected["duplicate"] += int(duplicates.indices.size)
        read += scan.rows_read
    return vector, +rejected, read


@pytest.fixture
def edge_federation(make_federation: Callable[..., Federation]) -> Federation:
    federation = make_federation(
        institutions=[("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl")], statistics=STATISTICS
    )
    write_edge_feeds(federation)
    return federation


def write_edge_feeds(federation: Federation) -> None:
    """Replace the feeds of alpha (Parquet), beta (CSV) and gamma (JSON lines) with edge readings."""
    rng = np.random.default_rng(11)
    for name, fmt in (("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl")):
        table = edge_readings(rng, 3000)
        write_feed(table.slice(0, 1500), federation.directory / "feeds" / name / f"part-0.{fmt}", fmt)
        write_feed(table.slice(1500), federation.directory / "feeds" / name / f"part-1.{fmt}", fmt)


@pytest.mark.parametrize("institution", ["alpha", "beta", "gamma"])
@pytest.mark.parametrize("shards", [1, 3])
def test_the_scan_packs_the_same_vector_as_the_numpy_reference(
    edge_federation: Federation, institution: str, shards: int
) -> None:
    config = edge_federation.config
    plan = plan_release(config, START, END)
    assert plan.layout.has(SUMSQ) and plan.layout.bins == 8
    expected, expected_rejects, expected_read = reference_vector(plan, config.institution(institution))
    got, rejects, read = scanned_vector(plan, config.institution(institution), shards)
    assert rejects == expected_rejects and read == expected_read
    assert rejects["duplicate"] > 0 and rejects["out_of_interval"] > 0
    np.testing.assert_array_equal(got, expected)


def test_encode_scanned_computes_privacy_encodings_column_for_column(edge_federation: Federation) -> None:
    """The scan's vectorised encoder (one gather of each reading's constants) against privacy.encoding's
    functions, on values at rounding edges, clamp bounds and beyond, for every metric and every cell corner."""
    plan = plan_release(edge_federation.config, START, END)
    layout, encodings = plan.layout, plan.params.encodings
    rng = np.random.default_rng(7)
    rows = 20_000
    metric = rng.integers(0, len(layout.metrics), size=rows)
    region = rng.integers(0, len(layout.regions), size=rows)
    window = rng.integers(0, layout.windows, size=rows)
    window[:4] = [0, layout.windows - 1, 0, layout.windows - 1]
    start_us = int(layout.start.timestamp() * 1_000_000)
    window_us = int(layout.window.total_seconds() * 1_000_000)
    time_us = start_us + window * window_us + rng.integers(0, window_us, size=rows)
    time_us[:2] = [start_us, start_us + layout.windows * window_us - 1]  # the interval's first and last microsecond
    lower = np.array([e.lower for e in encodings])[metric]
    upper = np.array([e.upper for e in encodings])[metric]
    resolution = np.array([e.resolution for e in encodings])[metric]
    steps = rng.integers(-400, 900, size=rows)
    kind = rng.integers(0, 4, size=rows)
    values = np.select(
        [kind == 0, kind == 1, kind == 2],
        [(steps + 0.5) * resolution, np.where(rng.random(rows) < 0.5, lower, upper), lower - 7 * resolution],
        rng.uniform(lower - 3 * resolution, upper + 3 * resolution),
    )
    encoding = ScanEncoding.of(layout, encodings)
    got = encode_scanned(metric.astype(np.int32), region.astype(np.int32), time_us, values, encoding)
    weight, centred = encode_readings(values, metric, encodings)
    np.testing.assert_array_equal(got[CELL], layout.cell_index(metric, region, window))
    np.testing.assert_array_equal(got[SUM], centred)
    np.testing.assert_array_equal(got[SUMSQ], encode_squares(centred, weight))
    np.testing.assert_array_equal(got[BIN], bin_index(values, lower, upper, resolution, layout.bins))


def test_scan_shards_partition_the_readings_and_keep_each_entity_in_one(
    make_federation: Callable[..., Federation],
) -> None:
    federation = make_federation(
        institutions=[("alpha", "parquet"), ("beta", "parquet")],
        extra_privacy='unit = "entity"\nmax_partitions = 3\nmax_readings_per_partition = 2',
        entities=30,
    )
    config = federation.config
    plan = plan_release(config, START, END)
    institution = config.institution("alpha")
    whole = FeedScanner(plan, institution).scan(0, 1).table(FeedScanner(plan, institution).schema)
    pieces = []
    for shard in range(4):
        scanner = FeedScanner(plan, institution)
        pieces.append(scanner.scan(shard, 4).table(scanner.schema))
    assert sum(p.num_rows for p in pieces) == whole.num_rows == federation.raw["alpha"].num_rows
    entities = [set(p.column(ENTITY).to_pylist()) for p in pieces]
    assert all(a.isdisjoint(b) for i, a in enumerate(entities) for b in entities[i + 1 :])
    assert sum(1 for p in pieces if p.num_rows) > 1
    together = pa.concat_tables(pieces).sort_by([(SOURCE, "ascending"), (ROW, "ascending")])
    assert together.equals(whole.sort_by([(SOURCE, "ascending"), (ROW, "ascending")]))


def test_shard_count_follows_the_rows(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "csv")], extra="")
    config = federation.config
    plan = plan_release(config, START, END)
    rows = sum(pq.read_metadata(p).num_rows for p in (federation.directory / "feeds" / "alpha").glob("*.parquet"))
    assert scan_shards(plan, config.institution("alpha")) == 1
    small = plan_release(
        config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"shard_rows": 1024})}), START, END
    )
    assert scan_shards(small, config.institution("alpha")) == -(-rows // 1024)
    assert scan_shards(small, config.institution("beta")) >= 1


def test_hash_collisions_are_compared_in_full() -> None:
    """Rows 0, 2 and 3 share a key but only 0 and 3 are equal readings: 3 is the duplicate, 2 is not."""
    readings = edge_readings(np.random.default_rng(3), 4).slice(0, 4)
    same = readings.slice(0, 1)
    table = pa.concat_tables([same, readings.slice(1, 1), readings.slice(2, 1), same])
    keys = np.array([7, 8, 7, 7], dtype=np.uint64)
    sources = np.zeros(4, dtype=np.int32)
    rows = np.arange(4, dtype=np.int64)

    def readings_at(src: int, at: np.ndarray) -> pa.Table:
        assert src == 0
        return table.take(pa.array(at))

    found = find_duplicates(keys, sources, rows, readings_at)
    assert found.indices.tolist() == [3] and found.rows.tolist() == [3]
    assert found.readings.to_pylist() == same.to_pylist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=60))
def test_shared_key_rows_are_the_rows_whose_key_repeats(keys: list[int]) -> None:
    counts = Counter(keys)
    expected = [i for i, k in enumerate(keys) if counts[k] > 1]
    assert shared_key_rows(np.array(keys, dtype=np.uint64)).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=80))
def test_shared_key_rows_compare_whole_keys_not_their_top_bits(parts: list[tuple[int, int]]) -> None:
    """Keys that share their top 32 bits (what shared_key_rows sorts) but differ below are not shared."""
    keys = [(top << 40) | (top << 32) | (low * 0x9E3779B9) for top, low in parts]
    counts = Counter(keys)
    expected = [i for i, k in enumerate(keys) if counts[k] > 1]
    assert shared_key_rows(np.array(keys, dtype=np.uint64)).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.lists(st.tuples(st.integers(0, 9), st.integers(-(2**40), 2**40)), max_size=80),  # one float pass
        st.lists(st.tuples(st.integers(0, 9), st.integers(-(2**55), 2**55)), max_size=80),  # split in two parts
    )
)
def test_exact_bincount_is_exact(pairs: list[tuple[int, int]]) -> None:
    index = np.array([i for i, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.int64)
    expected = [sum(v for i, v in pairs if i == j) for j in range(10)]
    assert exact_bincount(index, values, 10).tolist() == expected


def _scan_everything(plan: ReleasePlan, institution: InstitutionConfig) -> tuple[pa.Table, Counter[str], int]:
    scanner = FeedScanner(plan, institution)
    scan = scanner.scan(0, 1)
    return scan.table(scanner.schema), +Counter(scan.rejected), scan.rows_read


def _emptied_feed(federation: Federation, institution: str, ext: str) -> Path:
    """The institution's feed folder, its generated files removed (a test writes its own)."""
    folder = federation.directory / "feeds" / institution
    for old in folder.glob(f"*.{ext}"):
        old.unlink()
    return folder


def _with_feed_path(federation: Federation, institution: str, path: str) -> ReleasePlan:
    """A plan whose `institution` reads its feed from `path` instead."""
    config = federation.config
    feeds = tuple(f.model_copy(update={"path": path}) for f in config.institution(institution).feeds)
    institutions = tuple(
        i.model_copy(update={"feeds": feeds}) if i.id == institution else i for i in config.institutions
    )
    return plan_release(config.model_copy(update={"institutions": institutions}), START, END)


def test_folders_named_like_hive_partitions_do_not_replace_columns(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = federation.directory / "feeds" / "alpha" / "region=north"
    folder.mkdir()
    readings = federation.raw["alpha"]
    pq.write_table(readings, folder / "all.parquet")
    plan = _with_feed_path(federation, "alpha", str(folder / "*.parquet"))
    encoded, rejected, read = _scan_everything(plan, plan.config.institution("alpha"))
    assert read == readings.num_rows and not rejected
    regions = np.array([REGIONS.index(r) for r in readings.column("region").to_pylist()])
    windows = plan.layout.windows
    got = np.sort((encoded.column(CELL).to_numpy() // windows) % len(REGIONS))
    assert got.tolist() == np.sort(regions).tolist()  # each reading in its own region, not all in "north"


def test_file_names_with_glob_characters_are_read_as_themselves(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "parquet")
    readings = federation.raw["alpha"]
    pq.write_table(readings.slice(0, 10), folder / "p-1.parquet")
    pq.write_table(readings.slice(10), folder / "p-[1].parquet")
    plan = plan_release(federation.config, START, END)
    encoded, rejected, read = _scan_everything(plan, plan.config.institution("alpha"))
    assert read == readings.num_rows and not rejected and encoded.num_rows == readings.num_rows


@pytest.mark.parametrize("glob_name", [False, True])  # read by DuckDB itself, or as batches
def test_a_parquet_file_with_a_mapped_column_twice_is_dead_lettered_whole_naming_it(
    make_federation: Callable[..., Federation], glob_name: bool
) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "parquet")
    readings = federation.raw["alpha"]
    names = [*readings.column_names, "value"]
    doubled = pa.Table.from_arrays([*readings.columns, readings.column("value")], names=names)
    pq.write_table(doubled, folder / ("p-[1].parquet" if glob_name else "p.parquet"))
    plan = plan_release(federation.config, START, END)
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    scan = scanner.scan(0, 1)  # the file is dead-lettered whole, naming the column; the run goes on
    assert scan.table(scanner.schema).num_rows == 0
    (path,) = scan.unreadable
    assert path.endswith("p-[1].parquet" if glob_name else "p.parquet")
    assert "column 'value' appears 2 times" in " ".join(str(f) for f in scan.files[path].__dict__.values())


@pytest.mark.parametrize("glob_name", [False, True])  # read by DuckDB itself, or as batches
def test_a_parquet_time_beyond_duckdbs_range_is_unparseable_and_the_rest_scanned(
    make_federation: Callable[..., Federation], glob_name: bool
) -> None:
    """One millisecond time of 10^16 (year 318,857) in a Parquet file used to end the whole release with
    DuckDB's "Could not convert Timestamp(MS) to Timestamp(US)"."""
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "parquet")
    readings = federation.raw["alpha"]
    millis = pc.cast(readings.column("event_time"), pa.int64()).to_numpy() // 1000
    millis[3] = 10**16
    times = pa.array(millis, pa.timestamp("ms", tz="UTC"))
    pq.write_table(
        readings.set_column(3, "event_time", times), folder / ("p-[1].parquet" if glob_name else "p.parquet")
    )
    plan = plan_release(federation.config, START, END)
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    scan = scanner.scan(0, 1)
    assert scan.rows_read == readings.num_rows and scan.rejected == Counter(unparseable_time=1)
    assert scan.table(scanner.schema).num_rows == readings.num_rows - 1 and not scan.unreadable
    [(_, letters)] = scan.dead_letters
    assert letters.column("event_time").to_pylist() == ["10000000000000000 ms since epoch"]
    assert letters.column(DEAD_LETTER_ROW).to_pylist() == [3]


@pytest.mark.parametrize("glob_name", [False, True])  # read by DuckDB itself, or as batches
@pytest.mark.parametrize("value_type", [pa.float16(), pa.decimal256(40, 2)], ids=str)
def test_values_in_types_duckdb_cannot_import_are_read_either_way(
    make_federation: Callable[..., Federation], glob_name: bool, value_type: pa.DataType
) -> None:
    """A file read as batches (here: a name DuckDB would take as a glob) used to fail on float16 and decimal256
    values, which read_parquet reads, and on string views in its dead letters."""
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "parquet")
    readings = federation.raw["alpha"].slice(0, 20)
    values = [0.5] * 19 + [1e4]  # the last out of range
    fed = readings.set_column(4, "value", pa.array(values).cast(value_type)).set_column(
        0, "entity_id", readings.column("entity_id").cast(pa.string_view())
    )
    pq.write_table(fed, folder / ("p-[1].parquet" if glob_name else "p.parquet"))
    plan = plan_release(federation.config, START, END)
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    scan = scanner.scan(0, 1)
    assert scan.rows_read == 20 and scan.rejected == Counter(out_of_range=1) and not scan.unreadable
    [(_, letters)] = scan.dead_letters
    assert letters.column("entity_id").to_pylist() == [readings.column("entity_id")[19].as_py()]


def test_minus_zero_and_zero_are_the_same_reading(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "csv"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "csv")
    header = "entity_id,region,metric,event_time,value,sensor_id\n"
    rows = [f"e1,north,load,2026-01-01T01:00:00Z,{v},\n" for v in ("-0.0", "0", "0.00")]
    (folder / "part-0.csv").write_text(header + "".join(rows))
    plan = plan_release(federation.config, START, END)
    institution = plan.config.institution("alpha")
    scanner = FeedScanner(plan, institution)
    encoded = scanner.scan(0, 1).table(scanner.schema)
    found = find_duplicates(
        encoded.column(KEY).to_numpy(),
        encoded.column(SOURCE).to_numpy(),
        encoded.column(ROW).to_numpy(),
        scanner.readings_at,
    )
    assert encoded.num_rows == 3 and found.rows.tolist() == [1, 2]
    assert not np.signbit(found.readings.column("value").to_numpy()).any()


def test_view_and_dictionary_text_columns_are_text(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "parquet"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "parquet")
    readings = federation.raw["alpha"]
    as_text = readings.set_column(
        readings.schema.get_field_index("value"),
        "value",
        pa.array([repr(v) for v in readings.column("value").to_pylist()]),
    )
    views = as_text.cast(
        pa.schema([pa.field(f.name, pa.string_view()) if pa.types.is_string(f.type) else f for f in as_text.schema])
    )
    pq.write_table(views.slice(0, 20), folder / "views.parquet")
    dictionaries = as_text.cast(
        pa.schema(
            [
                pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if pa.types.is_string(f.type) else f
                for f in as_text.schema
            ]
        )
    )
    pq.write_table(dictionaries.slice(20), folder / "dictionaries.parquet")
    plan = plan_release(federation.config, START, END)
    encoded, rejected, read = _scan_everything(plan, plan.config.institution("alpha"))
    assert read == readings.num_rows and not rejected and encoded.num_rows == readings.num_rows


def test_an_empty_csv_file_holds_no_rows(make_federation: Callable[..., Federation]) -> None:
    federation = make_federation(institutions=[("alpha", "csv"), ("beta", "parquet")])
    (federation.directory / "feeds" / "alpha" / "part-2.csv").write_bytes(b"")
    plan = plan_release(federation.config, START, END)
    _, rejected, read = _scan_everything(plan, plan.config.institution("alpha"))
    assert read == federation.raw["alpha"].num_rows and not rejected


def append_malformed(federation: Federation, institution: str, fmt: str) -> str:
    """Append one unparseable line to the institution's second file; returns its text."""
    line = "e1,north,temp,2026-01-01T00:00:00+00:00,1.0,s1,ONE-TOO-MANY" if fmt == "csv" else "{not json"
    with (federation.directory / "feeds" / institution / f"part-1.{fmt}").open("a") as handle:
        handle.write(line + "\n")
    return line


def letters_of(dead_letters: list[tuple[str, pa.Table]], kind: str) -> list[dict[str, object]]:
    rows = [row for name, table in dead_letters if name.endswith(kind) for row in table.to_pylist()]
    return sorted(rows, key=repr)


def stage_all(
    scanner: FeedScanner, srcs: list[int], directory: Path, shards: int
) -> tuple[dict[int, str], ShardScan, list[tuple[str, pa.Table]]]:
    """Stage every file in `srcs` into `directory`: (prefix by src, the counts, the dead letters)."""
    directory.mkdir(exist_ok=True)
    prefixes = {src: str(directory / f"{src:05d}") for src in srcs}
    counts = ShardScan()
    letters = [letter for src in srcs for letter in scanner.stage(src, prefixes[src], shards, counts)]
    return prefixes, counts, letters


@pytest.mark.parametrize(("institution", "fmt"), [("alpha", "parquet"), ("beta", "csv"), ("gamma", "jsonl")])
@pytest.mark.parametrize("entity_level", [False, True])
def test_staged_files_give_each_shard_what_scanning_them_would(
    make_federation: Callable[..., Federation],
    institution: str,
    fmt: str,
    entity_level: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Staging scans a file once for all its shards (from 2 shards up); each shard then reads
    # exactly the encoded rows its own scan of the file would have produced, and the counts and dead letters are
    # those of the files, once.
    extra = 'unit = "entity"\nmax_partitions = 4\nmax_readings_per_partition = 2' if entity_level else ""
    federation = make_federation(statistics=STATISTICS, extra_privacy=extra)
    write_edge_feeds(federation)
    lines = [] if fmt == "parquet" else [append_malformed(federation, institution, fmt)]
    config = federation.config
    # Small pipeline batches: a staged Parquet file streams from DuckDB in several batches, text in several pieces.
    plan = plan_release(
        config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"batch_rows": 1024})}), START, END
    )
    inst = config.institution(institution)
    shards = 3
    stager = FeedScanner(plan, inst)
    assert staged_sources(plan, inst, shards) == list(range(len(stager.sources)))
    assert staged_sources(plan, inst, 2) == [0, 1] and not staged_sources(plan, inst, 1)
    prefixes, counts, staged_letters = stage_all(
        stager, staged_sources(plan, inst, shards), tmp_path / "staged", shards
    )

    direct_read, direct_rejects, direct_letters = 0, Counter[str](), []
    for shard in range(shards):
        direct = FeedScanner(plan, inst).scan(shard, shards)
        from_staged = FeedScanner(plan, inst, staged=prefixes).scan(shard, shards)
        assert from_staged.table(stager.schema).equals(direct.table(stager.schema))
        assert from_staged.rows_read == 0 and not from_staged.rejected and not from_staged.dead_letters
        direct_read += direct.rows_read
        direct_rejects.update(direct.rejected)
        direct_letters += direct.dead_letters
    assert counts.rows_read == direct_read and counts.rejected == direct_rejects and not counts.dead_letters
    assert direct_rejects["malformed_record"] == len(lines) and direct_rejects["out_of_interval"] > 0
    assert letters_of(staged_letters, "-invalid") == letters_of(direct_letters, "-invalid") != []
    assert letters_of(staged_letters, "-malformed") == letters_of(direct_letters, "-malformed")
    assert [r["_text"] for r in letters_of(staged_letters, "-malformed")] == lines
    raw = [] if fmt == "parquet" else [f"{src:05d}-raw.arrow" for src in prefixes]  # DuckDB reads Parquet itself
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == sorted(
        [f"{src:05d}-s{shard:04d}.arrow" for src in prefixes for shard in range(shards)] + raw
    )  # no temporary file is left

    # The full readings behind rows (for hash collisions): from a staged text file's raw copy, never parsed again.
    shard_one = FeedScanner(plan, inst, staged=prefixes).scan(1, shards).table(stager.schema)
    wanted = {
        src: shard_one.filter(pc.equal(shard_one.column(SOURCE), src)).column(ROW).to_numpy()[::-1][:50]
        for src in prefixes
    }
    want = {src: FeedScanner(plan, inst).readings_at(src, rows) for src, rows in wanted.items()}
    parsed: list[str] = []
    monkeypatch.setattr("fusion.feeds.scan.read_feed_file", lambda *a, **k: parsed.append(a[0]) or iter(()))
    from_staged = FeedScanner(plan, inst, staged=prefixes)
    for src, rows in wanted.items():
        assert from_staged.readings_at(src, rows).equals(want[src]) and want[src].num_rows == 50
    assert parsed == []


def test_an_empty_text_file_stages_as_empty_shards(make_federation: Callable[..., Federation], tmp_path: Path) -> None:
    federation = make_federation(institutions=[("beta", "csv")], quorum=1)
    for path in (federation.directory / "feeds" / "beta").glob("*.csv"):
        path.write_text("")
    plan = plan_release(federation.config, START, END)
    inst = federation.config.institution("beta")
    scanner = FeedScanner(plan, inst)
    prefixes, counts, letters = stage_all(scanner, staged_sources(plan, inst, 2), tmp_path / "staged", 2)
    assert prefixes and counts.rows_read == 0 and not counts.rejected and not letters
    for shard in range(2):
        scan = FeedScanner(plan, inst, staged=prefixes).scan(shard, 2)
        assert scan.rows_read == 0 and scan.table(scanner.schema).num_rows == 0


def test_a_failed_staging_leaves_no_file(
    make_federation: Callable[..., Federation], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    federation = make_federation(institutions=[("beta", "csv")], quorum=1)
    plan = plan_release(federation.config, START, END)
    scanner = FeedScanner(plan, federation.config.institution("beta"))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(scanner, "_encoded", broken)
    with pytest.raises(OSError, match="disk full"):
        stage_all(scanner, [0], tmp_path / "staged", 4)
    assert list((tmp_path / "staged").iterdir()) == []


def test_a_feed_file_gone_after_it_was_listed_stops_the_scan_naming_it(
    make_federation: Callable[..., Federation],
) -> None:
    """Not the file's fault (moved away, permissions, the network): the run stops with a one-line error naming
    the file, and nothing is dead-lettered, since a later run may read it."""
    from fusion.feeds.scan import FeedUnavailable

    federation = make_federation(institutions=[("alpha", "csv"), ("beta", "parquet")])
    folder = _emptied_feed(federation, "alpha", "csv")
    write_feed(federation.raw["alpha"], folder / "a.csv", "csv")
    plan = plan_release(federation.config, START, END)
    scanner = FeedScanner(plan, plan.config.institution("alpha"))
    (folder / "a.csv").unlink()  # listed, then gone
    with pytest.raises(FeedUnavailable, match=r"feed file .*a\.csv cannot be read now \(FileNotFoundError"):
        scanner.scan(0, 1)

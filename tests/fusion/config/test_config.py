"""Config load: valid files load with paths resolved against the file; bad ones fail at load naming the field."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydantic
import pytest

from fusion.config.federation import (
    DEFAULT_SHARD_ROWS,
    Config,
    FeedFormat,
    PrivacyMode,
    PrivacyUnit,
    TimeFormat,
    load_config,
    parse_config,
    parse_duration,
)
from fusion.errors import ConfigError, FusionError
from tests.conftest import METRICS, REGIONS, config_text

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "federation.toml"
INSTITUTIONS = [("alpha", "parquet"), ("beta", "csv")]
FIRST_METRIC, SECOND_METRIC = list(METRICS)[:2]


def valid_text(**overrides: object) -> str:
    return config_text(**{"institutions": INSTITUTIONS, "quorum": 2, **overrides})  # type: ignore[arg-type]


def edit(text: str, pattern: str, replacement: str) -> str:
    """Replace the first line matching `pattern` (a whole-line regex); fail loudly if nothing matched."""
    edited, n = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert n == 1, f"{pattern!r} matched nothing in the config text"
    return edited


def write(tmp_path: Path, text: str, name: str = "federation.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- valid configs --------------------------------------------------------------------------------------------

def test_the_example_config_loads() -> None:
    if not EXAMPLE.exists():
        pytest.skip(f"no example config at {EXAMPLE}")
    config = load_config(EXAMPLE)
    assert config.base == EXAMPLE.parent
    assert config.institutions and config.metrics


def test_a_valid_config_loads_into_frozen_typed_models(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, valid_text()))
    assert isinstance(config, Config)
    assert config.federation.id == "test-federation"
    assert config.window == timedelta(hours=1)
    assert config.regions == REGIONS
    assert [m.name for m in config.metrics] == list(METRICS)
    assert config.metrics[0].plausible == METRICS[FIRST_METRIC][4]
    assert [i.id for i in config.institutions] == ["alpha", "beta"]
    assert [i.feeds[0].format for i in config.institutions] == [FeedFormat.PARQUET, FeedFormat.CSV]
    assert config.institutions[0].feeds[0].time_format is TimeFormat.ISO
    assert config.privacy.mode is PrivacyMode.TEST
    assert (config.privacy.epsilon, config.privacy.delta, config.privacy.quorum) == (1.0, 1e-6, 2)
    assert config.institution("beta").id == "beta"
    with pytest.raises(pydantic.ValidationError):
        config.privacy.epsilon = 100.0  # type: ignore[misc]


def test_scan_shards_default_by_privacy_unit_unless_configured(tmp_path: Path) -> None:
    event = load_config(write(tmp_path, valid_text(), "event.toml"))
    entity = load_config(write(tmp_path, valid_text(
        extra_privacy='unit = "entity"\nmax_partitions = 4\nmax_readings_per_partition = 2'), "entity.toml"))
    assert event.pipeline.shard_rows is None and entity.pipeline.shard_rows is None
    assert event.shard_rows == DEFAULT_SHARD_ROWS[PrivacyUnit.READING] == 8_000_000
    assert entity.shard_rows == DEFAULT_SHARD_ROWS[PrivacyUnit.ENTITY] == 4_000_000  # bounding holds twice the memory
    configured = load_config(write(tmp_path, valid_text() + "[pipeline]\nshard_rows = 5000\n", "set.toml"))
    assert configured.shard_rows == 5000


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "conf", valid_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "conf" / "federation.toml")  # a relative path to the file, too
    conf = path.parent.resolve()
    assert config.base == conf
    assert config.store_path == str(conf / "store")
    assert config.exchange_path == str(conf / "exchange")
    assert config.keys_path == str(conf / "keys")
    alpha = config.institution("alpha")
    assert config.dead_letter_path(alpha) == str(conf / "deadletter" / "alpha")
    assert config.resolve(alpha.feeds[0].path) == str(conf / "feeds" / "alpha" / "*.parquet")


def test_absolute_paths_and_urls_are_kept(tmp_path: Path) -> None:
    text = edit(valid_text(), r'^window = .*$', f'window = "1h"\nstore = "{tmp_path / "abs-store"}"\n'
                'exchange = "gs://bucket/exchange"')
    config = load_config(write(tmp_path / "conf", text))
    assert config.store_path == str(tmp_path / "abs-store")
    assert config.exchange_path == "gs://bucket/exchange"


def test_a_production_config_with_noise_and_no_seed_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, valid_text(mode="production")))
    assert config.privacy.mode is PrivacyMode.PRODUCTION
    assert config.privacy.noise and config.privacy.seed is None


def test_test_mode_allows_noise_off_and_a_seed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, valid_text(noise=False, seed=7)))
    assert (config.privacy.noise, config.privacy.seed) == (False, 7)


def test_unknown_institution_lookup_names_the_known_ones(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, valid_text()))
    with pytest.raises(ConfigError, match=r"unknown institution 'gamma'.*alpha, beta"):
        config.institution("gamma")


# --- bad configs ----------------------------------------------------------------------------------------------

def _without_privacy(text: str) -> str:
    return edit(text, r"^\[privacy\]\n(?:[^\[\n].*\n|\n)*", "")


def _add_to_beta_feed(line: str) -> Callable[[str], str]:
    return lambda text: edit(text, r'^format = "csv"$', f'format = "csv"\n{line}')


BAD: list[tuple[str, Callable[[], str], list[str]]] = [
    ("feed-format", lambda: edit(valid_text(), r'^format = "csv"$', 'format = "xlsx"'),
     ["institutions[1].feeds[0].format", "'parquet', 'csv' or 'jsonl'"]),
    ("time-format", lambda: _add_to_beta_feed('time_format = "unix"')(valid_text()),
     ["institutions[1].feeds[0].time_format", "'iso', 'epoch_s' or 'epoch_ms'"]),
    ("epsilon-zero", lambda: valid_text(epsilon=0.0), ["privacy.epsilon", "greater than or equal to 0.000001"]),
    ("epsilon-negative", lambda: valid_text(epsilon=-1.0), ["privacy.epsilon", "greater than or equal to 0.000001"]),
    ("delta-0.01", lambda: edit(valid_text(), r"^delta = .*$", "delta = 0.01"), ["privacy.delta", "less than 0.01"]),
    ("delta-0.5", lambda: edit(valid_text(), r"^delta = .*$", "delta = 0.5"), ["privacy.delta", "less than 0.01"]),
    ("delta-zero", lambda: edit(valid_text(), r"^delta = .*$", "delta = 0.0"), ["privacy.delta", "greater than 0"]),
    ("quorum-above-institutions", lambda: valid_text(quorum=3), ["privacy.quorum = 3", "2 institutions"]),
    ("quorum-zero", lambda: valid_text(quorum=0), ["privacy.quorum"]),
    ("duplicate-metric", lambda: edit(valid_text(), rf'^name = "{SECOND_METRIC}"$', f'name = "{FIRST_METRIC}"'),
     ["metrics: duplicate names", FIRST_METRIC]),
    ("duplicate-institution", lambda: edit(valid_text(), r'^id = "beta"$', 'id = "alpha"'),
     ["institutions: duplicate names", "alpha"]),
    ("duplicate-region", lambda: edit(valid_text(), r"^regions = .*$", 'regions = ["north", "north"]'),
     ["regions: duplicate names", "north"]),
    ("unknown-reading-field", lambda: _add_to_beta_feed('columns = { reading = "r" }')(valid_text()),
     ["institutions[1].feeds[0].columns", "unknown reading field", "reading"]),
    ("columns-differing-in-case", lambda: _add_to_beta_feed('columns = { sensor_id = "Value" }')(valid_text()),
     ["institutions[1].feeds[0]", "value is read from column 'value' and sensor_id from 'Value'",
      "differ only in case"]),
    ("lower-equals-upper", lambda: edit(valid_text(), r"^upper = .*$", f"upper = {METRICS[FIRST_METRIC][1]}"),
     ["metrics[0]", "lower < upper"]),
    ("lower-above-upper", lambda: edit(valid_text(), r"^lower = .*$", "lower = 1e9"), ["metrics[0]", "lower < upper"]),
    ("upper-infinite", lambda: edit(valid_text(), r"^upper = .*$", "upper = inf"), ["metrics[0].upper", "finite"]),
    ("lower-nan", lambda: edit(valid_text(), r"^lower = .*$", "lower = nan"), ["metrics[0].lower", "finite"]),
    ("plausible-low-equals-high", lambda: edit(valid_text(), r"^plausible = .*$", "plausible = [5.0, 5.0]"),
     ["metrics[0]", "plausible", "low < high"]),
    ("plausible-reversed", lambda: edit(valid_text(), r"^plausible = .*$", "plausible = [60.0, -60.0]"),
     ["metrics[0]", "plausible"]),
    ("plausible-infinite", lambda: edit(valid_text(), r"^plausible = .*$", "plausible = [-inf, 60.0]"),
     ["metrics[0]", "plausible", "finite"]),
    ("resolution-zero", lambda: edit(valid_text(), r"^resolution = .*$", "resolution = 0.0"),
     ["metrics[0].resolution"]),
    ("window-7h", lambda: edit(valid_text(), r"^window = .*$", 'window = "7h"'),
     ["federation.window", "'7h'", "divide a day"]),
    ("window-7m", lambda: edit(valid_text(), r"^window = .*$", 'window = "7m"'),  # 86400 s = 205 x 420 s + 300 s
     ["federation.window", "'7m'", "divide a day"]),
    ("window-25h", lambda: edit(valid_text(), r"^window = .*$", 'window = "25h"'), ["federation.window", "'25h'"]),
    ("window-soon", lambda: edit(valid_text(), r"^window = .*$", 'window = "soon"'),
     ["federation.window", "'soon' is not a duration"]),
    ("window-zero", lambda: edit(valid_text(), r"^window = .*$", 'window = "0m"'), ["federation.window"]),
    ("extra-key", lambda: edit(valid_text(), r"^window = .*$", 'window = "1h"\ncolour = "blue"'),
     ["federation.colour", "Extra inputs are not permitted"]),
    ("extra-top-level-key", lambda: "colour = \"blue\"\n" + valid_text(), ["colour", "Extra inputs are not permitted"]),
    ("base-key", lambda: 'base = "/etc"\n' + valid_text(), ["base", "Extra inputs are not permitted"]),
    ("missing-privacy", lambda: _without_privacy(valid_text()), ["privacy", "Field required"]),
    ("production-without-noise", lambda: valid_text(mode="production", noise=False),
     ["privacy", "noise = false is a test-only switch"]),
    ("production-with-seed", lambda: valid_text(mode="production", seed=3), ["privacy", "seed is test-only"]),
    ("unknown-mode", lambda: valid_text(mode="staging"), ["privacy.mode", "'production' or 'test'"]),
    ("bad-federation-id", lambda: edit(valid_text(), r'^id = "test-federation"$', 'id = "no spaces!"'),
     ["federation.id"]),
    ("shared-dead-letter-directory", lambda: edit(valid_text(), r'^id = "beta"$',
                                                  'id = "beta"\ndead_letter = "deadletter/alpha"'),
     ["institutions[1].dead_letter", "institutions[0] (alpha)"]),
    ("dead-letter-directory-spelled-otherwise", lambda: edit(valid_text(), r'^id = "beta"$',
                                                             'id = "beta"\ndead_letter = "deadletter/./alpha/"'),
     ["institutions[1].dead_letter", "institutions[0] (alpha)"]),
    ("dead-letter-directory-inside-another", lambda: edit(valid_text(), r'^id = "beta"$',
                                                          'id = "beta"\ndead_letter = "deadletter/alpha/beta"'),
     ["institutions[1].dead_letter", "institutions[0] (alpha)"]),
    ("readings-cap-could-wrap", lambda: edit(valid_text(), r'^id = "alpha"$',
                                             'id = "alpha"\nmax_readings_per_cell = 1000000000000000'),
     ["max_readings_per_cell"]),
    ("dead-letter-directory-inside-the-store", lambda: edit(valid_text(), r'^id = "beta"$',
                                                            'id = "beta"\ndead_letter = "store/rejected"'),
     ["institutions[1].dead_letter", "federation.store", "stay private"]),
    ("institution-keys-inside-the-exchange", lambda: edit(valid_text(), r'^id = "beta"$',
                                                          'id = "beta"\nkeys = "./exchange/keys/beta"'),
     ["institutions[1].keys", "federation.exchange"]),
    ("period-zero", lambda: edit(valid_text(), r"^quorum = (.*)$", r'quorum = \1\nperiod = "0h"'),
     ["privacy.period", "positive"]),
    ("stream-window-zero", lambda: valid_text() + '\n[stream]\nwindow = "0m"\n', ["stream.window", "positive"]),
    ("epsilon-cap-infinite", lambda: edit(valid_text(), r"^quorum = (.*)$", r"quorum = \1\nepsilon_cap = inf"),
     ["privacy.epsilon_cap", "finite"]),
    ("resolution-infinite", lambda: edit(valid_text(), r"^resolution = .*$", "resolution = inf"),
     ["metrics[0].resolution", "finite"]),
    ("resolution-coarser-than-the-clamps", lambda: edit(valid_text(), r"^resolution = .*$", "resolution = 1e9"),
     ["metrics[0]", "coarser than the clamp range"]),
    ("resolution-too-fine-to-encode", lambda: edit(valid_text(), r"^resolution = .*$", "resolution = 1e-300"),
     ["metrics.temp (lower = -20.0, upper = 40.0, resolution = 1e-300)", "too large to encode"]),
    ("epsilon-unreachable", lambda: valid_text(epsilon=1e-4), ["privacy.epsilon", "no noise level reaches"]),
]


@pytest.mark.parametrize(("make_text", "fragments"), [pytest.param(m, f, id=i) for i, m, f in BAD])
def test_a_bad_config_fails_at_load_naming_the_field(tmp_path: Path, make_text: Callable[[], str],
                                                     fragments: list[str]) -> None:
    path = write(tmp_path, make_text())
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert isinstance(error.value, FusionError) and isinstance(error.value, ValueError)


def test_a_bad_feed_is_reported_without_a_spurious_empty_tuple_error(tmp_path: Path) -> None:
    path = write(tmp_path, edit(valid_text(), r'^format = "csv"$', 'format = "xlsx"'))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "at least 1 item" not in str(error.value), str(error.value)


def test_every_bad_field_is_reported_at_once(tmp_path: Path) -> None:
    text = edit(valid_text(epsilon=0.0), r"^delta = .*$", "delta = 0.5")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert "privacy.epsilon" in str(error.value) and "privacy.delta" in str(error.value)


def test_invalid_toml_fails_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, edit(valid_text(), r"^window = .*$", 'window = "1h'))
    with pytest.raises(ConfigError, match="is not valid TOML") as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM: it used to fail as 'Invalid statement (at line 1, column 1)'."""
    path = tmp_path / "federation.toml"
    path.write_bytes(b"\xef\xbb\xbf" + valid_text().encode())
    assert load_config(path).privacy.quorum == 2


def test_a_range_too_wide_to_encode_names_its_metric_and_fields(tmp_path: Path) -> None:
    text = edit(valid_text(), r"^upper = 500.0$", "upper = 1e300")
    with pytest.raises(ConfigError, match=r"metrics\.load \(lower = 0\.0, upper = 1e\+300, resolution = 1\.0\)"):
        load_config(write(tmp_path, text))


def test_a_missing_file_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as error:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(error.value)


def test_a_config_that_is_not_utf8_or_not_a_file_fails_in_one_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.toml"
    latin.write_bytes(valid_text().encode() + "# région\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_config(latin)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_parse_config_validates_a_mapping(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads(valid_text())
    assert parse_config(data, base=tmp_path).store_path == str((tmp_path / "store").resolve())
    data["privacy"]["quorum"] = 5
    with pytest.raises(ConfigError, match=r"privacy\.quorum = 5"):
        parse_config(data, base=tmp_path)


# --- durations ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("15min", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("24h", timedelta(days=1)),
        ("1d", timedelta(days=1)),
        ("2d", timedelta(days=2)),
        (" 2 h ", timedelta(hours=2)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["soon", "", "h", "10", "1.5h", "-1h", "1w", "1 hour", "1h30m"])
def test_parse_duration_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_a_collusion_bound_whose_masking_degree_overfills_an_envelope_header_fails_at_load() -> None:
    """k = 2 (max_colluding + 1) neighbours put k (k + 1) shares in every header: past MAX_NEIGHBOURS every honest
    envelope would be refused at the aggregator (a header holds at most 16 MiB), so the config is refused first."""
    ids = [(f"i{k:03d}", "parquet") for k in range(260)]
    for colluding, refused in ((99, False), (100, True)):
        text = config_text(institutions=ids, quorum=colluding + 2, mode="production", epsilon=1.0,
                           extra_privacy=f"max_colluding = {colluding}")  # fmt: skip
        if refused:
            with pytest.raises(ConfigError, match=r"privacy.max_colluding = 100: .* mask with 202 others"):
                parse_config(tomllib.loads(text), check_release=False)
        else:
            assert parse_config(tomllib.loads(text), check_release=False).privacy.max_colluding == 99


def test_a_duration_too_long_for_dates_is_refused_naming_the_field(tmp_path: Path) -> None:
    """A duration beyond about a century would overflow datetime arithmetic in a release (or timedelta itself,
    an OverflowError that escaped the config's field errors as a traceback)."""
    with pytest.raises(ValueError, match="is too long: at most 36600 days"):
        parse_duration("99999999999999d")
    assert parse_duration("36600d").days == 36_600
    for field, pattern, value in (
        ("window", r"^window = .*$", 'window = "99999999999999d"'),
        ("privacy.period", r"^quorum = (.*)$", r'quorum = \1\nperiod = "3650000d"'),
    ):
        with pytest.raises(ConfigError, match=rf"{re.escape(field)}: .*too long"):
            load_config(write(tmp_path, edit(valid_text(), pattern, value)))


def test_an_epsilon_no_noise_can_reach_is_refused_at_once_naming_the_field(tmp_path: Path) -> None:
    for epsilon in ("1e-300", "1e-12"):  # the second hung config loading
        with pytest.raises(ConfigError, match=r"privacy.epsilon: Input should be greater than or equal to"):
            load_config(write(tmp_path, edit(valid_text(), r"^epsilon = .*$", f"epsilon = {epsilon}")))


@pytest.mark.parametrize("window", ["1m", "5m", "15m", "90m", "1h", "8h", "1d", "2d"])
def test_windows_that_divide_a_day_or_are_whole_days_load(tmp_path: Path, window: str) -> None:
    text = edit(valid_text(), r"^window = .*$", f'window = "{window}"')
    text = edit(text, r"^quorum = (.*)$", r'quorum = \1\nperiod = "2d"')  # a period of whole windows
    config = load_config(write(tmp_path, text))
    assert config.window == parse_duration(window)
    assert config.period % config.window == parse_duration("0s")


def test_a_period_that_is_not_whole_windows_is_refused(tmp_path: Path) -> None:
    text = edit(valid_text(), r"^window = .*$", 'window = "2d"')
    with pytest.raises(ConfigError, match=r"privacy.period 1d is not a whole number of 2d windows"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("keys", ["exchange", "exchange/keys", "store/secret", "."])
def test_the_secret_key_directory_may_not_overlap_what_others_read(tmp_path: Path, keys: str) -> None:
    text = edit(valid_text(), r"^window = .*$", f'window = "1h"\nkeys = "{keys}"')
    with pytest.raises(ConfigError, match=r"federation\.keys"):
        load_config(write(tmp_path, text))


def test_the_secret_key_directory_is_local(tmp_path: Path) -> None:
    text = edit(valid_text(), r"^window = .*$", 'window = "1h"\nkeys = "s3://bucket/keys"')
    with pytest.raises(ConfigError, match="not a URL"):
        load_config(write(tmp_path, text))


def test_default_cell_caps_are_the_largest_that_cannot_wrap(tmp_path: Path) -> None:
    from fusion.config.parameters import release_parameters
    from privacy.he import MAX_ABS_TOTAL

    config = load_config(write(tmp_path, valid_text()))
    params = release_parameters(config)
    caps = params.cell_caps
    assert set(caps) == {i.id for i in config.institutions} and len(set(caps.values())) == 1
    worst = max(e.count_weight for e in params.encodings)
    margin = 10 * (params.share_variance * len(caps)) ** 0.5  # ten SDs of every institution's noise share
    # The caps fill t/2 exactly: one more reading per institution could wrap.
    assert sum(caps.values()) * worst + margin < MAX_ABS_TOTAL
    assert (sum(caps.values()) + len(caps)) * worst + margin >= MAX_ABS_TOTAL - 1


def test_stream_settings_are_validated_at_load(tmp_path: Path) -> None:
    text = valid_text() + '\n[stream]\nwindow = "90m"\n'
    with pytest.raises(ConfigError, match=r"stream.window 90m must be a whole number of 1h windows"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"stream.allowed_lateness"):
        load_config(write(tmp_path, valid_text() + '\n[stream]\nallowed_lateness = "soon"\n'))
    config = load_config(write(tmp_path, valid_text() + '\n[stream]\nwindow = "2h"\nallowed_lateness = "5m"\n'))
    assert config.stream_window.total_seconds() == 7200 and config.allowed_lateness.total_seconds() == 300


def test_a_streaming_source_needs_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stream.pubsub_subscription"):
        load_config(write(tmp_path, valid_text() + '\n[stream]\nsource = "pubsub"\n'))
    with pytest.raises(ConfigError, match=r"stream.kafka_bootstrap_servers and stream.kafka_topic"):
        load_config(write(tmp_path, valid_text() + '\n[stream]\nsource = "kafka"\nkafka_topic = "readings"\n'))
    with pytest.raises(ConfigError, match=r"stream.source"):
        load_config(write(tmp_path, valid_text() + '\n[stream]\nsource = "carrier-pigeon"\n'))
    config = load_config(write(tmp_path, valid_text() + '\n[stream]\nsource = "kafka"\nkafka_topic = "t"\n'
                               'kafka_bootstrap_servers = "k:9092"\nspool = "gs://bucket/spool"\n'))
    assert config.stream_spool_path == "gs://bucket/spool"


def test_production_needs_a_quorum_of_at_least_the_colluders_plus_two(tmp_path: Path) -> None:
    production = valid_text(mode="production", seed=None)
    with pytest.raises(ConfigError, match=r"privacy.quorum = 2 must be at least privacy.max_colluding \+ 2 = 3"):
        load_config(write(tmp_path, production.replace("quorum = 2", "quorum = 2\nmax_colluding = 1")))
    single = config_text(institutions=[("alpha", "csv")], quorum=1, mode="production", seed=None)
    with pytest.raises(ConfigError, match=r"privacy.quorum = 1 must be at least"):
        load_config(write(tmp_path, single))


def test_noise_shares_do_not_count_on_colluders(tmp_path: Path) -> None:
    """Each share is v / (quorum - 1 - max_colluding): with a quorum of contributors, the shares that one contributor
    (keeping its own draws) and the colluders do not know still carry v."""
    from fusion.config.parameters import release_parameters

    base = valid_text(quorum=3, noise=True, institutions=[("a", "csv"), ("b", "csv"), ("c", "csv")])
    plain = release_parameters(load_config(write(tmp_path, base)))
    wary = release_parameters(load_config(write(tmp_path, base.replace("quorum = 3", "quorum = 3\nmax_colluding = 1"))))
    assert plain.share_variance == pytest.approx(plain.total_variance / 2)
    assert wary.share_variance == pytest.approx(wary.total_variance / 1)
    assert wary.total_variance == plain.total_variance and wary.digest() != plain.digest()


def test_dead_letter_directories_are_compared_in_one_spelling(tmp_path: Path) -> None:
    from fusion.config.federation import _directory_key

    assert _directory_key("/x/./dl/") == _directory_key("file:///x/dl") == "/x/dl"
    assert _directory_key("gs://b/dl/") == _directory_key("gs://b//dl") == _directory_key("gs://b/x/../dl")
    assert _directory_key("gs://b/dl") != _directory_key("s3://b/dl")
    distinct = edit(valid_text(), r'^id = "beta"$', 'id = "beta"\ndead_letter = "deadletter/alpha-2"')
    assert load_config(write(tmp_path, distinct)).institutions[1].dead_letter == "deadletter/alpha-2"


# --- directories of different parties, or of different kinds, kept apart (issue 18, point 11) ------------------

def _federation_line(line: str) -> Callable[[str], str]:
    return lambda text: edit(text, r'^window = "1h"$', f'window = "1h"\n{line}')


def _institution_line(institution: str, line: str) -> Callable[[str], str]:
    return lambda text: edit(text, rf'^id = "{institution}"$', f'id = "{institution}"\n{line}')


def _feed_path(path: str) -> Callable[[str], str]:
    return lambda text: edit(text, r'^path = "feeds/beta/\*\.csv"$', f'path = "{path}"')


OVERLAPS: list[tuple[str, Callable[[str], str], list[str]]] = [
    ("exchange-is-the-store", _federation_line('exchange = "store"'), ["federation.exchange", "federation.store"]),
    ("exchange-spelled-otherwise-is-the-store", _federation_line('exchange = "./store/"'),
     ["federation.exchange", "federation.store"]),
    ("exchange-inside-the-store", _federation_line('exchange = "store/exchange"'),
     ["federation.exchange", "federation.store"]),
    ("store-inside-the-exchange", _federation_line('store = "exchange/store"'),
     ["federation.exchange", "federation.store"]),
    ("aggregator-keys-inside-the-exchange", _federation_line('aggregator_keys = "exchange/aggregator"'),
     ["federation.aggregator_keys", "federation.exchange", "stay private"]),
    ("aggregator-keys-are-the-exchange", _federation_line('aggregator_keys = "exchange"'),
     ["federation.aggregator_keys", "federation.exchange"]),
    ("aggregator-keys-inside-the-store", _federation_line('aggregator_keys = "store/keys"'),
     ["federation.aggregator_keys", "federation.store"]),
    ("feed-inside-the-exchange", _feed_path("exchange/beta/*.csv"),
     ["institutions[1].feeds[0].path", "federation.exchange", "stay private"]),
    ("feed-file-inside-the-exchange", _feed_path("exchange/readings.csv"),
     ["institutions[1].feeds[0].path", "federation.exchange"]),
    ("feed-dated-inside-the-store", _feed_path("store/{date}/readings.csv"),
     ["institutions[1].feeds[0].path", "federation.store"]),
    ("stream-state-inside-the-store", lambda text: text + '\n[stream]\nstate = "store/stream"\n',
     ["stream.state", "federation.store", "stay private"]),
    ("stream-state-is-the-exchange", lambda text: text + '\n[stream]\nstate = "exchange"\n',
     ["stream.state", "federation.exchange"]),
    ("stream-state-holds-the-exchange", lambda text: _federation_line('exchange = "stream/exchange"')(text),
     ["stream.state", "federation.exchange"]),
    ("stream-spool-inside-the-exchange", lambda text: text + '\n[stream]\nspool = "exchange/spool"\n',
     ["stream.spool", "federation.exchange"]),
    ("institution-keys-inside-the-key-holders-keys", _institution_line("beta", 'keys = "keys/beta"'),
     ["institutions[1].keys", "federation.keys", "key holder"]),
    ("dead-letter-inside-the-key-holders-keys", _institution_line("alpha", 'dead_letter = "keys/rejected"'),
     ["institutions[0].dead_letter", "federation.keys", "key holder"]),
    ("key-holders-keys-inside-an-institutions-keys", _federation_line('keys = "institution-keys/alpha/holder"'),
     ["institutions[0].keys", "federation.keys"]),
    ("aggregator-keys-inside-the-key-holders-keys", _federation_line('aggregator_keys = "keys/aggregator"'),
     ["federation.aggregator_keys", "federation.keys"]),
]


@pytest.mark.parametrize(("change", "fragments"), [pytest.param(c, f, id=i) for i, c, f in OVERLAPS])
def test_overlapping_directories_are_refused_at_load_naming_both_fields(
    tmp_path: Path, change: Callable[[str], str], fragments: list[str]
) -> None:
    message = _refused_naming(tmp_path, change, fragments)
    assert "\n" not in message.split("\n", 1)[1].strip(), message  # one line under the header


def _refused_naming(tmp_path: Path, change: Callable[[str], str], fragments: list[str]) -> str:
    """The message of the ConfigError that `change` makes of a valid config, checked to hold every fragment."""
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, change(valid_text())))
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def test_neighbouring_directories_that_do_not_overlap_load(tmp_path: Path) -> None:
    text = valid_text()
    for change in (
        _federation_line('exchange = "store-exchange"'),  # a shared prefix of the name is not a parent directory
        _federation_line('aggregator_keys = "exchange-aggregator"'),
        _feed_path("exchange-feeds/beta/*.csv"),
        _institution_line("beta", 'keys = "keys-beta"'),
    ):
        text = change(text)
    config = load_config(write(tmp_path, text + '\n[stream]\nstate = "private/stream"\nspool = "private/spool"\n'))
    assert config.exchange_path.endswith("store-exchange")


# --- schedules ------------------------------------------------------------------------------------------------

def test_a_schedule_whose_max_backoff_is_below_its_backoff_fails_at_load(tmp_path: Path) -> None:
    schedule = '\n[[schedules]]\nname = "hourly"\ncron = "5 * * * *"\nbackoff = "1h"\nmax_backoff = "{cap}"\n'
    with pytest.raises(ConfigError, match=r"schedules\[0\]: .*max_backoff 1m is below backoff 1h"):
        load_config(write(tmp_path, valid_text() + schedule.format(cap="1m")))
    equal = load_config(write(tmp_path, valid_text() + schedule.format(cap="1h")))  # a constant wait: allowed
    assert equal.schedules[0].backoff_cap == equal.schedules[0].first_backoff == timedelta(hours=1)
    # Unset, the cap is an hour, or the backoff where that is longer: a daily schedule's 2h backoff loads as before.
    daily = '\n[[schedules]]\nname = "daily"\ncron = "5 0 * * *"\nbackoff = "{wait}"\n'
    for wait, cap in (("2h", timedelta(hours=2)), ("10m", timedelta(hours=1))):
        loaded = load_config(write(tmp_path, valid_text() + daily.format(wait=wait)))
        assert loaded.schedules[0].backoff_cap == cap


# --- [[models]] -----------------------------------------------------------------------------------------------

def _model(name: str = "m", **fields: str) -> str:
    """A `[[models]]` entry on the feeds (temp from load an hour ahead); `fields` replace its TOML values."""
    values = {"name": f'"{name}"', "features": '["load"]', "target": '"temp"', "horizon": '"1h"',
              "target_bins": "[1.0]", "start": '"2026-01-01T00:00"', "end": '"2026-01-02T00:00"', **fields}
    return "\n[[models]]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())


MODELS: list[tuple[str, str, list[str]]] = [
    ("duplicate-name", _model() + _model(), ["models: duplicate names ['m']", "--model"]),
    ("start-not-a-time", _model(start='"not a date"'), ["models[0]", "models.m.start", "'not a date' is not an ISO"]),
    ("end-not-a-time", _model(end='"2026-13-01"'), ["models.m.end", "ISO 8601"]),
    ("start-after-end", _model(start='"2026-02-01"'), ["models.m: start 2026-02-01 is not before end"]),
    ("start-equals-end", _model(end='"2026-01-01T00:00:00+00:00"'), ["models.m: start", "is not before end"]),
    ("unknown-feature-metric", _model(features='["load", "humidity"]'),
     ["models.m.features / target", "metrics of this federation (temp, load)", "unknown: humidity"]),
    ("unknown-target-metric", _model(target='"pressure"'), ["models.m.features / target", "unknown: pressure"]),
    ("zero-horizon", _model(horizon='"0s"'), ["models.m.horizon", "positive"]),
    ("horizon-not-a-duration", _model(horizon='"soon"'), ["models.m.horizon", "'soon' is not a duration"]),
    ("horizon-beyond-interval", _model(horizon='"2d"'), ["models.m.horizon", "'2d' is longer than the model's"]),
    ("interval-across-periods", _model(start='"2026-01-01T20:00"', end='"2026-01-02T04:00"'),
     ["models.m.start / end", "crosses the privacy period boundary at 2026-01-02T00:00:00+00:00"]),
    ("layer-too-wide", _model(hidden="[100000000000]"), ["models.m.hidden", "1 to 100,000 units"]),
    ("epsilon-below-rdp-floor", _model(epsilon="0.001"), ["models.m.epsilon", "below what the Renyi-DP"]),
    ("too-many-parameters", _model(hidden="[2000, 2000]"),
     ["models.m.hidden", "[2000, 2000] makes 4,020,002 parameters", "above the 1,000,000"]),
    ("rows-other-field", _model(rows='"training/{institution}-{part}.parquet"', classes="2"),
     ["models.m.rows", "holds {part}, but only {institution} is filled in"]),
    ("rows-formatted-field", _model(rows='"training/{institution!r}.parquet"', classes="2"),
     ["models.m.rows", "holds {institution!r}"]),
    ("rows-unmatched-brace", _model(rows='"training/{institution}{.parquet"', classes="2"),
     ["models.m.rows", "has an unmatched brace", "double a brace"]),
    ("rows-no-institution", _model(rows='"training/all.parquet"', classes="2"),
     ["models.m.rows", "names no institution", "{institution}"]),
]


@pytest.mark.parametrize(("models", "fragments"), [pytest.param(m, f, id=i) for i, m, f in MODELS])
def test_a_bad_model_fails_at_load_naming_the_field(tmp_path: Path, models: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, valid_text() + models))
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_models_within_the_limits_load(tmp_path: Path) -> None:
    rows = '"training/{institution}.parquet"'
    text = valid_text() + _model("softmax", hidden="[]") + _model("wide", hidden="[100000]", features='["temp"]') + (
        _model("on-rows", rows=rows, features='["a", "b"]', target='"label"', classes="2", hidden="[]")
        .replace('horizon = "1h"\n', "").replace("target_bins = [1.0]\n", "")
    )
    config = load_config(write(tmp_path, text))
    assert [m.hidden for m in config.models] == [(), (100_000,), ()]
    assert config.models[1].input_width(len(REGIONS)) == 1 + len(REGIONS) + 2  # its metric, regions, hour of day


# --- one party's private directory apart from every other party's -----------------------------------------------

def _section(text: str) -> Callable[[str], str]:
    return lambda config: config + f"\n{text}\n"


PARTIES: list[tuple[str, Callable[[str], str], list[str]]] = [
    ("two-institutions-share-keys", _institution_line("beta", 'keys = "institution-keys/alpha"'),
     ["institutions[1].keys", "institutions[0].keys", "private to institutions[0] (alpha)"]),
    ("institution-keys-inside-anothers", _institution_line("beta", 'keys = "institution-keys/alpha/beta"'),
     ["institutions[1].keys", "institutions[0].keys"]),
    ("institution-keys-are-the-aggregators", _institution_line("alpha", 'keys = "aggregator-keys"'),
     ["institutions[0].keys", "federation.aggregator_keys", "private to the aggregator"]),
    ("aggregator-keys-are-an-institutions", _federation_line('aggregator_keys = "institution-keys/beta"'),
     ["institutions[1].keys", "federation.aggregator_keys"]),
    ("institution-keys-in-anothers-dead-letters", _institution_line("beta", 'keys = "deadletter/alpha/keys"'),
     ["institutions[1].keys", "institutions[0].dead_letter"]),
    ("stream-state-is-the-key-holders-keys", _section('[stream]\nstate = "keys"'),
     ["stream.state", "federation.keys", "key holder"]),
    ("stream-spool-inside-the-key-holders-keys", _section('[stream]\nspool = "keys/spool"'),
     ["stream.spool", "federation.keys", "key holder"]),
    ("stream-state-holds-the-aggregators-keys",
     lambda text: _section('[stream]\nstate = "private"')(_federation_line('aggregator_keys = "private/a"')(text)),
     ["stream.state", "federation.aggregator_keys"]),
    ("stream-state-inside-a-dead-letter-directory", _section('[stream]\nstate = "deadletter/alpha/stream"'),
     ["institutions[0].dead_letter", "stream.state"]),
    ("stream-spool-is-an-institutions-keys", _section('[stream]\nspool = "institution-keys/beta"'),
     ["institutions[1].keys", "stream.spool"]),
    ("mechanism-keys-are-the-key-holders", _section('[mechanisms]\nkeys = "keys"'),
     ["mechanisms.keys", "federation.keys", "key holder"]),
    ("mechanism-keys-inside-the-aggregators", _section('[mechanisms]\nkeys = "aggregator-keys/operator"'),
     ["mechanisms.keys", "federation.aggregator_keys"]),
    ("mechanism-keys-are-an-institutions", _section('[mechanisms]\nkeys = "institution-keys/alpha"'),
     ["institutions[0].keys", "mechanisms.keys"]),
]


@pytest.mark.parametrize(("change", "fragments"), [pytest.param(c, f, id=i) for i, c, f in PARTIES])
def test_one_partys_private_directory_may_not_overlap_anothers(
    tmp_path: Path, change: Callable[[str], str], fragments: list[str]
) -> None:
    message = _refused_naming(tmp_path, change, fragments)
    assert "a directory of its own" in message and "\n" not in message.split("\n", 1)[1].strip(), message


def test_each_partys_private_directories_apart_load(tmp_path: Path) -> None:
    text = valid_text() + '\n[stream]\nstate = "operator/stream"\nspool = "operator/stream/windows"\n'
    text += '\n[mechanisms]\nkeys = "operator-keys"\n'  # a neighbour of the stream's directory, not inside it
    config = load_config(write(tmp_path, _institution_line("alpha", 'keys = "alpha/keys"')(text)))
    assert config.stream_spool_path.startswith(config.stream_state_path + "/")  # the stream's own: allowed
    default = load_config(write(tmp_path, valid_text()))
    assert default.stream_spool_path == default.stream_state_path + "/spool"

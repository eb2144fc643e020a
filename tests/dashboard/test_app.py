"""The dashboard over HTTP (no browser): every page and its JSON twin, escaping of the store's text, messages
for bad parameters, read-only routes, security headers, the Host check and the token."""

from __future__ import annotations

import html
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import markupsafe
import pyarrow as pa
import pytest

from dashboard.guard import CSP
from dashboard.server import ServeOptions, running
from fusion.config.federation import load_config
from tests.dashboard.conftest import AUDIT_RUNS, HOURS, Served, build_store
from tests.dashboard.rows import FRONTIER, HOSTILE, LMPS, PROPOSED

PAGES = ("releases", "budget", "provenance", "forecasts", "recommendations", "api")
VIEWS = ("releases", "budget", "provenance", "forecasts", "recommendations")


def quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_its_title_and_the_security_headers(served: Served, page: str) -> None:
    status, headers, body = served.get(f"/{page}")
    assert status == 200, body
    assert re.search(r"<h1>[^<]+</h1>", body)
    assert headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert "Traceback" not in body


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_has_a_json_twin_documented_in_openapi(served: Served, view: str) -> None:
    status, answer = served.json(f"/api/{view}")
    assert status == 200 and isinstance(answer, dict)
    _, spec = served.json("/openapi.json")
    operation = spec["paths"][f"/api/{view}"]["get"]
    assert operation["summary"]
    assert "$ref" in operation["responses"]["200"]["content"]["application/json"]["schema"]
    _, _, api_page = served.get("/api")
    assert f"GET /api/{view}" in api_page


def test_health_reports_the_tables_versions(served: Served) -> None:
    status, answer = served.json("/health")
    assert status == 200 and answer["status"] == "ok" and answer["federation"] == "test-federation"
    assert answer["tables"]["releases"] is not None and answer["tables"]["runs"] is None


def test_releases_give_every_statistic_with_its_sd_and_interval_and_each_release_its_epsilon(served: Served) -> None:
    _, north = served.json("/api/releases?metric=temp&region=north&days=all")
    assert north["metric"] == "temp" and north["region"] == "north" and north["unit"] == "degC"
    assert len(north["cells"]) == HOURS
    assert [c["estimates"]["count"]["value"] for c in north["cells"]] == [100.0 + h for h in range(HOURS)]
    for cell in north["cells"]:
        for statistic in ("count", "sum", "mean"):
            estimate = cell["estimates"][statistic]
            assert None not in (estimate["value"], estimate["sd"], estimate["low"], estimate["high"]), statistic
            assert estimate["low"] <= estimate["value"] <= estimate["high"]
    assert north["releases"] == [{
        "release_id": "r-north", "released_at": "2026-01-01T00:00:00Z", "epsilon": 1.0, "delta": 1e-6,
        "noise": "skellam", "cells": HOURS, "first_window": "2026-01-01T00:00:00Z",
        "last_window": "2026-01-02T23:00:00Z",
    }]
    _, south = served.json("/api/releases?metric=temp&region=south&days=all")
    assert [c["estimates"]["count"]["value"] for c in south["cells"]] == [500.0 + h for h in range(HOURS)]


def test_an_infinite_epsilon_is_written_as_such_in_json_and_in_the_openapi_document(tmp_path: Path) -> None:
    """A test-mode release with noise off spends epsilon = inf: the JSON API wrote it null (JSON has no
    infinity), which reads as no epsilon at all, while the OpenAPI document promised a number."""
    from fusion.store.delta import Store
    from tests.conftest import config_text
    from tests.fusion.store.test_store import release_rows

    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet")], quorum=1))
    config = load_config(path, check_release=False)
    rows = release_rows("r-test-mode", range(3))
    Store(config.store_path).insert_new("releases", rows.set_column(
        rows.schema.get_field_index("epsilon"), "epsilon", pa.array([float("inf")] * 3)))
    with running(config) as url:
        served = Served(path, url)
        status, view = served.json("/api/releases?metric=temp&region=north&days=all")
        assert status == 200 and {c["epsilon"] for c in view["cells"]} == {"Infinity"}
        assert view["releases"][0]["epsilon"] == "Infinity"
        _, document = served.json("/openapi.json")
        status, _, page = served.get("/releases?metric=temp&region=north&days=all")
    assert status == 200 and '<td class="num epsilon">inf</td>' in page
    for model in ("ReleasedCell", "ReleaseSummary"):
        assert document["components"]["schemas"][model]["properties"]["epsilon"]["anyOf"] == [
            {"type": "number"}, {"type": "string", "enum": ["Infinity", "-Infinity", "NaN"]}]


def test_a_withheld_stddev_is_shown_by_its_interval(served: Served) -> None:
    """North's stddev estimates are withheld (the noise dwarfs the spread) and their intervals released: the
    statistic is offered, the chart draws its band alone, the table shows the interval; south released neither."""
    from dashboard.releases import ReleasesView, chart_points

    _, north = served.json("/api/releases?metric=temp&region=north&days=all&statistic=stddev")
    assert "stddev" in north["shown_statistics"]
    points = chart_points(ReleasesView(**north))
    assert len(points) == HOURS
    assert all(p["value"] is None and (p["low"], p["high"]) == (0.0, 4.5) for p in points)
    _, south = served.json("/api/releases?metric=temp&region=south&days=all")
    assert "stddev" not in south["shown_statistics"]
    _, _, body = served.get("/releases?region=north&days=all&statistic=stddev")
    row = re.findall(r'<tr class="cell">(.*?)</tr>', body, re.S)[0]
    assert '<span class="ci">[0, 4.5]</span>' in row


def test_the_default_range_is_the_series_last_days(served: Served) -> None:
    _, one_day = served.json("/api/releases?region=north&days=1")
    assert len(one_day["cells"]) == 24 and one_day["cells"][0]["window_start"] == "2026-01-02T00:00:00Z"
    _, explicit = served.json("/api/releases?region=north&start=2026-01-01T06:00&end=2026-01-01T09:00")
    assert [c["window_start"][11:16] for c in explicit["cells"]] == ["06:00", "07:00", "08:00"]


def test_the_releases_page_shows_each_cell_with_sd_and_interval(served: Served) -> None:
    _, _, body = served.get("/releases?region=south&days=all")
    rows = re.findall(r'<tr class="cell">(.*?)</tr>', body, re.S)
    assert len(rows) == HOURS
    for row in rows:
        assert len(re.findall(r'<span class="sd">± [-\d.,e+]+</span>', row)) == 3  # count, sum, mean
        assert len(re.findall(r'<span class="ci">\[[-\d.,e+]+, [-\d.,e+]+\]</span>', row)) == 3
    assert 'data-chart="spec-releases"' in body


def test_budget_shows_spent_left_the_rule_and_refusals(served: Served) -> None:
    _, budget = served.json("/api/budget")
    period = budget["periods"][0]
    assert period["epsilon_spent"] == 1.25 and period["epsilon_left"] == 0.75 and period["composition"] == "parallel"
    assert set(budget["rules"]) == {"parallel", "sequential"}
    assert [r["reason"] for r in budget["refusals"]] == [HOSTILE]
    # No key holder's record is readable here: the figures are the store's row, and the page says so.
    assert budget["reconciled"] is False and period["store_behind"] is None
    _, _, page = served.get("/budget")
    assert "Spent as the store&#39;s budget table publishes them" in page and "store row</th>" not in page


def test_budget_is_counted_as_the_key_holder_s_ledger_counts_it_where_its_record_is_readable(tmp_path: Path) -> None:
    """Run with the key holder's keys directory, the page showed only the store's row, which another writer of the
    store had deleted: no budget spent, where the key holder's cap check counts two releases."""
    from privacy.accountant import skellam_epsilon
    from tests.fusion.cli.test_budget import NEXT, rolled_back
    from tests.fusion.store.test_ledger import DAY, DELTA, MECHANISM, ONE

    path, _ = rolled_back(tmp_path)
    with running(load_config(path, check_release=False)) as url:
        served = Served(path, url)
        _, budget = served.json("/api/budget")
        _, _, page = served.get("/budget")
    assert budget["reconciled"] is True and budget["note"] is None
    shown = {p["period"]: p for p in budget["periods"]}
    assert [p["period"] for p in budget["periods"]] == [NEXT.name, DAY.name]  # newest first
    day, following = shown[DAY.name], shown[NEXT.name]
    assert day["epsilon_spent"] == pytest.approx(skellam_epsilon([MECHANISM] * 2, delta=DELTA))
    assert (day["releases"], day["store_behind"], day["store_epsilon_spent"]) == (2, True, None)
    assert (following["epsilon_spent"], following["store_behind"], following["store_epsilon_spent"]) == (
        ONE, False, ONE)
    assert "checked against the key holder&#39;s own record" in page
    cells = re.findall(r'<td class="store( behind)?">([^<]*)</td>', page)
    assert cells == [("", "as recorded"), (" behind", "behind the key holder's record (the store's row: missing or "
                                                    "several; rebuilt at the next charge)")]


def test_provenance_reports_what_verify_reports(served: Served) -> None:
    _, view = served.json("/api/provenance")
    status = {c["release_id"]: c["status"] for c in view["checks"]}
    assert status == {"r-north": "legacy", "r-south": "legacy", "r-hostile": "tampered"}
    assert view["counts"] == {"legacy": 2, "tampered": 1}
    assert {(c["table"], c["status"]) for c in view["record_checks"]} == {("recommendations", "tampered"),
                                                                          ("decisions", "tampered")}


def test_audit_events_filter_by_action_role_and_text_and_text_stays_text(served: Served) -> None:
    _, refused = served.json("/api/provenance?action=budget_refused")
    assert [e["event_id"] for e in refused["events"]] == ["hostile-1"]
    _, by_role = served.json("/api/provenance?role=aggregator")
    assert [e["event_id"] for e in by_role["events"]] == ["hostile-2"]
    _, found = served.json("/api/provenance?text=" + quoted("ONERROR=\"document"))
    assert {e["event_id"] for e in found["events"]} == {"hostile-1", "hostile-2"}
    for probe in ("' OR 1=1 --", "x'); SELECT * FROM releases; --", "\\'"):
        status, none = served.json("/api/provenance?text=" + quoted(probe))
        assert status == 200 and none["matching"] == 0, probe
    _, by_release = served.json("/api/provenance?release=" + quoted("r-refused"))
    assert by_release["matching"] == 1


def test_audit_events_come_in_pages_newest_first(served: Served) -> None:
    from dashboard.provenance import PAGE_EVENTS

    _, first = served.json("/api/provenance?action=run")
    assert (first["matching"], first["pages"], len(first["events"])) == (AUDIT_RUNS, 2, PAGE_EVENTS)
    assert first["events"][0]["event_id"] == f"run-{AUDIT_RUNS - 1:03d}"
    _, second = served.json("/api/provenance?action=run&page=2")
    assert [e["event_id"] for e in second["events"]] == [f"run-{i:03d}" for i in range(AUDIT_RUNS - PAGE_EVENTS)][::-1]
    _, _, body = served.get("/provenance?action=run")
    assert 'href="/provenance?action=run&amp;page=2">older &rarr;</a>' in body and "page 1 of 2" in body


def test_forecasts_show_the_latest_forecast_its_bands_history_and_scores(served: Served) -> None:
    _, view = served.json("/api/forecasts")
    assert (view["metric"], view["region"], view["statistic"], view["model"]) == ("temp", "north", "mean",
                                                                                   "seasonal_naive")
    assert len(view["windows"]) == 6 and len(view["released"]) == HOURS
    first = view["windows"][0]
    assert first["release_ci95_low"] < first["ci95_low"] < first["mean"] < first["ci95_high"] < first[
        "release_ci95_high"]
    [score] = view["scores"]
    assert score["purpose"] == "backtest" and score["windows"] == 6 and score["coverage95"] == 1.0
    assert score["mae"] == pytest.approx(sum(abs(0.5 - 0.2 * h) for h in range(6)) / 6)


def test_recommendations_show_lmps_the_frontier_and_decisions(served: Served) -> None:
    _, view = served.json("/api/recommendations")
    assert view["chosen"]["kind"] == "pareto"
    assert {lmp["bus"]: (lmp["energy"], lmp["congestion"], lmp["lmp"]) for lmp in view["lmps"]} == {
        bus: (e, c, e + c) for bus, (e, c) in LMPS.items()}
    assert [(p["cost"], p["co2"]) for p in view["frontier"]] == FRONTIER
    assert [p["proposed"] for p in view["frontier"]] == [i == PROPOSED for i in range(len(FRONTIER))]
    [decision] = view["decisions"]
    assert (decision["cost_impact"], decision["deviation_mw"], decision["reason"]) == (321.75, 12.5, HOSTILE)
    assert decision["verified"] == "tampered"  # nobody registered signed it


@pytest.mark.parametrize("path", [
    f"/releases?metric=temp&region={quoted(HOSTILE)}&days=all", "/budget", "/provenance?text=pwned", "/recommendations",
])
def test_text_from_the_store_is_escaped(served: Served, path: str) -> None:
    _, _, body = served.get(path)
    assert str(markupsafe.escape(HOSTILE)) in body
    assert "<img src=x" not in body and "<script>document" not in body and "onerror=\"" not in body


@pytest.mark.parametrize(("path", "parameter"), [
    ("/releases?region=atlantis", "region: 'atlantis' is not one of"),
    ("/releases?metric=nope", "metric: 'nope' is not one of"),
    ("/releases?days=seven", "days: 'seven' is not a number of days"),
    ("/releases?start=yesterday", "start: 'yesterday' is not a time"),
    ("/releases?start=2026-01-02&end=2026-01-01", "end: 2026-01-01 00:00 is not after start"),
    ("/releases?statistic=max", "statistic: 'max' is not one of"),
    ("/releases?page=0", "page: '0' is not a page number"),
    ("/releases?region=north&page=9", "page: 9 is past the table's last page"),
    ("/provenance?action=delete", "action: 'delete' is not one of"),
    ("/provenance?text=" + quoted("a\x00b"), "text: control characters are not accepted"),
    ("/provenance?page=99", "page: 99 is past the last page"),
    ("/forecasts?region=south", "region: 'south' is not one of"),
    ("/recommendations?recommendation=nope", "recommendation: 'nope' is not one of"),
])
def test_a_bad_parameter_is_answered_with_a_message(served: Served, path: str, parameter: str) -> None:
    status, headers, body = served.get(path)
    assert status == 400 and headers["content-security-policy"] == CSP
    [message] = re.findall(r'<p class="error" role="alert">(.*?)</p>', body, re.S)
    assert str(markupsafe.escape(parameter)) in message, message
    assert "Traceback" not in body
    if path.startswith("/releases?") and "page=" in path:
        return  # the JSON twin gives the whole range: it has no table pages
    api_status, answer = served.json("/api" + path)
    assert api_status == 400 and answer["error"].startswith(parameter)


def test_unknown_pages_and_writes_are_refused_with_a_message(served: Served) -> None:
    status, _, body = served.get("/nowhere")
    assert status == 404 and "there is no page /nowhere" in body
    request = urlrequest("POST", served.url + "/releases")
    assert request == (405, "this dashboard is read-only: GET only")


def urlrequest(method: str, url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"")) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        found = re.findall(r'<p class="error" role="alert">(.*?)</p>', body, re.S)
        return exc.code, found[0] if found else body


def test_another_host_is_refused(served: Served) -> None:
    """A page of another site whose name was rebound to 127.0.0.1 (DNS rebinding) is not answered."""
    status, _, body = served.get("/releases", headers={"Host": "attacker.example:8050"})
    assert status == 421 and "attacker.example" in body
    assert served.get("/health", headers={"Host": "localhost:1234"})[0] == 200


def test_static_files_are_served_with_the_policy_and_cached(served: Served) -> None:
    status, headers, body = served.get("/static/dashboard.js")
    assert status == 200 and "vegaEmbed" in body
    assert headers["content-security-policy"] == CSP and headers["cache-control"] == "public, max-age=3600"


def test_an_empty_store_shows_nothing_yet_on_every_page(tmp_path: Path) -> None:
    from tests.conftest import config_text

    path = tmp_path / "federation.toml"
    path.write_text(config_text(institutions=[("alpha", "parquet")], quorum=1))
    with running(load_config(path, check_release=False)) as url:
        served = Served(path, url)
        expected = {
            "releases": "nothing released yet", "budget": "no budget spent yet", "forecasts": "no forecasts yet",
            "recommendations": "no recommendations yet", "provenance": "no key holder signing key is registered",
        }
        for page, note in expected.items():
            status, _, body = served.get(f"/{page}")
            assert status == 200 and note in body, page
            assert str(tmp_path) not in body, page  # where the federation lives is not a reader's to know
        _, view = served.json("/api/provenance")
        assert view["verify_error"] == (
            "no key holder signing key is registered in this federation's registry: nothing can be verified (the "
            "key holder's `fusion keys --release-signing` registers one)")
        (tmp_path / "registry.toml").write_text("not toml [")
        _, view = served.json("/api/provenance")
        assert view["verify_error"].startswith("the registry <federation>/registry.toml is malformed")


def test_a_broken_store_is_a_server_error_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    """Damaged data files are the store's fault, not the request's (a file a serving thread had read, rewritten
    in place, was answered 400 as if the parameters were wrong) and no bug: 500, saying so, naming no path."""
    path = build_store(tmp_path / "broken")
    config = load_config(path, check_release=False)
    for data in Path(config.store_path, "releases").glob("*.parquet"):
        data.write_bytes(b"not parquet")
    unreadable = ("the store's table releases cannot be read: a data file is damaged, missing or was rewritten "
                  "outside Delta")
    with running(config) as url:
        status, _, body = Served(path, url).get("/releases?region=north")
        assert status == 500 and str(markupsafe.escape(unreadable)) in body
        assert "Traceback" not in body and "File \"" not in body and str(tmp_path) not in body
        status, _, answer = Served(path, url).get("/api/releases?region=north")
        assert status == 500 and json.loads(answer)["error"].startswith(unreadable)
        assert str(tmp_path) not in answer
        status, _, answer = Served(path, url).get("/health")
        assert status == 503 and json.loads(answer)["status"] == "unavailable"


def test_a_registry_gone_missing_is_refused_where_releases_are_checked_naming_no_path(tmp_path: Path) -> None:
    """A missing registry read as one without keys: Provenance said nothing could be verified and Forecasts drew
    every release as it stands, a tampered one included. Now both refuse, naming the registry under <federation>:
    Forecasts with a server error (it was answered 400, as if the request were bad), a bad parameter still 400."""
    path = build_store(tmp_path / "fed")
    (tmp_path / "fed" / "registry.toml").unlink()
    missing = "the registry <federation>/registry.toml is missing: the store's releases cannot be checked"
    with running(load_config(path, check_release=False)) as url:
        served = Served(path, url)
        _, view = served.json("/api/provenance")
        assert view["verify_error"].startswith(missing)
        status, _, body = served.get("/forecasts")
        assert status == 500 and missing in html.unescape(body) and str(tmp_path) not in body
        status, answer = served.json("/api/forecasts")
        assert status == 500 and answer["error"].startswith(missing) and "\n" not in answer["error"]
        status, answer = served.json("/api/forecasts?region=atlantis")
        assert status == 400 and answer["error"].startswith("region: 'atlantis'")


def _refuse_reading(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the system refuse to read `files` (a table's data files): mode 000, where this process is refused such
    a file; else (root reads a file whatever its mode) the refusal simulated where the store opens them, as
    tests/fusion/cli/test_no_traceback.py does."""
    import errno

    from fusion.store.delta import Store
    from tests.fusion.cli.test_no_traceback import _Refused

    probe = files[0].with_name("probe")
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        for file in files:
            file.chmod(0)  # restored by the caller
        return
    finally:
        probe.unlink()
    dataset = Store.dataset
    table = files[0].parent.name

    def refused(self: Store, name: str, **kwargs: Any) -> Any:
        found = dataset(self, name, **kwargs)
        return _Refused(found, errno.EACCES) if name == table else found

    monkeypatch.setattr(Store, "dataset", refused)


def test_a_store_the_system_refuses_to_read_is_unavailable_not_a_bad_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data files the system refuses to read (permission denied, an I/O error: StoreUnavailable) were answered 400,
    as if the request were bad: now 503, in one line naming no path, logged in full; a bad parameter still 400."""
    path = build_store(tmp_path / "fed")
    config = load_config(path, check_release=False)
    files = sorted(Path(config.store_path, "releases").glob("*.parquet"))
    _refuse_reading(files, monkeypatch)
    unavailable = "the store's table releases cannot be read now: Permission denied (os error 13); check that"
    try:
        with running(config) as url:
            served = Served(path, url)
            status, _, body = served.get("/forecasts")
            assert status == 503 and unavailable in html.unescape(body), body
            assert str(tmp_path) not in body and "Traceback" not in body
            status, answer = served.json("/api/forecasts")
            assert status == 503 and answer["error"].startswith(unavailable) and "\n" not in answer["error"]
            assert str(tmp_path) not in answer["error"]
            status, answer = served.json("/api/forecasts?region=atlantis")
            assert status == 400 and answer["error"].startswith("region: 'atlantis'")
    finally:
        for file in files:
            file.chmod(0o644)


TOKEN = "s3cret-token-for-the-dashboard"


def test_a_token_is_required_of_every_request_but_health(federation: Path) -> None:
    options = ServeOptions(port=0, token=TOKEN)
    with running(load_config(federation, check_release=False), options) as url:
        served = Served(federation, url)
        status, _, body = served.get("/releases")
        assert status == 401 and "this dashboard needs its token" in body
        assert served.get("/api/budget")[0] == 401
        assert served.get("/api/budget", headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert served.get("/api/budget", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert served.get("/health")[0] == 200
        # ?token= once: a cookie, and the token is taken out of the address.
        opener = _no_redirects()
        try:
            opener.open(f"{url}/releases?region=south&token={TOKEN}")
            raise AssertionError("expected a redirect")
        except Exception as exc:  # urllib raises HTTPError for the 303 it was told not to follow
            assert getattr(exc, "code", None) == 303
            headers = exc.headers  # type: ignore[attr-defined]
        assert headers["location"] == "/releases?region=south"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        status, _, _ = served.get("/releases?region=south", headers={"Cookie": cookie.split(";")[0]})
        assert status == 200
        try:  # a path starting "//" would make the redirect name another site (a protocol-relative address)
            opener.open(f"{url}//evil.example/x?token={TOKEN}")
            raise AssertionError("expected a redirect")
        except Exception as exc:
            assert getattr(exc, "code", None) == 303
            assert exc.headers["location"] == "/evil.example/x"  # type: ignore[attr-defined]


def _no_redirects() -> object:
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    return urllib.request.build_opener(NoRedirect)


def test_behind_a_proxy_links_and_cookie_carry_the_root_path(federation: Path) -> None:
    """A reverse proxy serving the dashboard under /fusion strips the prefix and forwards to loopback."""
    options = ServeOptions(port=0, token=TOKEN, root_path="/fusion")
    with running(load_config(federation, check_release=False), options) as url:
        served = Served(federation, url)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = served.get("/releases", headers=bearer)
        assert status == 200 and 'href="/fusion/static/dashboard.css"' in body and 'href="/fusion/budget"' in body
        status, _, answer = served.get("/api/releases?region=atlantis", headers=bearer)
        assert status == 400 and json.loads(answer)["error"].startswith("region: 'atlantis'")
        assert served.get("/health")[0] == 200
        try:
            _no_redirects().open(f"{url}/budget?token={TOKEN}")  # type: ignore[attr-defined]
            raise AssertionError("expected a redirect")
        except Exception as exc:
            assert getattr(exc, "code", None) == 303
            headers = exc.headers  # type: ignore[attr-defined]
        assert headers["location"] == "/fusion/budget" and "Path=/fusion" in headers["set-cookie"]

"""`fusion serve`'s ASGI app (FastAPI): server-rendered pages over one federation's store and a JSON twin of each
(documented in OpenAPI at /openapi.json and on the API page). Read-only: only GET routes, and every read goes
through a `Snapshot` (fusion.api's sandboxed SQL). Every script and style sheet is served from /static (the
vega bundles are vendored), and each response carries a Content-Security-Policy that forbids other origins.
Requests pass the guard first (dashboard/guard.py: Host, token, headers)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from dashboard import budget as budget_
from dashboard import charts, forecasts, recommendations
from dashboard import provenance as provenance_
from dashboard import releases as releases_
from dashboard import snapshot as snapshot_
from dashboard.formatting import FILTERS
from dashboard.guard import LOOPBACK_HOSTS, Guard, app_path, app_root, secured, wants_json
from dashboard.params import BadParameter
from dashboard.snapshot import Snapshot, VersionCache
from fusion.config.federation import Config, load_config
from fusion.errors import FusionError, SqlLimitExceeded
from fusion.store.failures import StoreUnavailable

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: The vendored chart libraries (dashboard/static/vendor/README.md), loaded in this order.
VENDORED = ("vendor/vega/vega.min.js", "vendor/vega-lite/vega-lite.min.js", "vendor/vega-embed/vega-embed.min.js")
#: (path, title) of each page, in the navigation's order.
PAGES = (
    ("releases", "Releases"),
    ("budget", "Budget"),
    ("provenance", "Provenance"),
    ("forecasts", "Forecasts"),
    ("recommendations", "Recommendations and decisions"),
    ("api", "JSON API"),
)
log = logging.getLogger("fusion.dashboard")


class Health(BaseModel):
    status: str  # "ok": the store could be opened and read
    federation: str
    tables: dict[str, int | None]  # each table's Delta version (None: not created yet)


def _param(description: str) -> Any:
    return Query(description=description)


Metric = Annotated[str | None, _param("a metric of the store (default: the first)")]
Region = Annotated[str | None, _param("a region with cells of the metric (default: the first)")]
Statistic = Annotated[str | None, _param("mean (default), count, sum, stddev, p10, median or p90")]
Days = Annotated[str | None, _param("days back from the series' last window (default 7), or 'all'")]
Start = Annotated[str | None, _param("from this time, ISO 8601, UTC (e.g. 2026-01-05 or 2026-01-05T06:00)")]
End = Annotated[str | None, _param("before this time, ISO 8601, UTC")]
Page = Annotated[str | None, _param("page number, from 1")]
Action = Annotated[str | None, _param("only audit events of this action")]
Role = Annotated[str | None, _param("only audit events of this actor role")]
ReleaseText = Annotated[str | None, _param("only audit events whose release id contains this text")]
Text = Annotated[str | None, _param("only audit events whose actor, reason, detail or id contains this text")]
Recommendation = Annotated[str | None, _param("a recommendation id (default: the latest)")]


def create_app(
    config: Config | str | Path,
    *,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
    warm: bool = False,
    seen: int = 0,
) -> FastAPI:
    """The dashboard over the store of `config`. `token`: required of every request but /health (None: none, for
    a loopback-only dashboard). `allowed_hosts`: the Host header values answered (without port); '*': any.
    `warm`: compute the store's series and the verify report in the background at once, for the first page.
    `seen`: the highest release sequence number seen before (`fusion verify --seen`); the app raises it as it
    shows newer releases, so that a release removed whole after it was shown is reported missing."""
    cfg = config if isinstance(config, Config) else load_config(config, check_release=False)
    cache = VersionCache(seen=seen)  # app.state.cache: its threads' stores are closed when the server stops
    if warm:
        snapshot_.warm(cfg, cache, [releases_.SERIES, provenance_.verify_job(cfg)])
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    app = FastAPI(
        title="Fusion dashboard", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        description="Read-only views of a Fusion federation's common-knowledge store: each page of the dashboard "
        "as JSON. Every statistic is noisy and comes with its noise standard deviation (where one is released) "
        "and its 95% interval. Values a page cannot use are answered 400 with {\"error\": message}; what is not "
        "the request's fault, 5xx with one naming no path: 503 where the store cannot be read now (its disk or "
        "permissions) or a read ran past its limits, 500 where a data file is damaged or the registry is missing.",
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.cache = cache

    def snapshot() -> Snapshot:
        return Snapshot(cfg, cache)

    def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        root = app_root(request)
        charted = any(name.endswith("chart") and value for name, value in context.items())
        text = env.get_template(template).render(
            root=root, pages=PAGES, federation=cfg.federation.id, vendored=VENDORED if charted else (),
            link=_linker(root), **context
        )
        return HTMLResponse(text, status_code=status)

    app.middleware("http")(Guard(allowed_hosts, token, lambda request, status, message: _error(
        request, status, message, title="Token needed" if status == 401 else "Cannot show this")))

    # -- errors: a message, never a traceback ------------------------------------------------------------------
    @app.exception_handler(FusionError)
    async def fusion_error(request: Request, exc: FusionError) -> Response:
        if isinstance(exc, BadParameter):  # the request's: a parameter the page cannot use
            return _error(request, 400, str(exc))
        # Anything else is the server's, not the request's: the store's files (damaged, or refused by the system),
        # the registry (missing or malformed), a limit. Logged whole; answered in one line naming no path.
        log.error("serving %s: %s", app_path(request), exc)
        return _error(request, _server_status(exc), provenance_.without_paths(cfg, exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _error(request, 400, problems or "the request's parameters cannot be used")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        messages = {404: f"there is no page {app_path(request)}", 405: "this dashboard is read-only: GET only"}
        return _error(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error serving %s", app_path(request), exc_info=exc)
        message = "internal error: this is probably a bug; the server's log has the details"
        return secured(_error(request, 500, message))  # answered outside the guard

    def _error(request: Request, status: int, message: str, *, title: str = "Cannot show this") -> Response:
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        page = app_path(request).strip("/").split("/")[0]
        back = page if page in dict(PAGES) else None
        return render(request, "error.html", status=status, title=title, message=message, page=page, back=back)

    # -- pages -------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def home(request: Request) -> RedirectResponse:
        return RedirectResponse(app_root(request) + "/releases", status_code=303)

    @app.get("/releases", include_in_schema=False)
    def releases_page(request: Request, metric: Metric = None, region: Region = None, statistic: Statistic = None,
                      days: Days = None, start: Start = None, end: End = None, page: Page = None) -> HTMLResponse:
        with snapshot() as shot:
            view = releases_.releases_view(shot, metric=metric, region=region, statistic=statistic, days=days,
                                           start=start, end=end)
            versions = shot.versions
        table = releases_.table_page(view, page)
        spec = charts.with_data(charts.band_spec(_axis(view.statistic, view.unit)), releases_.chart_points(view))
        days_choice = str(view.days) if view.days is not None else ("" if start or end else "all")
        return render(request, "releases.html", page="releases", title="Releases", view=view, table=table,
                      days_choice=days_choice,
                      chart=spec if view.cells else None, versions=versions, query=dict(request.query_params))

    @app.get("/budget", include_in_schema=False)
    def budget_page(request: Request) -> HTMLResponse:
        with snapshot() as shot:
            view = budget_.budget_view(shot)
            versions = shot.versions
        spec = charts.with_data(charts.budget_spec(), budget_.chart_points(view))
        return render(request, "budget.html", page="budget", title="Budget", view=view,
                      chart=spec if view.periods else None, versions=versions)

    @app.get("/provenance", include_in_schema=False)
    def provenance_page(request: Request, action: Action = None, role: Role = None, release: ReleaseText = None,
                        text: Text = None, start: Start = None, end: End = None, page: Page = None) -> HTMLResponse:
        with snapshot() as shot:
            view = provenance_.provenance_view(shot, action=action, role=role, release=release, text=text,
                                               start=start, end=end, page=page)
            versions = shot.versions
        return render(request, "provenance.html", page="provenance", title="Provenance", view=view,
                      versions=versions, query=dict(request.query_params))

    @app.get("/forecasts", include_in_schema=False)
    def forecasts_page(request: Request, metric: Metric = None, region: Region = None,
                       statistic: Statistic = None) -> HTMLResponse:
        with snapshot() as shot:
            view = forecasts.forecasts_view(shot, metric=metric, region=region, statistic=statistic)
            versions = shot.versions
        spec = charts.with_data(charts.band_spec(_axis(view.statistic, view.unit), forecasts.SERIES),
                                forecasts.chart_points(view))
        return render(request, "forecasts.html", page="forecasts", title="Forecasts", view=view,
                      chart=spec if view.windows else None, versions=versions)

    @app.get("/recommendations", include_in_schema=False)
    def recommendations_page(request: Request, recommendation: Recommendation = None) -> HTMLResponse:
        with snapshot() as shot:
            view = recommendations.recommendations_view(shot, recommendation=recommendation)
            versions = shot.versions
        lmp = charts.with_data(charts.bars_spec("bus", "$/MWh"), recommendations.lmp_points(view))
        frontier = charts.with_data(charts.frontier_spec("cost ($/h)", "CO2 (t/h)"),
                                    recommendations.frontier_points(view))
        return render(request, "recommendations.html", page="recommendations", title="Recommendations and decisions",
                      view=view, lmp_chart=lmp if view.lmps else None,
                      frontier_chart=frontier if view.frontier else None, versions=versions)

    @app.get("/api", include_in_schema=False)
    def api_page(request: Request) -> HTMLResponse:
        return render(request, "api.html", page="api", title="JSON API", endpoints=_endpoints(app.openapi()),
                      versions=None)

    # -- the JSON API ------------------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["health"], summary="Whether the store can be read",
             responses={503: {"description": 'the store cannot be read now: {"status": "unavailable", "error": ...}'}})
    def health() -> Health | Response:
        try:
            with snapshot() as shot:
                shot.rows("SELECT count(*) AS n FROM (SELECT 1 FROM releases LIMIT 1)")
                return Health(status="ok", federation=cfg.federation.id, tables=shot.versions)
        except Exception as exc:  # the check's answer (open to anyone: the reason goes to the log only)
            log.error("health check: the store cannot be read", exc_info=exc)
            return JSONResponse({"status": "unavailable", "error": "the store cannot be read; the server's log says "
                                 "why"}, status_code=503)

    @app.get("/api/releases", response_model=releases_.ReleasesView, tags=["releases"],
             summary="One series: every released cell with each statistic's value, noise sd and 95% interval")
    def releases_api(metric: Metric = None, region: Region = None, statistic: Statistic = None, days: Days = None,
                     start: Start = None, end: End = None) -> releases_.ReleasesView:
        with snapshot() as shot:
            return releases_.releases_view(shot, metric=metric, region=region, statistic=statistic, days=days,
                                           start=start, end=end)

    @app.get("/api/budget", response_model=budget_.BudgetView, tags=["budget"],
             summary="Epsilon spent and left per privacy period, and releases refused for budget")
    def budget_api() -> budget_.BudgetView:
        with snapshot() as shot:
            return budget_.budget_view(shot)

    @app.get("/api/provenance", response_model=provenance_.ProvenanceView, tags=["provenance"],
             summary="What `fusion verify` reports, and the audit events (filtered, newest first, by page)")
    def provenance_api(action: Action = None, role: Role = None, release: ReleaseText = None, text: Text = None,
                       start: Start = None, end: End = None, page: Page = None) -> provenance_.ProvenanceView:
        with snapshot() as shot:
            return provenance_.provenance_view(shot, action=action, role=role, release=release, text=text,
                                               start=start, end=end, page=page)

    @app.get("/api/forecasts", response_model=forecasts.ForecastsView, tags=["forecasts"],
             summary="A series' releases and latest forecast with their bands, and the backtest scores")
    def forecasts_api(metric: Metric = None, region: Region = None,
                      statistic: Statistic = None) -> forecasts.ForecastsView:
        with snapshot() as shot:
            return forecasts.forecasts_view(shot, metric=metric, region=region, statistic=statistic)

    @app.get("/api/recommendations", response_model=recommendations.RecommendationsView, tags=["recommendations"],
             summary="The recommendations, one in detail (LMPs, Pareto frontier), and the decisions on them")
    def recommendations_api(recommendation: Recommendation = None) -> recommendations.RecommendationsView:
        with snapshot() as shot:
            return recommendations.recommendations_view(shot, recommendation=recommendation)

    return app


def _server_status(exc: FusionError) -> int:
    """The status of an error that is not the request's: 503 where the store cannot be read now (its disk or
    permissions) or a read ran past its limits, since the same request may be answered later; 500 otherwise (a
    damaged data file, the registry missing or malformed)."""
    return 503 if isinstance(exc, StoreUnavailable | SqlLimitExceeded) else 500


def _axis(statistic: str, unit: str | None) -> str:
    return f"{statistic} ({unit})" if unit else statistic


def _linker(root: str) -> Callable[..., str]:
    """link(path, query, **changes): a URL of this app with `query` (a dict) updated (a None value dropped)."""

    def link(path: str, query: dict[str, Any] | None = None, **changes: Any) -> str:
        merged = {**(query or {}), **changes}
        kept = {k: v for k, v in merged.items() if v is not None and v != ""}
        return f"{root}/{path}" + (f"?{urlencode(kept)}" if kept else "")

    return link


def _endpoints(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The API page's rows, from the OpenAPI document: path, summary, parameters, response model."""
    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            answer = op.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {})
            ref = answer.get("schema", {})
            rows.append({
                "method": method.upper(), "path": path, "summary": op.get("summary", ""),
                "parameters": [(p["name"], p.get("description", "")) for p in op.get("parameters", [])],
                "model": str(ref.get("$ref", "")).rsplit("/", 1)[-1],
            })
    return rows


__all__ = ["PAGES", "STATIC", "VENDORED", "create_app"]

"""Vega-Lite specs of the dashboard's charts, built with Altair. A spec names its data (`{"name": "points"}`) and
the rows travel in its `datasets`, so Altair validates the small spec once (specs are cached) and never thousands
of rows; the page draws it with the vendored vega-embed (dashboard/static/dashboard.js). Times are epoch
milliseconds shown in UTC."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import altair as alt

#: The name under which every spec's rows are given.
DATA = "points"
_TIME_FORMAT = "%Y-%m-%d %H:%M"


def with_data(spec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of a cached spec holding `rows`."""
    filled = copy.copy(spec)
    filled["datasets"] = {DATA: rows}
    return filled


#: Colours of the series, in order (Vega's category10 less its red and green: neither carries a meaning here).
PALETTE = ("#4c78a8", "#f58518", "#9d755d", "#72b7b2", "#b279a2")


@lru_cache(maxsize=256)
def band_spec(y_title: str, series: tuple[str, ...] = (), *, height: int = 320) -> dict[str, Any]:
    """Lines of `value` over `t` (window start, epoch ms), one per `series` (their names, in legend order; empty:
    whatever the rows hold), each with its 95% band [low, high]; a point per window carries the tooltip (value,
    noise sd, interval)."""
    x = alt.X("t:T", title="window start (UTC)", scale=alt.Scale(type="utc"))
    scale = alt.Scale(domain=list(series), range=list(PALETTE[: len(series)])) if series else alt.Scale(
        range=list(PALETTE))
    colour = alt.Color("series:N", title=None, scale=scale, legend=alt.Legend(orient="top", symbolOpacity=1))
    base = alt.Chart(alt.Data(name=DATA)).encode(x=x, color=colour)
    band = base.mark_area(opacity=0.22).encode(y=alt.Y("low:Q", title=y_title), y2="high:Q")
    line = base.mark_line(strokeWidth=1.6).encode(y=alt.Y("value:Q"))
    points = base.mark_circle(size=18, opacity=0.7).encode(
        y=alt.Y("value:Q"),
        tooltip=[
            alt.Tooltip("series:N", title="series"),
            alt.Tooltip("t:T", title="window start (UTC)", format=_TIME_FORMAT, formatType="utc"),
            alt.Tooltip("value:Q", title="value", format=",.4~g"),
            alt.Tooltip("sd:Q", title="sd", format=",.4~g"),
            alt.Tooltip("low:Q", title="95% low", format=",.4~g"),
            alt.Tooltip("high:Q", title="95% high", format=",.4~g"),
        ],
    )
    chart = alt.layer(band, line, points).properties(width="container", height=height)
    return chart.to_dict()


@lru_cache(maxsize=16)
def budget_spec() -> dict[str, Any]:
    """Per privacy period (`period`), epsilon spent (bar) against the period's cap (tick)."""
    x = alt.X("period:N", title="privacy period", sort=None, axis=alt.Axis(labelAngle=-40, labelOverlap="greedy"))
    base = alt.Chart(alt.Data(name=DATA)).encode(x=x)
    spent = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("spent:Q", title="epsilon"),
        tooltip=[alt.Tooltip("period:N"), alt.Tooltip("spent:Q", format=".4f"), alt.Tooltip("cap:Q", format=".4f"),
                 alt.Tooltip("left:Q", format=".4f")],
    )
    cap = base.mark_tick(color="#b22", thickness=2).encode(y=alt.Y("cap:Q"))
    return alt.layer(spent, cap).properties(width="container", height=220).to_dict()


@lru_cache(maxsize=16)
def bars_spec(x_title: str, y_title: str) -> dict[str, Any]:
    """One bar per `key` of height `value` (LMPs per bus)."""
    chart = alt.Chart(alt.Data(name=DATA)).mark_bar().encode(
        x=alt.X("key:N", title=x_title, sort=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("value:Q", title=y_title),
        color=alt.Color("part:N", title=None, legend=alt.Legend(orient="top")),
        tooltip=[alt.Tooltip("key:N", title=x_title), alt.Tooltip("part:N", title="part"),
                 alt.Tooltip("value:Q", title=y_title, format=",.4~g")],
    )
    return chart.properties(width="container", height=240).to_dict()


@lru_cache(maxsize=16)
def frontier_spec(x_title: str, y_title: str) -> dict[str, Any]:
    """The Pareto frontier: points (x, y) joined in order, the `proposed` one marked larger and in red."""
    base = alt.Chart(alt.Data(name=DATA)).encode(
        x=alt.X("x:Q", title=x_title, scale=alt.Scale(zero=False)),
        y=alt.Y("y:Q", title=y_title, scale=alt.Scale(zero=False)),
    )
    line = base.mark_line(color="#4c78a8").encode(order="order:Q")
    points = base.mark_point(filled=True).encode(
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=["frontier", "proposed"],
                                                                range=["#4c78a8", "#d62728"]),
                        legend=alt.Legend(orient="top")),
        size=alt.Size("kind:N", scale=alt.Scale(domain=["frontier", "proposed"], range=[40, 220]), legend=None),
        tooltip=[alt.Tooltip("key:N", title="point"), alt.Tooltip("x:Q", title=x_title, format=",.4~g"),
                 alt.Tooltip("y:Q", title=y_title, format=",.4~g")],
    )
    return alt.layer(line, points).properties(width="container", height=260).to_dict()

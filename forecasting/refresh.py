"""Forecasts refreshed after releases: `fusion schedule` and `fusion stream` call `refresh_forecasts` with the
releases they just published, when the config has a `[forecasting]` block with `refresh = true` (the default
there). A refresh never fails the release it follows: what went wrong comes back as the line to show."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from forecasting.series import quoted
from fusion.config.federation import Config
from fusion.errors import FusionError
from fusion.store.access import open_store

_log = logging.getLogger(__name__)


def refresh_forecasts(config: Config, release_ids: Sequence[str]) -> str | None:
    """Score and forecast again every series these releases hold; returns a one-line summary (None when the
    config asks for no refresh, or nothing was released)."""
    if config.forecasting is None or not config.forecasting.refresh or not release_ids:
        return None
    from forecasting.run import run_forecasts

    try:
        with open_store(config) as store:
            touched = store.sql(
                "SELECT DISTINCT metric, region FROM releases WHERE release_id IN "
                f"({', '.join(quoted(r) for r in release_ids)})"
            ).to_pylist()
        if not touched:
            return None
        metrics = sorted({row["metric"] for row in touched})
        regions = sorted({row["region"] for row in touched})
        run = run_forecasts(config, metrics=metrics, regions=regions)
    except FusionError as exc:  # too little history yet, most often: the next release tries again
        return f"forecasts not refreshed: {exc}"
    except Exception as exc:  # the release stands; the forecast's failure is reported, and logged in full
        _log.exception("forecast refresh after %s failed", ", ".join(release_ids))
        return f"forecasts not refreshed ({type(exc).__name__}: {exc}); this is probably a bug"
    forecast = sum(o.forecast is not None for o in run.outcomes)
    skipped = f", {len(run.skipped_releases)} unverified release(s) left out" if run.skipped_releases else ""
    return (f"forecasts refreshed: {forecast} of {len(run.outcomes)} series, {run.forecast_rows} row(s), "
            f"{run.score_rows} earlier window(s) scored{skipped}")


__all__ = ["refresh_forecasts"]

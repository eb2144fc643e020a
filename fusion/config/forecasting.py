"""The config's `[forecasting]` block: which models `fusion backtest` compares, how far and from how much history
`fusion forecast` forecasts, and whether scheduled and stream releases refresh the forecasts. Only the values
live here (pydantic, no statsmodels): the models are in the top-level `forecasting/` package."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fusion.runtime.durations import parse_duration

#: The most windows a forecast reaches ahead (48 hours of one-minute windows, a month of 15-minute ones). Each
#: forecast writes a row per window ahead for every series, and the store is append-only: a forecast of years of
#: windows would stay in `forecasts` for good, and every later forecast and the dashboard read its rows.
MAX_HORIZON_WINDOWS = 2880
#: A model is fitted on at least this many seasonal periods of released windows (forecasting.models.fit_forecast):
#: one day of a daily cycle cannot tell the cycle from the day's weather.
FIT_PERIODS = 2
#: The period a model takes where windows are a day or longer (no daily cycle): FIT_PERIODS of it are 48 windows.
PERIOD_WITHOUT_CYCLE = 24


def least_history(window: timedelta) -> timedelta:
    """The least history a model is fitted on: FIT_PERIODS daily cycles (two days) where windows divide a day,
    else FIT_PERIODS x PERIOD_WITHOUT_CYCLE windows.

    >>> least_history(timedelta(minutes=15)), least_history(timedelta(days=1))
    (datetime.timedelta(days=2), datetime.timedelta(days=48))
    """
    cells = timedelta(days=1) / window
    cycle = cells >= 2 and cells == int(cells)
    return FIT_PERIODS * (timedelta(days=1) if cycle else PERIOD_WITHOUT_CYCLE * window)


class ModelName(StrEnum):
    """The forecasting models; `profile` (the default, first) and `uc` are noise-aware, the others are backtest
    baselines."""

    PROFILE = "profile"  # a slowly varying daily profile (inverse-noise weighted) with day and hour anomalies decaying
    UC = "uc"  # unobserved components: level + daily harmonics + AR(1), each cell's DP variance known
    SEASONAL_NAIVE = "seasonal_naive"  # the same window one day earlier
    SAME_HOUR_MEAN = "same_hour_mean"  # the mean of the same window over the last 7 days
    ETS = "ets"  # additive exponential smoothing with a daily season (statsmodels ETSModel)


class Statistic(StrEnum):
    """Which column of `releases` a series follows, with its noise SD: mean (ratio_mean, mean_sd), sum (sum,
    sum_sd) or count (count, count_sd)."""

    MEAN = "mean"
    SUM = "sum"
    COUNT = "count"


#: The release columns each statistic's series follows: (value, noise SD). What is forecast and scored against, and
#: so what the Forecasts page and `fusion forecast --plot` draw as released (the mean's `ratio_mean` is the
#: unclipped ratio; the clipped `mean` is not what a forecast of the mean predicts).
SERIES_COLUMNS = {Statistic.MEAN: ("ratio_mean", "mean_sd"), Statistic.SUM: ("sum", "sum_sd"),
                  Statistic.COUNT: ("count", "count_sd")}


class ForecastingConfig(BaseModel):
    """`[forecasting]`: models compared by `fusion backtest` (the first is used until a backtest chose one), the
    horizon and history of a forecast, the backtest's rolling origins, and the refresh after each release."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    models: tuple[ModelName, ...] = Field(default=tuple(ModelName), min_length=1)
    statistics: tuple[Statistic, ...] = Field(default=(Statistic.MEAN,), min_length=1)
    horizon: str = "48h"  # how far ahead a forecast reaches: at most history and 2,880 windows
    history: str = "28d"  # the most history a model is fitted on (at least two days: least_history)
    min_history: str = "2d"  # the least history a backtest origin has before it (at least two days)
    backtest_origins: int = Field(default=16, ge=2, le=100)  # rolling origins: model choice and calibration
    backtest_step: str = "24h"  # time between two backtest origins
    # Another model replaces the first of `models` only where its backtest MAE is lower by more than this share:
    # a backtest of a few origins is noisy, and on the benchmark a plain lowest-MAE choice did worse than none.
    selection_margin: float = Field(default=0.1, ge=0, lt=1)
    # ... and where it is also better origin by origin: the mean of its paired differences in squared error against
    # the releases is below zero by at least this many standard errors (a Diebold-Mariano test; the releases' noise
    # cancels out of a paired difference). On the benchmark, MAE alone chose models that did worse later.
    selection_t: float = Field(default=2.0, ge=0)
    # `fusion schedule` and `fusion stream` forecast a series again after each release of it. A TOML boolean only:
    # a string ("yes", "false") is refused, never read as one.
    refresh: bool = Field(default=True, strict=True)

    @field_validator("horizon", "history", "min_history", "backtest_step")
    @classmethod
    def _positive(cls, text: str) -> str:
        if parse_duration(text).total_seconds() <= 0:
            raise ValueError(f"'{text}' must be a positive duration")
        return text

    @field_validator("models", "statistics")
    @classmethod
    def _distinct(cls, names: tuple[StrEnum, ...]) -> tuple[StrEnum, ...]:
        if len(set(names)) != len(names):
            raise ValueError(f"{[str(n) for n in names]} names one twice; list each once")
        return names

    def check_window(self, window: timedelta) -> None:
        """Refuse durations that are not whole numbers of the federation's window (a forecast is per window), a
        history shorter than a model is fitted on, a min_history longer than the history, and a horizon past the
        history or MAX_HORIZON_WINDOWS."""
        for name in ("horizon", "history", "min_history", "backtest_step"):
            value = parse_duration(getattr(self, name))
            if value % window:
                raise ValueError(
                    f"forecasting.{name} = '{getattr(self, name)}' is not a whole number of federation.window "
                    f"({window}); forecasts are made per window"
                )
        least = least_history(window)
        for name in ("history", "min_history"):
            if parse_duration(getattr(self, name)) < least:
                raise ValueError(
                    f"forecasting.{name} {getattr(self, name)} is shorter than the {_days(least)} a model is fitted "
                    f"on at least ({least // window} windows: {FIT_PERIODS} x its seasonal period); every forecast "
                    "would be refused as too short"
                )
        # After the least history: a history of one day is refused for being too short for any model, not for
        # being shorter than the default min_history.
        if parse_duration(self.min_history) > parse_duration(self.history):
            raise ValueError(f"forecasting.min_history {self.min_history} is longer than forecasting.history "
                             f"{self.history}: a backtest origin cannot have more history than a model is fitted on")
        if parse_duration(self.horizon) > parse_duration(self.history):
            raise ValueError(horizon_beyond_history("forecasting.horizon", self.horizon, self.history))
        if parse_duration(self.horizon) / window > MAX_HORIZON_WINDOWS:
            raise ValueError(too_many_windows("forecasting.horizon", self.horizon, window))


def _days(length: timedelta) -> str:
    return f"{length.days} days" if not length % timedelta(days=1) else str(length)


def horizon_beyond_history(name: str, horizon: str, history: str) -> str:
    """Why a horizon longer than the history is refused; `name` is where the horizon was given."""
    return (
        f"{name} {horizon} is longer than forecasting.history ({history}): a forecast reaches at most as far ahead "
        "as the history it is fitted on; shorten the horizon or lengthen the history"
    )


def too_many_windows(name: str, horizon: str, window: timedelta) -> str:
    """Why a horizon of over MAX_HORIZON_WINDOWS windows is refused; `name` is where the horizon was given."""
    return (
        f"{name} {horizon} is {parse_duration(horizon) / window:,.0f} windows of {window}, over the most a forecast "
        f"reaches ({MAX_HORIZON_WINDOWS:,} windows): each is a row per series in the append-only `forecasts` table"
    )


__all__ = [
    "FIT_PERIODS",
    "MAX_HORIZON_WINDOWS",
    "PERIOD_WITHOUT_CYCLE",
    "SERIES_COLUMNS",
    "ForecastingConfig",
    "ModelName",
    "Statistic",
    "horizon_beyond_history",
    "least_history",
    "too_many_windows",
]

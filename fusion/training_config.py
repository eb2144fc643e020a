"""The config's `[[models]]`: models trained across the institutions by `fusion train` (training/). Only the values
live here (pydantic, no torch).

Each institution's training rows are a Parquet or CSV table it holds (`rows`, a path with `{institution}` in it,
relative to the config's directory): the `features` columns and an integer class `target`. The rows are about the
readings of [start, end), so every round is charged to that interval's privacy period, like its releases.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ModelConfig(BaseModel):
    """One `[[models]]` entry: its data, architecture (hidden layer widths of an MLP), rounds, clipping norm C,
    learning rate, and the run's (epsilon, delta) target; delta is the federation's `privacy.delta`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: ModelName
    rows: str  # e.g. "training/{institution}.parquet"
    held_out: str | None = None  # a table of the same columns the federation may evaluate on (public)
    features: tuple[str, ...] = Field(min_length=1)
    target: str
    classes: int = Field(ge=2, le=10_000)
    start: str  # ISO 8601: the interval of the readings the rows come from
    end: str
    hidden: tuple[int, ...] = (32,)
    rounds: int = Field(default=30, ge=1, le=10_000)
    clip: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=3.0, gt=0)
    final_learning_rate: float | None = Field(default=0.5, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    epsilon: float = Field(default=1.0, gt=0, le=20)
    scale: float = Field(default=4096.0, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> Self:
        if "{institution}" not in self.rows:
            raise ValueError(f"models.{self.name}.rows: write the path with {{institution}} in it, e.g. "
                             "'training/{institution}.parquet'")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"models.{self.name}.hidden: layer widths must be at least 1")
        if self.target in self.features:
            raise ValueError(f"models.{self.name}: the target '{self.target}' is also a feature; remove it there")
        return self

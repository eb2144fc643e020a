"""The config's `[[models]]`: models trained across the institutions by `fusion train` (training/). Only the values
live here (pydantic, no torch).

Each institution's training rows are either a Parquet or CSV table it holds (`rows`, a path with `{institution}` in
it, relative to the config's directory): the `features` columns and an integer class `target`; or, without `rows`,
built from its own feeds (training/feed_rows.py): `features` and `target` name metrics, the target `horizon` ahead,
its class by `target_bins`. The rows are about the readings of [start, end), so every round is charged to that
interval's privacy period, like its releases.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusion.runtime.durations import floor_to_grid, parse_duration

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

#: The widest hidden layer a model may have, in units.
MAX_LAYER_WIDTH = 100_000
#: The most weights and biases a model may have. Each round every institution seals one slot per parameter (8,192
#: slots a BFV ciphertext, about 250 kB): a million parameters is 123 ciphertexts, about 31 MB per institution per
#: round, and the noise grows with the square root of the parameters while the clipped signal does not.
MAX_PARAMETERS = 1_000_000


def parameter_count(inputs: int, classes: int, hidden: Sequence[int]) -> int:
    """Weights and biases of the MLP inputs -> hidden... -> classes (training/trainer.py build_model)."""
    widths = (inputs, *hidden, classes)
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def _moment(text: str, field: str) -> datetime:
    """An ISO 8601 time as fusion/release/plan.py parse_time reads it (naive: UTC), or a ValueError naming `field`."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}: '{text}' is not an ISO 8601 time; write e.g. 2026-01-01T00:00") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _rows_problem(rows: str) -> str | None:
    """What is wrong with a `rows` path as a template (None: nothing): it holds `{institution}`, filled in with each
    institution's id, and no other field; a brace meant literally is doubled (`{{`, `}}`)."""
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(rows) if name is not None
        ]
    except ValueError as exc:
        return f"'{rows}' has an unmatched brace ({exc}; double a brace meant literally: {{{{ or }}}})"
    for name, spec, conversion in fields:
        if name != "institution" or spec or conversion:
            whole = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"'{rows}' holds {{{whole}}}, but only {{institution}} is filled in (double a brace meant literally)"
    if not fields:
        return f"'{rows}' names no institution"
    return None


class ModelConfig(BaseModel):
    """One `[[models]]` entry: its data, architecture (hidden layer widths of an MLP), rounds, clipping norm C,
    learning rate, and the run's (epsilon, delta) target; delta is the federation's `privacy.delta`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: ModelName
    rows: str | None = None  # e.g. "training/{institution}.parquet"; None: rows from the feeds' metrics
    held_out: str | None = None  # a table of the same columns the federation may evaluate on (public)
    features: tuple[str, ...] = Field(min_length=1)  # columns of `rows`, or metrics
    target: str  # a column of `rows`, or a metric
    classes: int | None = Field(default=None, ge=2, le=10_000)  # feeds: len(target_bins) + 1
    horizon: str | None = None  # feeds: how far ahead the target is (and the step features are averaged over)
    target_bins: tuple[float, ...] | None = None  # feeds: class edges of the target (increasing)
    change: bool = False  # feeds: classify the target's change over the horizon, not its value
    start: str  # ISO 8601: the interval of the readings the rows come from
    end: str
    hidden: tuple[int, ...] = (32,)  # MLP widths ([]: softmax regression); 1-100,000 units each, 1M parameters in all
    rounds: int = Field(default=30, ge=1, le=10_000)
    clip: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=3.0, gt=0)
    final_learning_rate: float | None = Field(default=0.5, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    epsilon: float = Field(default=1.0, gt=0, le=20)
    scale: float = Field(default=4096.0, ge=1)
    # `rows` only: each row is one privacy unit's data (one reading, or one entity's at entity level), so removing a
    # unit removes its row, and a round is charged for an example added or removed; false (the default): a row may
    # combine several units' readings, removing one changes it, and a round is charged for an example changed
    # (about twice as much sensitivity). Rows from the feeds combine readings: refused there.
    unit_rows: bool = False

    @model_validator(mode="after")
    def _checks(self) -> Self:
        start = _moment(self.start, f"models.{self.name}.start")
        end = _moment(self.end, f"models.{self.name}.end")
        if not start < end:
            raise ValueError(f"models.{self.name}: start {self.start} is not before end {self.end}")
        if self.rows is None and self.unit_rows:
            raise ValueError(
                f"models.{self.name}.unit_rows: rows from the feeds average several readings each, so removing one "
                "changes a row: only a `rows` table can assert one unit per row"
            )
        if self.rows is None:
            if self.horizon is None or not self.target_bins:
                raise ValueError(
                    f"models.{self.name}: without `rows` the model learns from the feeds: set `horizon` "
                    "(e.g. '1h') and `target_bins` (class edges of the target metric)"
                )
            if list(self.target_bins) != sorted(set(self.target_bins)):
                raise ValueError(f"models.{self.name}.target_bins: the edges must increase")
            if self.classes not in (None, len(self.target_bins) + 1):
                raise ValueError(
                    f"models.{self.name}.classes: {len(self.target_bins)} target_bins make "
                    f"{len(self.target_bins) + 1} classes; drop `classes` or fix it"
                )
            try:
                horizon = parse_duration(self.horizon)
            except ValueError as exc:
                raise ValueError(f"models.{self.name}.horizon: {exc}") from None
            if horizon <= timedelta(0):
                raise ValueError(f"models.{self.name}.horizon: '{self.horizon}' must be a positive duration")
            if horizon > end - start:
                raise ValueError(
                    f"models.{self.name}.horizon: '{self.horizon}' is longer than the model's interval "
                    f"[{self.start}, {self.end}): a row's target is one horizon after its features, both read "
                    "within the interval; shorten the horizon or widen the interval"
                )
        elif (problem := _rows_problem(self.rows)) is not None:
            raise ValueError(
                f"models.{self.name}.rows: {problem}; write the path with {{institution}} in it, e.g. "
                "'training/{institution}.parquet'"
            )
        elif self.classes is None:
            raise ValueError(f"models.{self.name}.classes: a model on `rows` names its number of classes")
        if any(not 1 <= h <= MAX_LAYER_WIDTH for h in self.hidden):
            raise ValueError(
                f"models.{self.name}.hidden: layer widths must be 1 to {MAX_LAYER_WIDTH:,} units, "
                f"got {list(self.hidden)}"
            )
        if self.rows is not None and self.target in self.features:
            raise ValueError(f"models.{self.name}: the target '{self.target}' is also a feature; remove it there")
        return self

    def input_width(self, regions: int) -> int:
        """Inputs of the model: its feature columns, or for a model on the feeds its metrics, the one-hot of the
        federation's `regions` and the hour of day (sine, cosine) (training/feed_rows.py)."""
        if self.rows is not None:
            return len(self.features)
        return len(self.features) + regions + 2

    @property
    def class_count(self) -> int:
        """Classes of the target: `classes`, or len(target_bins) + 1 for a model on the feeds."""
        if self.classes is not None:
            return self.classes
        assert self.target_bins is not None
        return len(self.target_bins) + 1


def check_models(
    models: Sequence[ModelConfig], *, metrics: Sequence[str], regions: int, delta: float, period: timedelta
) -> None:
    """Cross-field checks against the federation: one model per name (`fusion train --model` picks by name), a
    model's interval within one privacy period (`period`: every round is charged to one), a model on the feeds
    learns from the federation's metrics, every model stays within MAX_PARAMETERS, and its epsilon is one the RDP
    accounting of its rounds can reach at the federation's delta."""
    if not models:
        return
    from privacy.accountant import rdp_floor  # loads SciPy: only where a config has models

    floor = rdp_floor(delta)
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"models: duplicate names {duplicates}; `fusion train --model` picks a model by its name")
    for model in models:
        start, end = _moment(model.start, f"models.{model.name}.start"), _moment(model.end, f"models.{model.name}.end")
        boundary = floor_to_grid(start, period) + period  # the end of the privacy period `start` is in
        if end > boundary:
            raise ValueError(
                f"models.{model.name}.start / end: [{model.start}, {model.end}) crosses the privacy period boundary "
                f"at {boundary.isoformat()} (privacy.period): every round is charged to one period; train on "
                "readings of one period"
            )
        if model.epsilon <= floor:
            raise ValueError(
                f"models.{model.name}.epsilon: {model.epsilon:g} is below what the Renyi-DP accounting of its rounds "
                f"reaches at privacy.delta {delta:g} (about {floor:.3g}, however much noise): raise it"
            )
        if model.rows is None:
            unknown = [m for m in dict.fromkeys((*model.features, model.target)) if m not in metrics]
            if unknown:
                raise ValueError(
                    f"models.{model.name}.features / target: without `rows` they name metrics of this federation "
                    f"({', '.join(metrics)}); unknown: {', '.join(unknown)}"
                )
        parameters = parameter_count(model.input_width(regions), model.class_count, model.hidden)
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"models.{model.name}.hidden: {list(model.hidden)} makes {parameters:,} parameters, above the "
                f"{MAX_PARAMETERS:,} a model may have (every institution encrypts one slot per parameter each "
                "round); narrow or drop hidden layers"
            )

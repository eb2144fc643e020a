"""What a model of the config is trained under and what one of its rounds costs, from the config alone: its
settings (whose digest names the run in every round), the ledger's terms for its rounds and the charge of one. The
seal checks of releases (pipelines/sealing.py) read a round's charge here as training does, which is why this
module, with training/accounting.py and training/gradients.py beneath it, imports nothing else of training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime

from fusion.config.federation import Config, PrivacyUnit
from fusion.config.training import ModelConfig, parameter_count
from fusion.release.plan import Period, parse_time, period_of
from fusion.runtime.durations import parse_duration
from privacy.accountant import Composition, ReleaseCharge
from training.accounting import TrainingBudget, plan_budget


@dataclass(frozen=True)
class TrainingSettings:
    """A run's hyperparameters and guarantee; `digest` names them in every round's envelopes."""

    model_id: str
    hidden: tuple[int, ...]
    rounds: int
    clip: float
    learning_rate: float
    epsilon: float
    delta: float
    scale: float = 2.0**12
    quorum: int = 1
    max_colluding: int = 0
    init_seed: int = 0  # the initial weights are public: every institution starts from the same model
    final_learning_rate: float | None = None  # decay linearly to this by the last round (None: constant)
    momentum: float = 0.0  # heavy ball on the noisy gradients (post-processing: it averages their noise down)
    # Each row is one privacy unit's data: an example is only ever added or removed, never changed (the smaller
    # sensitivity: training/accounting.py).
    unit_rows: bool = False
    # What the model reads and predicts, so that a run never resumes on other inputs: its input width and classes
    # (with `hidden`, the architecture), and the description of its rows (`settings_for`: the
    # features in order, the target, the rows table or the feeds' horizon and bins, the interval). Empty: a run
    # built in code, which names its own.
    inputs: int = 0
    classes: int = 0
    data: str = ""

    def learning_rate_at(self, number: int) -> float:
        """The step size of round `number` (1-based)."""
        if self.final_learning_rate is None or self.rounds == 1:
            return self.learning_rate
        fraction = (number - 1) / (self.rounds - 1)
        return self.learning_rate + fraction * (self.final_learning_rate - self.learning_rate)

    def digest(self) -> str:
        """Names the run in every round. It covers `unit_rows` always: a run committed before rounds were charged
        for an example changed (noise calibrated to half the sensitivity) must not resume under the new charge,
        whose epsilon would assume every round had the new noise. It covers the model's inputs, classes and rows
        (`inputs`, `classes`, `data`): a run resumed on other features, or their order, would step a committed
        model with gradients of other inputs."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def settings_for(config: Config, model: ModelConfig) -> TrainingSettings:
    return TrainingSettings(
        model_id=model.name,
        hidden=model.hidden,
        rounds=model.rounds,
        clip=model.clip,
        learning_rate=model.learning_rate,
        final_learning_rate=model.final_learning_rate,
        momentum=model.momentum,
        epsilon=model.epsilon,
        delta=config.privacy.delta,
        scale=model.scale,
        quorum=config.privacy.quorum,
        max_colluding=config.privacy.max_colluding,
        unit_rows=model.unit_rows,
        inputs=model.input_width(len(config.regions)),
        classes=model.class_count,
        data=rows_description(config, model),
    )


def rows_description(config: Config, model: ModelConfig) -> str:
    """What the model's rows are, as canonical JSON (in the settings digest): its features in order and its target,
    the interval of the readings, and the `rows` table, or for rows from the feeds the step, the target's bins, the
    regions of the one-hot and the clamp bounds that scale each metric (training/feed_rows.py)."""
    doc: dict[str, object] = {
        "features": list(model.features),
        "target": model.target,
        "start": parse_time(model.start).isoformat(),
        "end": parse_time(model.end).isoformat(),
    }
    if model.rows is not None:
        doc["rows"] = model.rows
    else:
        assert model.horizon is not None and model.target_bins is not None  # checked at load
        used = set(model.features) | {model.target}
        doc |= {
            "horizon_s": parse_duration(model.horizon).total_seconds(),
            "target_bins": list(model.target_bins),
            "change": model.change,
            "regions": list(config.regions),
            "bounds": {m.name: [m.lower, m.upper] for m in config.metrics if m.name in used},
        }
    return json.dumps(doc, sort_keys=True)


def terms_for(config: Config, model: ModelConfig) -> LedgerTerms:
    start, end = parse_time(model.start), parse_time(model.end)  # start < end: checked at load
    composition = Composition.SEQUENTIAL if config.privacy.unit is PrivacyUnit.ENTITY else Composition.PARALLEL
    return LedgerTerms(
        period=period_of(config, start, end),
        cap=config.privacy.cap,
        delta=config.privacy.delta,
        composition=composition,
        start=start,
        end=end,
    )


@dataclass(frozen=True)
class LedgerTerms:
    """Where a run's rounds are charged: the privacy period and its cap and delta, how charges compose there, and
    the interval [start, end) of the readings the training rows come from."""

    period: Period
    cap: float
    delta: float
    composition: Composition
    start: datetime
    end: datetime

    def charge(self, budget: TrainingBudget) -> ReleaseCharge:
        return ReleaseCharge(mechanism=budget.mechanism, start=self.start, end=self.end, composition=self.composition)


def budget_for(settings: TrainingSettings, dimension: int) -> TrainingBudget:
    return plan_budget(
        epsilon=settings.epsilon,
        delta=settings.delta,
        rounds=settings.rounds,
        clip=settings.clip,
        scale=settings.scale,
        dimension=dimension,
        changed_examples=not settings.unit_rows,
    )


def feature_width(config: Config, model: ModelConfig) -> int:
    """Inputs of the model (ModelConfig.input_width over the federation's regions)."""
    return model.input_width(len(config.regions))


def round_charge(config: Config, model: ModelConfig) -> ReleaseCharge:
    """What one round of the model costs its privacy period: the ledger's charge for it."""
    dimension = parameter_count(feature_width(config, model), model.class_count, model.hidden)
    return terms_for(config, model).charge(budget_for(settings_for(config, model), dimension))


def recorded_round_charge(config: Config, model: str, settings: str) -> ReleaseCharge | None:
    """What a round of the config's model `model`, drawn under the settings whose digest is `settings`, costs its
    privacy period (`round_charge`, which names the model's interval): how an institution charges a round record from
    before round records kept their charge, which names only these. None where the config names no such model under
    those settings: then nothing bounds what the round cost, nor says in which period."""
    for entry in config.models:
        if entry.name == model and settings_for(config, entry).digest() == settings:
            return round_charge(config, entry)
    return None

"""DP full-batch gradient descent across institutions: each round, every institution present contributes its clipped,
rounded gradient sum (training/gradients.py) to one secure vector sum (training/secure_sum.py); the noisy sum
updates the model, theta <- theta - lr * g_hat / n_hat, which every institution then holds (the model is public to
the federation). The count n_hat is the mean of the rounds' noisy count slots (post-processing, no epsilon).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fusion.config.parameters import NOISE_MARGIN_SDS
from fusion.errors import FusionError
from privacy import he
from privacy.noise_shares import NoiseLayers
from privacy.skellam import MAX_POISSON_RATE
from training.accounting import TrainingBudget
from training.charging import TrainingSettings, budget_for
from training.gradients import contribution_vector, per_example_gradients
from training.secure_sum import RoundId, RoundSum

if TYPE_CHECKING:
    import torch


class RoundResumer(Protocol):
    """What knows whether a round lost after its charge can still be completed (training/attempts.py)."""

    def can_resume(self, round_id: RoundId, *, slots: int, variance: float, charged_for: str) -> bool:
        """Whether `round_id`, charged for the aggregate `charged_for` (payload SHA-256) and lost before its commit,
        can still be completed under its own id: no new draw, no new charge."""
        ...


class RoundSummer(RoundResumer, Protocol):
    """What runs a round's secure sum: the exchange and the releases' roles (training/exchange_round.py), or one
    process with every party's keys (training/secure_sum.py, for tests and benchmarks)."""

    @property
    def institutions(self) -> Collection[str]: ...

    def sum_round(
        self,
        vectors: Mapping[str, np.ndarray],
        *,
        round_id: RoundId,
        layers: NoiseLayers,
        generators: Mapping[str, np.random.Generator],
        pay: Callable[[str], None] | None = None,
    ) -> RoundSum: ...


@dataclass(frozen=True)
class Institution:
    """One institution's training rows (features float32 (rows, features), integer class labels (rows,))."""

    features: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class RoundRecord:
    """What a committed round leaves: the model after it, and what the round released and cost."""

    round: int
    parameters: np.ndarray  # flat float32, the model after this round
    count_estimate: float
    epsilon: float  # of the run so far
    sum: RoundSum
    metrics: dict[str, float] = field(default_factory=dict)
    velocity: np.ndarray | None = None  # the momentum after this round (None: no momentum)


def build_model(features: int, classes: int, hidden: tuple[int, ...], seed: int) -> torch.nn.Module:
    """An MLP features -> hidden... -> classes with ReLU, initialised from a public seed."""
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    width = features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def flat_parameters(model: torch.nn.Module) -> np.ndarray:
    import torch

    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()


def load_parameters(model: torch.nn.Module, flat: np.ndarray, *, source: str = "the parameters") -> None:
    """Set the model's weights and biases from `flat` (float32, as `flat_parameters` gives them); refuses a vector
    of another size (torch would fail on a short one and ignore the surplus of a long one)."""
    import torch

    expected = sum(p.numel() for p in model.parameters())
    if flat.shape != (expected,):
        raise FusionError(
            f"{source} hold {flat.size} values, but the model (its inputs, hidden layers and classes) has {expected} "
            "weights and biases: they are of another model; train this one under another name"
        )
    torch.nn.utils.vector_to_parameters(torch.as_tensor(flat, dtype=torch.float32), model.parameters())


def accuracy(model: torch.nn.Module, features: np.ndarray, targets: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        predicted = model(torch.as_tensor(features, dtype=torch.float32)).argmax(dim=1).numpy()
    return float((predicted == targets).mean())


def check_no_wrap(settings: TrainingSettings, budget: TrainingBudget, layers: NoiseLayers, *, rows: int) -> None:
    """Refuse a run whose noise Fusion cannot sample exactly (privacy/skellam.py), or whose sums could wrap mod t:
    every row at the bound in one slot (|r(gamma g_i)| <= gamma C + 1, the count slot w), plus every contributor's
    noise at NOISE_MARGIN_SDS standard deviations."""
    per_row = max(settings.scale * settings.clip + 1.0, budget.sensitivity.count_weight)
    noise = NOISE_MARGIN_SDS * math.sqrt(layers.total(layers.institutions) + layers.sealed * layers.institutions)
    if layers.sealed / 2.0 > MAX_POISSON_RATE:
        raise FusionError(
            f"models.{settings.model_id}: the calibrated noise (variance {layers.sealed:.3e} per institution) is too "
            "large to sample exactly; lower `scale`"
        )
    try:
        he.check_no_wrap(rows * per_row + noise)
    except he.WrapRisk as exc:
        raise FusionError(f"models.{settings.model_id}: {exc.args[0].split(':')[0]}; lower `scale`") from None


@dataclass
class Progress:
    """A run between rounds, rebuilt from its last committed round alike by every party: the model, the noisy
    counts seen per set of contributors (the count estimate is their running mean) and the momentum."""

    model: torch.nn.Module
    counts: dict[tuple[str, ...], list[float]]
    velocity: np.ndarray

    @classmethod
    def resume(cls, settings: TrainingSettings, *, features: int, classes: int, start: RoundRecord | None) -> Progress:
        """From `start` (None: the public initial model, before round 1)."""
        model = build_model(features, classes, settings.hidden, settings.init_seed)
        progress = cls(model, {}, np.zeros(flat_parameters(model).size))
        if start is not None:
            source = f"round {start.round} of model {settings.model_id}'s committed parameters"
            load_parameters(model, start.parameters, source=source)
            if start.velocity is not None:
                if start.velocity.shape != progress.velocity.shape:
                    raise FusionError(
                        f"{source}: its momentum holds {start.velocity.size} values, not {progress.velocity.size}"
                    )
                progress.velocity = start.velocity.astype(np.float64)
            progress.counts[start.sum.contributors] = [start.count_estimate] * start.round  # a running mean: weighted
        return progress

    def vector(self, settings: TrainingSettings, rows: Institution, generator: np.random.Generator) -> np.ndarray:
        """An institution's contribution to the next round (training/gradients.py)."""
        gradients = per_example_gradients(self.model, rows.features, rows.targets)
        return contribution_vector(gradients, clip=settings.clip, scale=settings.scale, generator=generator)

    def step(
        self,
        settings: TrainingSettings,
        budget: TrainingBudget,
        number: int,
        summed: RoundSum,
        held_out: Institution | None = None,
        *,
        charges: int | None = None,
    ) -> RoundRecord:
        """Round `number`'s update from its noisy sum: theta <- theta - lr * (momentum) g_hat / n_hat. `charges`: how
        many charges rounds 1..`number` made, attempts lost in crashes included (training/attempts.py
        `run_charges`; default `number`), which the run's epsilon after this round composes: never fewer than
        `number`, since every round up to this one was charged, whatever a ledger read back counts."""
        seen = self.counts.setdefault(summed.contributors, [])
        seen.append(float(summed.noisy_sum[-1]) / budget.sensitivity.count_weight)
        count = max(float(np.mean(seen)), 1.0)
        gradient = summed.noisy_sum[:-1].astype(np.float64) / settings.scale / count
        self.velocity = settings.momentum * self.velocity + gradient
        step = settings.learning_rate_at(number) * self.velocity
        load_parameters(self.model, flat_parameters(self.model) - step.astype(np.float32))
        metrics = {}
        if held_out is not None:
            metrics["accuracy"] = accuracy(self.model, held_out.features, held_out.targets)
        return RoundRecord(
            number,
            flat_parameters(self.model),
            count,
            budget.epsilon_after(number if charges is None else max(charges, number)),
            summed,
            metrics,
            self.velocity.astype(np.float32) if settings.momentum else None,
        )


def train(
    settings: TrainingSettings,
    federation: RoundSummer,
    data: Mapping[str, Institution],
    *,
    classes: int,
    generators: Mapping[str, np.random.Generator],
    start: RoundRecord | None = None,
    present: Callable[[int], set[str]] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    pay: Callable[[RoundId, TrainingBudget, str], None] | None = None,
    round_ids: Callable[[int, TrainingBudget], RoundId] | None = None,
    charges: Callable[[int], int] | None = None,
    held_out: Institution | None = None,
) -> RoundRecord:
    """Run the rounds after `start` (a committed round to resume from; None: from round 1 and the public initial
    model), calling `pay(round, budget, aggregate SHA-256)` before each sum is decrypted (the ledger) and
    `on_round` once each round is complete (commit it there). `present(round)` names the
    institutions that contribute to a round (default: all). `round_ids(number, budget)` names each round's
    attempt, and `charges(number)`, once it is paid, how many charges rounds 1..number made (attempts lost in
    crashes included; default: one a round), which the epsilon of each round's record composes. Returns the last
    round."""
    features = next(iter(data.values())).features.shape[1]
    progress = Progress.resume(settings, features=features, classes=classes, start=start)
    budget = budget_for(settings, progress.velocity.size)
    layers = NoiseLayers(
        total_variance=budget.variance,
        quorum=settings.quorum,
        institutions=len(federation.institutions),
        max_colluding=settings.max_colluding,
    )
    check_no_wrap(settings, budget, layers, rows=sum(d.targets.size for d in data.values()))
    record = start
    for number in range((start.round if start else 0) + 1, settings.rounds + 1):
        ids = sorted(present(number) if present else data)
        vectors = {i: progress.vector(settings, data[i], generators[i]) for i in ids}
        round_id = round_ids(number, budget) if round_ids else RoundId(settings.model_id, number, settings.digest())
        charge = None if pay is None else functools.partial(pay, round_id, budget)
        summed = federation.sum_round(vectors, round_id=round_id, layers=layers, generators=generators, pay=charge)
        spent = None if charges is None else charges(number)
        record = progress.step(settings, budget, number, summed, held_out, charges=spent)
        if on_round is not None:
            on_round(record)
    if record is None:
        raise ValueError("nothing to train: the run has no rounds left")
    return record

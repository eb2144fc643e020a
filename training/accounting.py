"""What a training run costs: the Skellam RDP bound (privacy/accountant.py) at sample rate 1, composed over its
rounds, with the sensitivities of one example's contribution.

One example added or removed moves its institution's vector by r(gamma g) in the d gradient slots (g clipped to
norm C, each entry randomly rounded, so each moves by less than 1 beyond gamma g) and by w in the count slot:
    L2 <= sqrt((gamma C + sqrt(d))^2 + w^2),   L1 <= sqrt(d) (gamma C + sqrt(d)) + w.
A reading is not always a whole example, though: a row built from several readings (training/feed_rows.py averages
an entity's readings over a step) is changed, not removed, when one of them is, and the change replaces r(gamma g)
by r(gamma g'), g' anywhere in the same ball, leaving the count alone:
    L2 <= 2 (gamma C + sqrt(d)),   L1 <= 2 sqrt(d) (gamma C + sqrt(d)).
A round is charged for the larger of the two (about 2x the first: w is a quarter of gamma C), unless the rows are
declared one privacy unit's each (`[[models]] unit_rows`: a unit removed removes its row). The bound holds for
every rounding draw, and the released vector is a mixture over the draws of the others'
rounding, so the mechanism's Renyi divergence is at most the worst draw's (joint quasi-convexity). The PLD
accountant of releases is not used: it assumes a per-slot shape (`coordinates` slots each moved by `shift`), and
an L2 ball is not one; the RDP bound needs only L1 and L2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accountant import NormBoundMechanism, calibrate_variance, epsilon_for
from training.gradients import count_weight


@dataclass(frozen=True)
class TrainingSensitivity:
    """What one example can move in one round's vector of `dimension` gradient slots and one count slot."""

    clip: float
    scale: float
    dimension: int
    changed_examples: bool = True  # an example may be changed, not only added or removed (rows combine units)

    @property
    def count_weight(self) -> int:
        return count_weight(self.scale, self.clip)

    @property
    def gradient_l2(self) -> float:
        return self.scale * self.clip + math.sqrt(self.dimension)

    @property
    def l2(self) -> float:
        """An example added or removed, or (`changed_examples`) the larger of that and an example changed."""
        added = math.hypot(self.gradient_l2, self.count_weight)
        return max(added, 2.0 * self.gradient_l2) if self.changed_examples else added

    @property
    def l1(self) -> float:
        root = math.sqrt(self.dimension)
        added = root * self.gradient_l2 + self.count_weight
        return max(added, 2.0 * root * self.gradient_l2) if self.changed_examples else added


@dataclass(frozen=True)
class TrainingBudget:
    """A run of `rounds` full-batch rounds, each releasing the noisy sum with total Skellam variance `variance`
    (the noise no admissible coalition knows, as for releases: privacy/noise_shares.py)."""

    sensitivity: TrainingSensitivity
    rounds: int
    variance: float
    delta: float

    @property
    def epsilon(self) -> float:
        """(epsilon, delta) of the whole run."""
        s = self.sensitivity
        return epsilon_for(variance=self.variance, l1=s.l1, l2=s.l2, delta=self.delta, releases=self.rounds)

    @property
    def mechanism(self) -> NormBoundMechanism:
        """One round, as the budget ledger charges it."""
        return NormBoundMechanism(self.variance, self.sensitivity.l1, self.sensitivity.l2)

    def epsilon_after(self, rounds: int) -> float:
        """(epsilon, delta) spent by the first `rounds` rounds (0 before any)."""
        if rounds == 0:
            return 0.0
        s = self.sensitivity
        return epsilon_for(variance=self.variance, l1=s.l1, l2=s.l2, delta=self.delta, releases=rounds)


def plan_budget(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    clip: float,
    scale: float,
    dimension: int,
    changed_examples: bool = True,
) -> TrainingBudget:
    """The smallest total variance (to 0.1%) whose run of `rounds` rounds stays within (epsilon, delta);
    `changed_examples` False: each row is one privacy unit's (`TrainingSensitivity`)."""
    if rounds < 1:
        raise ValueError(f"a training run needs at least one round, got {rounds}")
    sensitivity = TrainingSensitivity(clip=clip, scale=scale, dimension=dimension, changed_examples=changed_examples)
    variance = calibrate_variance(epsilon=epsilon, delta=delta, l1=sensitivity.l1, l2=sensitivity.l2, releases=rounds)
    return TrainingBudget(sensitivity=sensitivity, rounds=rounds, variance=variance, delta=delta)

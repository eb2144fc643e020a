"""Models trained across the institutions as DP full-batch gradient descent, each round one more secure vector sum
(docs/training.md). torch is imported only when gradients are computed or a model is built.

- `train_into_store`, `last_committed`, `forecast` (training.run): `fusion train` against the store: the budget
  ledger charged before each sum is decrypted, each round committed to the `models` table, resume
- `train`, `Institution`, `RoundRecord`, `RoundSummer` (training.trainer): the rounds, in memory
- `TrainingSettings` (training.charging): a run's settings, which with its ledger terms and round charge
  (`settings_for`, `terms_for`, `round_charge`) follow from the config alone
- `plan_budget`, `TrainingBudget`, `TrainingSensitivity` (training.accounting): calibration and epsilon (RDP)
- `secure_sum`, `Federation`, `RoundId` (training.secure_sum): one round's noised, masked, encrypted, signed sum
- the module `training.exchange_round` (imported on use: it loads Beam): a round through the releases' roles,
  `ExchangeFederation`, and each party's step (`seal_contribution`, `aggregate`, `answer`, `decrypt`)
- the module `training.recomputed_round`: the key holder's recomputation of a round's aggregate from the exchange
  (the releases' own, pipelines/aggregate_envelope.py), refused and audited before the charge when it differs
- the module `training.attempts`: which attempt a round runs under (one lost after its charge is resumed where it
  can still be completed) and how many charges a run's rounds made, which its epsilon composes
- the module `training.kept_updates`: an institution's noisy update per round, kept so that its noise for a round
  is drawn once whatever attempt the round runs under, with the round's charge: no round is drawn past the period's
  cap by the institution's own records
- the module `training.run_lock`: a `fusion train` run's hold on its model (one run of a model at a time) and its
  claim on its period's budget, which the other runs in progress count before each of their rounds
- the module `training.feed_rows`: a model's rows from an institution's own feeds (`feed_rows`)
- the module `training.gradients`: per-example gradients, clipping, randomised rounding, the contribution vector
"""

from __future__ import annotations

from training.accounting import TrainingBudget, TrainingSensitivity, plan_budget
from training.charging import TrainingSettings
from training.run import forecast, last_committed, train_into_store
from training.secure_sum import Federation, RoundId, secure_sum
from training.trainer import Institution, RoundRecord, RoundSummer, train

__all__ = [
    "Federation",
    "Institution",
    "RoundId",
    "RoundRecord",
    "RoundSummer",
    "TrainingBudget",
    "TrainingSensitivity",
    "TrainingSettings",
    "forecast",
    "last_committed",
    "plan_budget",
    "secure_sum",
    "train",
    "train_into_store",
]

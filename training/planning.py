"""What `fusion plan` shows of the config's `[[models]]` before any of them trains: each run's epsilon and what its
remaining rounds would take its privacy period to, on the ledger as it stands (nothing is spent). No torch: the
parameter count is arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fusion.config.federation import Config
from fusion.config.training import ModelConfig, parameter_count
from fusion.store.delta import Store
from training.charging import budget_for, feature_width, settings_for, terms_for
from training.run import TrainingForecast, forecast_run
from training.secure_sum import RoundId


@dataclass(frozen=True)
class _Exchange:
    """The federation's exchange, asked whether a round lost after its charge can be resumed; its module (which
    loads Beam) is imported only for such a round."""

    config: Config
    start: datetime
    end: datetime

    def can_resume(self, round_id: RoundId, *, slots: int, variance: float, charged_for: str) -> bool:
        from training.exchange_round import ExchangeFederation

        federation = ExchangeFederation(self.config, self.start, self.end)
        return federation.can_resume(round_id, slots=slots, variance=variance, charged_for=charged_for)


def model_forecast(config: Config, store: Store, model: ModelConfig) -> tuple[TrainingForecast, int, str]:
    """(the forecast of the model's remaining rounds, rounds left, its period's name)."""
    settings, terms = settings_for(config, model), terms_for(config, model)
    dimension = parameter_count(feature_width(config, model), model.class_count, model.hidden)
    budget = budget_for(settings, dimension)
    from pipelines.release import charge_record  # here: `fusion plan` reads this module without the pipelines

    exchange = _Exchange(config, terms.start, terms.end)
    predicted = forecast_run(store, settings, budget, terms, exchange, record=charge_record(config, store))
    return predicted, predicted.remaining, terms.period.name


def model_plan_lines(config: Config) -> list[str]:
    """One line per `[[models]]` entry for `fusion plan`."""
    store = Store(config.store_path)
    lines = []
    for model in config.models:
        predicted, remaining, period = model_forecast(config, store, model)
        verdict = "fits" if predicted.fits else "would pass the cap: `fusion train` refuses it"
        lost = f" (counting {predicted.lost} lost attempt(s) charged again)" if predicted.lost else ""
        lines.append(
            f"  model {model.name}: {predicted.parameters:,} parameters, {predicted.rounds} rounds ({remaining} left), "
            f"run epsilon {predicted.run_epsilon:.4f}{lost}; period {period}: epsilon "
            f"{predicted.period_epsilon_before:.4f} -> {predicted.period_epsilon_after:.4f} of cap {predicted.cap:g} "
            f"({verdict})"
        )
    return lines

"""`fusion train`: train one of the config's `[[models]]` across the institutions (training/), or with --plan show
what the run would spend first, or with --role run one party's step of the current round (training/roles.py).
A run holds its model, and claims its remaining rounds' charges on its period, until it ends (training/run_lock.py):
a second run of the model is refused meanwhile, and a run of another model counts the claim. torch loads only here,
when the command runs."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

from fusion.cli.output import console
from fusion.config.federation import load_config
from fusion.errors import FusionError

if TYPE_CHECKING:
    from fusion.config.federation import Config
    from fusion.config.training import ModelConfig
    from fusion.store.charge_record import ChargeRecord
    from fusion.store.delta import Store
    from training.charging import LedgerTerms, TrainingSettings
    from training.exchange_round import ExchangeFederation
    from training.run import TrainingForecast
    from training.run_lock import RunLock
    from training.trainer import Institution, RoundRecord


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser(
        "train",
        help="train a [[models]] model across institutions: DP gradient descent, "
        "each round one encrypted vector sum charged to the budget ledger",
    )
    train.add_argument("--config", required=True, help="federation config (TOML)")
    train.add_argument("--model", required=True, help="the [[models]] entry's name")
    train.add_argument(
        "--plan", action="store_true", help="show the run's epsilon and its period's spend; train nothing"
    )
    train.add_argument(
        "--role",
        choices=["institution", "aggregator", "key-holder"],
        default=None,
        help="run one party's step of the current round only, with that party's keys (default: every step of "
        "every round, on this machine)",
    )
    train.add_argument("--institution", default=None, help="with --role institution: which institution")
    train.add_argument(
        "--unmask", action="store_true", help="with --role institution: acknowledge and answer the round's roster"
    )


def _model(args: argparse.Namespace) -> tuple[Config, ModelConfig]:
    """The config and its `[[models]]` entry named by --model, checked."""
    config = load_config(args.config)
    names = [m.name for m in config.models]
    if len(set(names)) != len(names):
        raise FusionError(f"models: two [[models]] entries share a name in {args.config}; give each its own")
    models = {m.name: m for m in config.models}
    if args.model not in models:
        raise FusionError(
            f"--model: no [[models]] entry named '{args.model}' in {args.config} (declared: {sorted(models) or 'none'})"
        )
    if not config.privacy.noise:
        raise FusionError("privacy.noise: training needs noise (a model trained without it protects nothing)")
    return config, models[args.model]


def _cmd_role(args: argparse.Namespace) -> int:
    """One party's step of the model's current round (training/roles.py)."""
    from fusion.store.delta import Store
    from training.roles import Role, run_role

    config, model = _model(args)
    store = Store(config.store_path)
    done = run_role(config, model, store, Role(args.role), institution=args.institution, unmask=args.unmask)
    console.print(done, highlight=False)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.role is not None:
        return _cmd_role(args)
    from fusion.store.delta import Store
    from pipelines.release import charge_record
    from training.charging import budget_for, settings_for, terms_for
    from training.exchange_round import ExchangeFederation
    from training.feed_rows import check_feed_model, feature_count, feed_rows
    from training.run import check_fits, forecast_run, institution_rows
    from training.run_lock import run_lock
    from training.trainer import build_model, flat_parameters

    config, model = _model(args)
    store = Store(config.store_path)
    settings, terms = settings_for(config, model), terms_for(config, model)
    if model.rows is None:
        # Each institution's rows from its own feeds; one whose feeds lack a metric of the model takes no part
        # (absent from every round, as from a release it has no data for).
        check_feed_model(config, model)
        read = {i.id: feed_rows(config, model, i) for i in config.institutions}
        built = {i: feed.rows for i, feed in read.items()}
        data = {i: rows for i, rows in built.items() if rows.targets.size}
        width = feature_count(config, model)
        console.print(
            f"model {model.name}: rows from the feeds: "
            + ", ".join(f"{i} {rows.targets.size}" for i, rows in built.items()),
            highlight=False,
        )
        for line in (line for i, feed in read.items() for line in feed.report(i)):  # damaged files, skipped
            console.print(line, highlight=False)
        if len(data) < config.privacy.quorum:
            raise FusionError(
                f"model {model.name}: {len(data)} institution(s) hold the metrics "
                f"{sorted({*model.features, model.target})}; a round needs the quorum "
                f"{config.privacy.quorum}"
            )
    else:
        rows_path = model.rows
        built = {
            i.id: institution_rows(model, config.base / rows_path.format(institution=i.id), f"institution {i.id}")
            for i in config.institutions
        }
        # An institution whose table holds no rows takes no part (absent from every round, as in feed mode).
        data = {i: rows for i, rows in built.items() if rows.targets.size}
        if len(data) < config.privacy.quorum:
            empty = sorted(set(built) - set(data))
            raise FusionError(
                f"model {model.name}: {len(data)} institution(s) hold rows ({', '.join(empty)} hold none); a round "
                f"needs the quorum {config.privacy.quorum}"
            )
        width = len(model.features)
    held_out = None if model.held_out is None else institution_rows(model, config.base / model.held_out, "held_out")
    dimension = flat_parameters(build_model(width, model.class_count, model.hidden, 0)).size
    budget = budget_for(settings, dimension)
    # Each round through the releases' roles (training/exchange_round.py): every institution seals in the exchange
    # with its own keys, the aggregator sums and unmasks, the key holder decrypts once the ledger is charged.
    federation = ExchangeFederation(config, terms.start, terms.end, store, terms.charge(budget), settings.rounds)
    record = charge_record(config, store)  # the key holder's own record: rounds share the releases' cap
    runs = run_lock(record, settings.model_id)
    with nullcontext() if args.plan else runs:  # one run of a model at a time: a second is refused
        # The run's remaining rounds against the ledger and the other runs in progress, then claimed at once.
        with runs.claiming(terms.period, terms.charge(budget)) as claimed:
            predicted = forecast_run(store, settings, budget, terms, federation, record=record, claimed=claimed)
            _print_forecast(model.name, dimension, settings.delta, predicted, terms.period.name)
            check_fits(model.name, predicted, terms)
            if not args.plan:
                runs.claim(terms.period, terms.charge(budget), predicted.to_charge)
        if args.plan or predicted.remaining == 0:
            return 0
        _train(config, store, model, settings, terms, federation, data, held_out, record, runs)
    return 0


def _print_forecast(name: str, dimension: int, delta: float, predicted: TrainingForecast, period: str) -> None:
    lost = f" (counting {predicted.lost} lost attempt(s) charged again)" if predicted.lost else ""
    claimed = (
        f", counting {predicted.claimed} round charge(s) other runs in progress claim" if predicted.claimed else ""
    )
    console.print(
        f"model {name}: {dimension:,} parameters, {predicted.rounds} rounds ({predicted.remaining} left), run epsilon "
        f"{predicted.run_epsilon:.4f}{lost} at delta {delta:g}; period {period}: epsilon "
        f"{predicted.period_epsilon_before:.4f} -> {predicted.period_epsilon_after:.4f}{claimed} of cap "
        f"{predicted.cap:g}",
        highlight=False,
    )


def _train(
    config: Config,
    store: Store,
    model: ModelConfig,
    settings: TrainingSettings,
    terms: LedgerTerms,
    federation: ExchangeFederation,
    data: Mapping[str, Institution],
    held_out: Institution | None,
    record: ChargeRecord,
    runs: RunLock,
) -> None:
    """Every round left of the run, on this machine, each party's step in turn (training/run.py)."""
    from pipelines.release import registered_signing_key
    from privacy.skellam import secure_generator, seeded_generator
    from training.run import train_into_store

    signing_key = registered_signing_key(config)  # before any round is charged: every round is signed
    seed = config.privacy.seed
    generators = {
        i.id: secure_generator() if seed is None else seeded_generator(seed ^ (k + 1) * 0x9E3779B1)
        for k, i in enumerate(config.institutions)
    }

    def progress(committed: RoundRecord) -> None:
        accuracy = f", held-out accuracy {committed.metrics['accuracy']:.3f}" if committed.metrics else ""
        console.print(
            f"round {committed.round}/{settings.rounds}: {len(committed.sum.contributors)} contributors, epsilon "
            f"{committed.epsilon:.4f}{accuracy}",
            highlight=False,
        )

    train_into_store(
        store,
        settings,
        federation,
        data,
        classes=model.class_count,
        terms=terms,
        generators=generators,
        held_out=held_out,
        progress=progress,
        record=record,
        signing_key=signing_key,
        runs=runs,
    )

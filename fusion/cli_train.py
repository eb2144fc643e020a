"""`fusion train`: train one of the config's `[[models]]` across the institutions (training/), or with --plan show
what the run would spend first. torch loads only here, when the command runs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fusion.cli import console
from fusion.config import load_config
from fusion.errors import FusionError

if TYPE_CHECKING:
    from training.trainer import RoundRecord


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser("train", help="train a [[models]] model across institutions: DP gradient descent, "
                                         "each round one encrypted vector sum charged to the budget ledger")
    train.add_argument("--config", required=True, help="federation config (TOML)")
    train.add_argument("--model", required=True, help="the [[models]] entry's name")
    train.add_argument("--plan", action="store_true", help="show the run's epsilon and its period's spend; train "
                                                           "nothing")


def cmd_train(args: argparse.Namespace) -> int:
    from fusion.store import Store
    from privacy.skellam import secure_generator, seeded_generator
    from training.run import (
        federation_from_config,
        forecast,
        institution_rows,
        last_committed,
        settings_for,
        terms_for,
        train_into_store,
    )
    from training.trainer import budget_for, build_model, flat_parameters

    config = load_config(args.config)
    names = [m.name for m in config.models]
    if len(set(names)) != len(names):
        raise FusionError(f"models: two [[models]] entries share a name in {args.config}; give each its own")
    models = {m.name: m for m in config.models}
    if args.model not in models:
        raise FusionError(f"--model: no [[models]] entry named '{args.model}' in {args.config} "
                          f"(declared: {sorted(models) or 'none'})")
    if not config.privacy.noise:
        raise FusionError("privacy.noise: training needs noise (a model trained without it protects nothing)")
    model = models[args.model]
    store = Store(config.store_path)
    data = {
        i.id: institution_rows(model, config.base / model.rows.format(institution=i.id), f"institution {i.id}")
        for i in config.institutions
    }
    held_out = None if model.held_out is None else institution_rows(model, config.base / model.held_out, "held_out")
    settings, terms = settings_for(config, model), terms_for(config, model)
    dimension = flat_parameters(build_model(len(model.features), model.classes, model.hidden, 0)).size
    budget = budget_for(settings, dimension)
    done = last_committed(store, settings)
    remaining = settings.rounds - (done.round if done else 0)
    predicted = forecast(store, budget, terms, remaining=remaining)
    console.print(
        f"model {model.name}: {dimension:,} parameters, {settings.rounds} rounds ({remaining} left), run epsilon "
        f"{predicted.run_epsilon:.4f} at delta {settings.delta:g}; period {terms.period.name}: epsilon "
        f"{predicted.period_epsilon_before:.4f} -> {predicted.period_epsilon_after:.4f} of cap {predicted.cap:g}",
        highlight=False,
    )
    if not predicted.fits:
        raise FusionError(
            f"model {model.name} would take period {terms.period.name} to epsilon "
            f"{predicted.period_epsilon_after:.4f}, above its cap {predicted.cap:g}: lower the model's epsilon or "
            "train on another period's readings"
        )
    if args.plan or remaining == 0:
        return 0
    seed = config.privacy.seed
    generators = {
        i.id: secure_generator() if seed is None else seeded_generator(seed ^ (k + 1) * 0x9E3779B1)
        for k, i in enumerate(config.institutions)
    }

    def progress(record: RoundRecord) -> None:
        accuracy = f", held-out accuracy {record.metrics['accuracy']:.3f}" if record.metrics else ""
        console.print(
            f"round {record.round}/{settings.rounds}: {len(record.sum.contributors)} contributors, epsilon "
            f"{record.epsilon:.4f}{accuracy}",
            highlight=False,
        )

    train_into_store(store, settings, federation_from_config(config), data, classes=model.classes, terms=terms,
                     generators=generators, held_out=held_out, progress=progress)
    return 0

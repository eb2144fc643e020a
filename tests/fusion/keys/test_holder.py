"""The key holder's HE keys: created once, their public context authenticated through the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fusion.errors import FusionError
from fusion.keys.holder import create_keys, register_published_context, secret_key_file
from fusion.release.exchange import contribution_path, exists, public_context_path, read_bytes
from fusion.release.plan import plan_release
from pipelines.run import run_aggregate, run_contributions
from privacy import he
from tests.conftest import END, START


def test_keys_published_once_are_not_re_created_when_the_secret_key_is_missing(make_federation) -> None:
    """Following "the HE secret key is missing" by running `fusion keys` used to publish new keys over the old ones:
    every interval sealed under them was lost for good. The secret key is to be restored instead."""
    fed = make_federation()
    public_path = public_context_path(fed.config.exchange_path)
    published = read_bytes(public_path)
    secret_key_file(fed.config).rename(fed.directory / "elsewhere.ctx")
    with pytest.raises(FusionError, match="restore the secret key instead"):
        create_keys(fed.config)
    assert read_bytes(public_path) == published and not secret_key_file(fed.config).exists()
    create_keys(fed.config, overwrite=True)  # lost for good: replaced on purpose
    assert read_bytes(public_path) != published


def _swap_public_context(config) -> bytes:
    """Someone who can write the exchange publishes a context of their own; returns its secret half."""
    secret, public = he.generate_keys()
    Path(public_context_path(config.exchange_path)).write_bytes(public)
    return secret


def test_no_institution_seals_under_a_public_context_swapped_into_the_exchange(make_federation) -> None:
    fed = make_federation()
    plan = plan_release(fed.config, START, END)
    _swap_public_context(fed.config)
    with pytest.raises(FusionError, match="not the one the key holder registered"):
        run_contributions(plan, fed.config.institutions)
    assert not any(exists(contribution_path(fed.config.exchange_path, plan.key, i.id)) for i in fed.config.institutions)


def test_the_aggregator_sums_nothing_under_a_public_context_swapped_into_the_exchange(make_federation) -> None:
    fed = make_federation()
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    _swap_public_context(fed.config)
    with pytest.raises(FusionError, match="not the one the key holder registered"):
        run_aggregate(plan, in_process=True)


def test_a_registry_without_the_context_digest_is_refused_until_the_key_holder_registers_it(make_federation) -> None:
    fed = make_federation()
    registry = Path(fed.config.registry_path)
    registry.write_text(re.sub(r"(?m)^he_context_sha256 = .*\n", "", registry.read_text()))
    plan = plan_release(fed.config, START, END)
    with pytest.raises(FusionError, match="fusion keys --register-context"):
        run_contributions(plan, fed.config.institutions)
    register_published_context(fed.config)
    run_contributions(plan, fed.config.institutions)
    assert all(exists(contribution_path(fed.config.exchange_path, plan.key, i.id)) for i in fed.config.institutions)


def test_the_key_holder_registers_only_the_context_it_published(make_federation) -> None:
    fed = make_federation()
    _swap_public_context(fed.config)
    with pytest.raises(FusionError, match="is not the one this key holder published"):
        register_published_context(fed.config)

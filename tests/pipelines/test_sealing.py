"""An institution's records of the intervals it sealed are secrets, read like its keys."""

from __future__ import annotations

import pytest

from fusion.errors import FusionError
from fusion.release.plan import plan_release
from pipelines.run import run_contributions
from pipelines.sealing import forget_layer_seed, sealed_envelope, sealed_layer_seed
from tests.conftest import END, START


def test_a_sealed_record_others_can_read_is_refused_like_a_key(make_federation) -> None:
    """The record holds the seed that regenerates the institution's removable noise layers: every read of it
    refuses a file group or others can access, as the docs promise of every secret file."""
    fed = make_federation(noise=True, seed=None)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    alpha = fed.config.institution("alpha")
    assert sealed_layer_seed(plan, alpha) is not None
    record = fed.directory / "institution-keys" / "alpha" / "sealed" / f"{plan.key.interval_name}.json"
    record.chmod(0o644)
    for read in (sealed_layer_seed, sealed_envelope, forget_layer_seed):
        with pytest.raises(FusionError, match="chmod 600"):
            read(plan, alpha)
    record.chmod(0o600)
    assert sealed_envelope(plan, alpha) is not None

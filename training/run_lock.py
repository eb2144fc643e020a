"""A `fusion train` run's hold on its model and on its period's budget, kept in `training-runs/` of the key holder's
key directory, beside its own record of what it charged (fusion/store/charge_record.py).

One run of a model at a time: two runs of one model would each seal, close and commit the same rounds over the
other's (a roster closed twice, a `models` row one run computed signed by the other's audit row). A run holds an
exclusive lock on its model in its store (`flock` of `<id>.lock`) until it ends, and a second run of the model, or a
key holder's step of it (`fusion train --role key-holder`), is refused while it does.

One period's budget among the runs in progress: two runs of different models over one period's readings could each
find that their remaining rounds fit its cap, then spend rounds that together pass it, and the ledger would refuse
the later rounds of one of them, whose earlier rounds bought no finished model. So while a run holds its model, it
claims the charges its remaining rounds will make (`<id>.json` beside its lock), and every run checks its own
remaining rounds against the ledger and the other runs' claims, and claims them, under one lock over the claims
(`.lock`): at its start, before each round is drawn, and again with each round's charge, which is made under that
lock. A claim is counted only while its run holds its model's lock: a run that crashed leaves none. What a claim
does not hold back is a release: releases are charged without looking at the claims, so a release of the period
charged while a run is in progress can still leave that run's later rounds without room, and the run then stops
before it draws or charges the next round (not after). A key holder's step of another model (`--role key-holder`)
counts the claims, but holds none between its steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from fusion.errors import FusionError
from fusion.release.plan import Period
from fusion.runtime.locks import take_exclusive
from fusion.store.charge_record import ChargeRecord
from pipelines.sealing import charge_doc, kept_charge
from privacy.accountant import ReleaseCharge

#: The directory of the runs' locks and claims, in the key holder's key directory.
RUNS_DIR = "training-runs"


class RunLock:
    """The exclusive lock of model `model_id`'s runs on one store (`store_id`), in `directory`, and the run's claim on
    its period's budget while it holds it. A context manager: entered, it holds the lock or refuses."""

    def __init__(self, directory: Path, store_id: str, model_id: str) -> None:
        self.directory = directory
        self.store_id = store_id
        self.model_id = model_id
        name = hashlib.sha256(f"{store_id}/{model_id}".encode()).hexdigest()[:32]
        self.lock_path = directory / f"{name}.lock"
        self.claim_path = directory / f"{name}.json"
        self._descriptor: int | None = None

    def __enter__(self) -> RunLock:
        with self._claims_lock():
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            holder = take_exclusive(descriptor)
            if holder is not None:
                raise FusionError(
                    f"model {self.model_id} is being trained by another process ({holder}) on this store: two runs of "
                    "one model would seal, close and commit the same rounds over each other. Wait for that run to "
                    "end (or stop it), then run again: a run resumes from its last committed round"
                )
            self.claim_path.unlink(missing_ok=True)  # a crashed run's claim: this run claims anew
            self._descriptor = descriptor
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._descriptor is None:
            return
        with self._claims_lock():
            self.claim_path.unlink(missing_ok=True)
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None

    @contextlib.contextmanager
    def claiming(self, period: Period, composition_of: ReleaseCharge) -> Iterator[list[ReleaseCharge]]:
        """Under the lock over the claims: the charges the other runs in progress claim on `period` (composed as
        `composition_of`, a charge of this run: a period composes all its charges one way). Check this run's remaining
        rounds against them and the ledger, charge a round, and `claim` what is left, before leaving."""
        with self._claims_lock():
            yield claimed_charges(self.directory, self.store_id, period, composition_of, besides=self.claim_path)

    def claim(self, period: Period, charge: ReleaseCharge, rounds: int) -> None:
        """Claim `rounds` charges of `charge` on `period`: what this run's remaining rounds will charge (within
        `claiming`, holding the model's lock)."""
        if self._descriptor is None:
            raise FusionError(f"model {self.model_id}: a run claims its period's budget only while it holds its model")
        doc = {"store": self.store_id, "model": self.model_id, "period": period.name, "rounds": rounds}
        pending = self.claim_path.with_name(f".{self.claim_path.name}.{os.getpid()}")
        pending.write_text(json.dumps(doc | {"charge": charge_doc(charge)}))
        os.replace(pending, self.claim_path)

    @contextlib.contextmanager
    def _claims_lock(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _exclusive(self.directory / ".lock"):
            yield


def run_lock(record: ChargeRecord, model_id: str) -> RunLock:
    """The lock of model `model_id`'s runs on the store of the key holder's `record`, kept beside it."""
    return RunLock(record.directory.parent / RUNS_DIR, record.store_id, model_id)


def claimed_charges(
    directory: Path, store_id: str, period: Period, composition_of: ReleaseCharge, *, besides: Path | None = None
) -> list[ReleaseCharge]:
    """The charges the runs in progress on `store_id` claim on `period` (the claim file `besides` left out: the
    asking run's own). A claim whose run no longer holds its model's lock (it crashed) is removed, not counted: call
    under the lock over the claims, so that no run takes or leaves its lock meanwhile."""
    charges: list[ReleaseCharge] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if path == besides:
            continue
        if not _held(path.with_suffix(".lock")):
            path.unlink(missing_ok=True)
            continue
        try:
            doc = json.loads(path.read_text())
            if doc["store"] != store_id or doc["period"] != period.name:
                continue
            charge = replace(kept_charge(doc["charge"]), composition=composition_of.composition)
            rounds = int(doc["rounds"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise FusionError(
                f"the claim {path} of a training run in progress is unreadable; stop that run, or remove the file "
                "if no run is in progress"
            ) from None
        charges += [charge] * rounds
    return charges


def _held(lock: Path) -> bool:
    """Whether a process holds the lock file `lock` (an exclusive lock on it is refused now)."""
    try:
        descriptor = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # releases the probe's lock, if it took one
    return False


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock

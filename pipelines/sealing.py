"""An institution's sealing records: the envelope it sealed for an interval (kept, so a rerun sends the same one
and no party ever sees two noisy versions of an interval), the refusal of an interval that overlaps one already
sealed, the refusal of an interval that would take its privacy period past the epsilon cap (by the institution's own
records of what each interval it sealed and each training round it drew costs: training/kept_updates.py holds the
cap for rounds by the same records), and its noise drawn as layers, with the seed of the removable layer kept until
the unmask round has used it (privacy/noise_shares.py)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fusion.config.federation import Config, InstitutionConfig
from fusion.errors import FusionError, InternalError, ReleaseRefused
from fusion.keys.registry import read_private, write_private
from fusion.release.exchange import ReleaseKey
from fusion.release.plan import Period, ReleasePlan, plan_release
from fusion.store.ledger import BudgetExceeded
from privacy.accountant import Composition, NormBoundMechanism, ReleaseCharge, period_loss
from privacy.noise_shares import SEED_BYTES, chain_seeds, layer_commitment, layer_noise, noise_digest
from privacy.pld import SkellamMechanism
from privacy.skellam import SkellamNoise, secure_generator, seeded_generator
from training.charging import recorded_round_charge


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: Kept envelopes older than this are pruned (their records, a few bytes each, are kept forever).
KEEP_SEALED = timedelta(days=7)


def _sealed_dir(config: Config, institution: InstitutionConfig) -> Path:
    return Path(config.institution_keys_path(institution)) / "sealed"


def contributions_lock(config: Config, institution: InstitutionConfig) -> AbstractContextManager[None]:
    """An exclusive lock on the institution's records of what it contributed (its seal records, and its training
    rounds' records): a contribution is checked against its period's cap and recorded under it, so two
    contributions racing to seal cannot both pass the cap."""
    return _sealing_lock(_sealed_dir(config, institution))


def _read_record(record: Path, institution: InstitutionConfig) -> dict[str, Any]:
    """An institution's record of an interval it sealed: a secret like its keys (it may hold the seed that
    regenerates its removable noise layers), so one that group or others can read is refused."""
    doc: dict[str, Any] = json.loads(read_private(record, f"institution {institution.id}'s record of {record.stem}"))
    return doc


def sealed_envelope(plan: ReleasePlan, institution: InstitutionConfig) -> bytes | None:
    """The envelope this institution already sealed for the plan's interval (None if it has not sealed one).

    An institution seals one envelope per interval, ever: a record of it stays in its key directory (owner-only),
    and the envelope itself is kept for `KEEP_SEALED`. Whoever deletes it from the exchange gets the same bytes
    re-published, never a second draw of noise (averaging several would wear the noise away); a second release
    of the same interval under other parameters is refused, and so is sealing again once the copy is pruned.
    """
    record = _sealed_dir(plan.config, institution) / f"{plan.key.interval_name}.json"
    if not record.exists():
        refuse_overlap(plan, institution)
        refuse_past_cap(plan, institution)
        return None
    doc = _read_record(record, institution)
    if doc["release_id"] != plan.key.release_id:
        raise FusionError(
            f"institution {institution.id} already contributed to {plan.key.interval_name} as release "
            f"{doc['release_id']}; it does not contribute to the same interval again as {plan.key.release_id} "
            "(other parameters): repeated contributions of the same readings would let their noise be averaged away"
        )
    kept = record.parent / doc["envelope"]
    if not kept.exists():
        raise FusionError(
            f"institution {institution.id} sealed {plan.key.interval_name} before and its kept copy has been pruned "
            f"(after {KEEP_SEALED.days} days); it does not seal the interval again"
        )
    return read_private(kept, f"institution {institution.id}'s sealed envelope")


def refuse_overlap(plan: ReleasePlan, institution: InstitutionConfig) -> None:
    """Refuse to seal the plan's interval if the institution sealed another interval that overlaps it: each of
    its readings is noised once, ever. (Releases of [00:00, 01:00) and [00:00, 02:00) would each draw fresh
    noise on the first hour's readings; whoever decrypts both, the ledger's charges notwithstanding, could
    average the draws.) A federation releases one grid of intervals: a schedule's, or the stream's windows.
    The refusal is final (ReleaseRefused): the scheduler records it as skipped, the stream as a refused window."""
    directory = _sealed_dir(plan.config, institution)
    if not directory.is_dir():
        return
    own = plan.key.interval_name
    for record in directory.glob("*.json"):
        span = _interval_span(record.stem)
        if record.stem == own or span is None:
            continue
        start, end = span
        if start < plan.key.end and plan.key.start < end:
            raise ReleaseRefused(
                f"institution {institution.id} already sealed {record.stem}, which overlaps {own}: it does not "
                "noise the same readings twice (the draws could be averaged); release intervals on one grid "
                "(one schedule interval or the stream's window), or cover the overlap with the release made"
            )


def refuse_past_cap(plan: ReleasePlan, institution: InstitutionConfig) -> None:
    """Refuse to seal the plan's interval if it would take its privacy period past the epsilon cap, counting every
    other interval this institution sealed in the period and every training round it drew there: their charges,
    as its records keep them (`round_charges`: a round record that keeps none, as a round of its model under the
    config), compose with the plan's exactly as the key holder's ledger composes the period
    (privacy.accountant.period_loss). The ledger alone could not hold the cap against a coalition that includes
    the key holder, which would decrypt further intervals of the period without charging them; each institution
    holds it for its own readings. An interval sealed and never released counts too (its envelope has left the
    institution), and re-sealing the plan's own interval (the kept envelope, re-published) is not a new charge.
    At event level only the training rounds of the period need counting (a round's readings span the model's
    interval, which overlaps the releases'): disjoint intervals compose in parallel, and overlapping ones are
    refused."""
    own = plan.params.charge(plan.key.start, plan.key.end)
    if own.mechanism is None:
        return
    rounds = round_charges(plan.config, institution, plan.period, refusing=plan.key.interval_name)
    if own.composition is not Composition.SEQUENTIAL and not rounds:
        return
    sealed = sealed_charges(plan.config, institution, plan.period, besides=plan.key.interval_name)
    cap = plan.config.privacy.cap
    if past := past_cap([*sealed, *rounds], own, cap=cap, delta=plan.params.delta):
        before, after = past
        raise BudgetExceeded(
            f"institution {institution.id} does not seal {plan.key.interval_name}: release {plan.key.release_id} "
            f"needs epsilon {after - before:.4f} in period {plan.period.name}, which would reach {after:.4f} with "
            f"the {len(sealed)} interval(s) it sealed and the {len(rounds)} training round(s) it drew in the "
            f"period; the cap is {cap:.4f} and {max(cap - before, 0.0):.4f} is left (the period's releases and "
            f"rounds compose {'in sequence' if own.composition is Composition.SEQUENTIAL else 'where they overlap'})"
        )


def past_cap(
    earlier: list[ReleaseCharge], own: ReleaseCharge, *, cap: float, delta: float, times: int = 1
) -> tuple[float, float] | None:
    """(the period's epsilon before, after) where `own`, charged `times` times (a training run's rounds left to
    draw), would take the period holding the `earlier` charges past `cap`, composed as the key holder's ledger
    composes it (privacy.accountant.period_loss, `own`'s composition); None where it fits. An institution's checks
    of its seals and of its training rounds both ask this."""
    after = period_loss([*earlier, *[own] * times], composition=own.composition, delta=delta).epsilon
    if after <= cap:
        return None
    return period_loss(earlier, composition=own.composition, delta=delta).epsilon, after


def sealed_charges(
    config: Config, institution: InstitutionConfig, period: Period, *, besides: str | None = None
) -> list[ReleaseCharge]:
    """What the intervals the institution sealed in `period` (or reaching into it) cost it, as its seal records
    keep their charges (the interval named `besides` left out: the one being sealed again)."""
    directory = _sealed_dir(config, institution)
    sealed: list[ReleaseCharge] = []
    if directory.is_dir():
        for record in sorted(directory.glob("*.json")):
            span = _interval_span(record.stem)
            if record.stem == besides or span is None:
                continue
            if span[0] < period.end and period.start < span[1]:
                sealed.append(_sealed_charge(config, institution, record, span, period))
    return sealed


#: An institution's record of a training round it drew noise for, `<round key>.json` (training/kept_updates.py; the
#: record of the roster it answered for the round is another file beside it).
_ROUND_RECORD = re.compile(r"t-[0-9a-f]{24}")


def round_records_dir(config: Config, institution: InstitutionConfig) -> Path:
    """Where the institution keeps its training rounds' records and noisy updates (training/kept_updates.py)."""
    return Path(config.institution_keys_path(institution)) / "training" / "rounds"


def round_records(config: Config, institution: InstitutionConfig) -> list[tuple[str, dict[str, Any]]]:
    """(the round's key, its record) for every training round the institution drew noise for."""
    directory = round_records_dir(config, institution)
    found = []
    for record in sorted(directory.glob("t-*.json")) if directory.is_dir() else []:
        if not _ROUND_RECORD.fullmatch(record.stem):
            continue
        what = f"institution {institution.id}'s record of round {record.stem}"
        try:
            doc = json.loads(read_private(record, what))
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise FusionError(f"{what} ({record}) is unreadable; restore it from a backup of the key directory")
        found.append((record.stem, doc))
    return found


def round_charges(
    config: Config,
    institution: InstitutionConfig,
    period: Period,
    *,
    refusing: str | None = None,
    besides: str | None = None,
    drawing: tuple[str, str, ReleaseCharge] | None = None,
) -> list[ReleaseCharge]:
    """What the training rounds the institution drew in `period` (or reaching into it) cost it, as their records
    keep it (the round keyed `besides` left out: the one being drawn), for the checks of its releases and of its
    rounds alike (training/kept_updates.py). A record from before round records kept their charge names its model
    and the digest of its settings, not its charge nor its interval: it is charged as a round of that model under
    those settings, the run being drawn (`drawing`: its model, settings digest and charge) or a model of the config
    (training/charging.py `recorded_round_charge`), in the period of the model's interval. A record of a model the
    config no longer names under those settings bounds nothing, in no period it can tell: the contribution
    (`refusing`, as a refusal names it; by default anything of the period) is refused rather than its period
    under-counted."""
    refusing = refusing or f"anything of period {period.name}"
    charges = []
    for key, doc in round_records(config, institution):
        if key == besides:
            continue
        if doc.get("charge") is None:
            charge = _uncharged_round(config, institution, key, doc, refusing=refusing, drawing=drawing)
        else:
            try:
                charge = kept_charge(doc["charge"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise FusionError(f"institution {institution.id}'s record of round {key} is unreadable") from None
        if charge.start < period.end and period.start < charge.end:
            charges.append(charge)
    return charges


def _uncharged_round(
    config: Config,
    institution: InstitutionConfig,
    key: str,
    doc: dict[str, Any],
    *,
    refusing: str,
    drawing: tuple[str, str, ReleaseCharge] | None,
) -> ReleaseCharge:
    """The charge of round record `key` (`doc`), which keeps none: it names its model, round and settings digest."""
    try:
        model, number, settings = str(doc["model"]), int(doc["round"]), str(doc["settings_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FusionError(f"institution {institution.id}'s record of round {key} is unreadable") from None
    if drawing is not None and (model, settings) == drawing[:2]:
        return drawing[2]
    charge = recorded_round_charge(config, model, settings)
    if charge is None:
        raise BudgetExceeded(
            f"institution {institution.id} does not seal {refusing}: it drew noise for round {number} of model "
            f"{model} (its record {key}) before its round records kept what each round costs, under settings its "
            "config no longer names, so it cannot bound what that round cost nor tell in which period; restore "
            "that model's entry in the config as it was trained"
        )
    return charge


def charge_doc(charge: ReleaseCharge) -> dict[str, Any]:
    """A record's copy of what its contribution costs the period (the ledger's charge for it): a release's per-slot
    Skellam mechanism, or a training round's norm bound (training/accounting.py)."""
    mechanism = charge.mechanism
    doc: dict[str, Any] = {
        "interval_start": charge.start.isoformat(),
        "interval_end": charge.end.isoformat(),
        "variance": None if mechanism is None else float(mechanism.variance),
    }
    if isinstance(mechanism, NormBoundMechanism):
        return doc | {"l1": float(mechanism.l1), "l2": float(mechanism.l2)}
    if mechanism is not None and not isinstance(mechanism, SkellamMechanism):
        raise InternalError(f"a contribution sealed under a {type(mechanism).__name__}; this is probably a bug")
    return doc | {
        "coordinates": None if mechanism is None else int(mechanism.coordinates),
        "shift": None if mechanism is None else int(mechanism.shift),
    }


def kept_charge(doc: dict[str, Any]) -> ReleaseCharge:
    """The charge a record keeps (`charge_doc`); how it composes is the period's (its privacy unit's) to say."""
    mechanism: SkellamMechanism | NormBoundMechanism | None = None
    if doc["variance"] is not None and "l2" in doc:
        mechanism = NormBoundMechanism(float(doc["variance"]), float(doc["l1"]), float(doc["l2"]))
    elif doc["variance"] is not None:
        mechanism = SkellamMechanism(float(doc["variance"]), int(doc["coordinates"]), int(doc["shift"]))
    return ReleaseCharge(
        mechanism=mechanism,
        start=datetime.fromisoformat(doc["interval_start"]),
        end=datetime.fromisoformat(doc["interval_end"]),
        composition=Composition.SEQUENTIAL,
    )


def _sealed_charge(
    config: Config, institution: InstitutionConfig, record: Path, span: tuple[datetime, datetime], period: Period
) -> ReleaseCharge:
    """What the interval of an earlier seal record costs the period, composed in sequence. A record written before
    seals kept their charge is charged at the current parameters only when they are the ones it was sealed under
    (its release id is the one they give the interval); otherwise nothing bounds what it cost, and the period is
    refused rather than under-counted."""
    doc = _read_record(record, institution)
    kept = doc.get("charge")
    if kept is not None:
        return kept_charge(kept)
    try:
        earlier = plan_release(config, *span)
    except FusionError:
        earlier = None
    if earlier is None or earlier.key.release_id != doc["release_id"]:
        raise BudgetExceeded(
            f"institution {institution.id} contributes nothing more to period {period.name}: it sealed {record.stem} "
            f"in period {period.name} before its seal records kept what each interval costs, under other parameters "
            "than the current ones, so it cannot bound the period's epsilon; it seals again from the next period"
        )
    return replace(earlier.params.charge(*span), composition=Composition.SEQUENTIAL)


@functools.lru_cache(maxsize=65_536)
def _interval_span(name: str) -> tuple[datetime, datetime] | None:
    """`ReleaseKey.parse_interval_name`, remembered: every seal checks every interval its institution sealed (a
    stream's records accumulate, one a window), and a name always means the same interval."""
    return ReleaseKey.parse_interval_name(name)


def record_sealed(
    plan: ReleasePlan, institution: InstitutionConfig, envelope: bytes, *, layer_seed: bytes | None = None
) -> bytes:
    """Keep the envelope and record it, before it is published; returns what to publish (if another run of this
    institution recorded one first, that one). A crash before the record exists leaves only an unpublished
    copy, so no second noisy version ever leaves the institution. The record (owner-only) also keeps the seed
    of the envelope's top removable noise layer, which the institution reveals in the unmask round."""
    directory = _sealed_dir(plan.config, institution)
    with _sealing_lock(directory):  # two overlapping intervals racing to seal: one of them is refused
        refuse_overlap(plan, institution)  # again: an overlapping run may have sealed since this one was planned
        refuse_past_cap(plan, institution)  # and another interval of the period may have been sealed since
        name = f"{plan.key.interval_name}-{hashlib.sha256(envelope).hexdigest()[:16]}.fenv"
        write_private(directory / name, envelope)
        pending = directory / f".{name}.json"
        charge = plan.params.charge(plan.key.start, plan.key.end)
        doc: dict[str, Any] = {"release_id": plan.key.release_id, "envelope": name, "charge": charge_doc(charge)}
        if layer_seed is not None:
            doc["layer_seed"] = layer_seed.hex()
        write_private(pending, json.dumps(doc).encode())
        try:
            os.link(pending, directory / f"{plan.key.interval_name}.json")  # create-once, complete or not at all
        except FileExistsError:
            (directory / name).unlink()
            return sealed_envelope(plan, institution) or envelope
        finally:
            pending.unlink()
    _prune(directory)
    return envelope


@contextlib.contextmanager
def _sealing_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the institution's sealed records (its key directory is local to it)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    descriptor = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _prune(directory: Path) -> None:
    """Delete kept envelopes older than KEEP_SEALED, and the layer seeds of their records (an institution that
    never answered keeps its excess layers in that release: the seed is of no use any more)."""
    cutoff = time.time() - KEEP_SEALED.total_seconds()
    for kept in directory.glob("*.fenv"):
        if _modified(kept) < cutoff:
            kept.unlink(missing_ok=True)
    for record in directory.glob("*.json"):
        if _modified(record) < cutoff:
            _drop_layer_seed(record)


def _modified(path: Path) -> float:
    """The file's modification time; +inf if it is gone (a pending file another sealing run just removed)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def sealed_layer_seed(plan: ReleasePlan, institution: InstitutionConfig) -> bytes | None:
    """The seed of the top removable noise layer of the envelope this institution sealed for the plan's interval
    (None: it sealed none for this release, or its envelope has no removable layers)."""
    record = _sealed_dir(plan.config, institution) / f"{plan.key.interval_name}.json"
    if not record.exists():
        return None
    doc = _read_record(record, institution)
    if doc.get("release_id") != plan.key.release_id or "layer_seed" not in doc:
        return None
    return bytes.fromhex(doc["layer_seed"])


def forget_layer_seed(plan: ReleasePlan, institution: InstitutionConfig) -> None:
    """Drop the layer seed from the institution's record of the plan's interval (once it has answered, or when
    its record is pruned): whoever later reads its key directory cannot regenerate the layers it kept."""
    directory = _sealed_dir(plan.config, institution)
    with _sealing_lock(directory):
        _drop_layer_seed(directory / f"{plan.key.interval_name}.json")


def _drop_layer_seed(record: Path) -> None:
    if not record.exists():
        return
    doc = json.loads(read_private(record, "a sealed-envelope record"))
    if doc.pop("layer_seed", None) is None:
        return
    pending = record.with_name(f".{record.name}.forget")
    write_private(pending, json.dumps(doc).encode())
    os.replace(pending, record)


@dataclass(frozen=True)
class LayeredNoise:
    """One contribution's noise (int64 slots) with the seed of its top removable layer and, per layer, the
    commitment to its seed and the digest of its noise (privacy/noise_shares.py)."""

    noise: np.ndarray
    seed: bytes | None
    commitments: dict[str, str]
    digests: dict[str, str]


def seal_noise_layers(plan: ReleasePlan, institution_id: str) -> LayeredNoise:
    """Draw the institution's share of noise as layers: the base layer from a fresh secure generator, the
    removable ones from seeds on a hash chain (a fresh 256-bit top seed; in test mode with a seed, drawn from
    the seeded stream so runs repeat)."""
    layers = plan.params.layers
    slots = plan.layout.slots
    base = SkellamNoise(layers.base, generator=noise_generator(plan, institution_id, "noise"))
    noise = base.sample(slots)
    if not layers.levels:
        return LayeredNoise(noise, None, {}, {})
    if plan.config.privacy.seed is None:
        top_seed = secrets.token_bytes(SEED_BYTES)
    else:
        top_seed = noise_generator(plan, institution_id, "noise-layers").bytes(SEED_BYTES)
    context = plan.key.release_id.encode()
    seeds = chain_seeds(top_seed, top=layers.levels[-1], bottom=layers.levels[0])
    commitments, digests = {}, {}
    for level in layers.levels:
        layer = layer_noise(seeds[level], variance=layers.layer(level), slots=slots, context=context)
        noise += layer
        commitments[str(level)] = layer_commitment(seeds[level], level=level, context=context)
        digests[str(level)] = noise_digest(layer, seed=seeds[level], level=level, context=context)
    return LayeredNoise(noise, top_seed, commitments, digests)


def noise_generator(plan: ReleasePlan, institution: str, purpose: str) -> np.random.Generator:
    """A secure generator; in test mode (the config refuses seeds in production) a distinct seeded stream per
    institution and purpose."""
    seed = plan.config.privacy.seed
    if seed is None:
        return secure_generator()
    return seeded_generator(seed ^ int(_short_hash(f"{institution}/{purpose}"), 16))

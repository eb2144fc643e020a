"""An institution's noisy update per training round, kept in its own key directory: each round's noise is drawn
once, whatever attempt the round runs under.

A round may run under several attempts (training/attempts.py), each its own release id, masks and envelope. Which
attempt is current is derived from the store and the exchange, which the aggregator and the key holder can write:
together they could mark attempt after attempt as lost and collect a fresh noisy copy of the same gradient sum
from every institution each time, then average the copies and wear the noise away. So an institution draws its
noise for a round once, keeps the noisy update (owner-only, beside its keys, as it keeps its sealed release
envelopes: pipelines/sealing.py), and seals that same update, masked anew, for any later attempt of the round. The
record of the round (a small marker) is kept apart from the update: with the update gone (deleted, or its key
directory restored from an older backup) the marker still refuses a new draw for a round already sealed. Nor
does an institution answer the rosters of a round's attempts for different sets of institutions
(`check_answered_roster`): the difference of two such sums would be one institution's update, with its own noise
share alone.

The record of a round also keeps what the round costs the institution's privacy period (the ledger's charge for
it), and an institution draws no noise for a round unless the round and every round of its run after it fit the cap
of its own config (`refuse_run_past_cap`), counting every round it drew in the period, of any model and under any
settings, and every interval it sealed there, as the seal records of releases hold the cap (pipelines/sealing.py):
the key holder's ledger alone cannot hold it against a coalition that includes the key holder, which could run a
model's rounds past the cap without charging them, or the rounds of a model renamed or retrained over the same
readings. It counts the run's later rounds too because a round it draws is spent for good, by its own records,
whatever becomes of the run: a round of a run that could not finish (refused later by the key holder, or by itself)
would spend its period's budget on no model, and keep a later run that fits from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusion.config.federation import Config
from fusion.errors import FusionError
from fusion.keys.registry import read_private, write_private
from fusion.release.plan import period_of
from fusion.store.ledger import BudgetExceeded
from pipelines.sealing import (
    charge_doc,
    contributions_lock,
    past_cap,
    round_charges,
    round_records_dir,
    sealed_charges,
)
from privacy.accountant import ReleaseCharge
from training.secure_sum import RoundId


def round_key(round_id: RoundId) -> str:
    """Names the round whatever its attempt: the id of its first attempt."""
    return RoundId(round_id.model_id, round_id.round, round_id.parameters_digest).release_id


def _directory(config: Config, institution_id: str) -> Path:
    return round_records_dir(config, config.institution(institution_id))


def _encode(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vector, dtype="<i8"), allow_pickle=False)
    return buffer.getvalue()


def kept_update(config: Config, institution_id: str, round_id: RoundId) -> np.ndarray | None:
    """The noisy update (int64 slots) the institution sealed for `round_id`'s round under any attempt (None: it has
    sealed none); refuses a round it sealed whose kept update is gone or damaged (a new draw would be a second
    noisy copy of the round)."""
    directory = _directory(config, institution_id)
    key = round_key(round_id)
    marker = directory / f"{key}.json"
    if not marker.exists():
        return None
    what = f"institution {institution_id}'s record of round {round_id.round} of model {round_id.model_id}"
    try:
        doc = json.loads(read_private(marker, what))
        path, digest = directory / doc["update"], doc["sha256"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise FusionError(f"{what} ({marker}) is unreadable; restore it from a backup of the key directory") from None
    if not path.exists():
        raise FusionError(
            f"institution {institution_id} sealed round {round_id.round} of model {round_id.model_id} before "
            f"(under attempt {doc.get('release_id', '?')}) and its kept noisy update {path} is gone: it does not "
            "seal the round again (a new draw of noise would be a second noisy copy of the same gradients, and "
            "copies can be averaged); restore the file from a backup, or train the model anew under another name"
        )
    data = read_private(path, f"institution {institution_id}'s noisy update of round {round_id.round}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise FusionError(f"{path} is not the noisy update {marker} records; restore it from a backup")
    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        raise FusionError(f"{path} is unreadable; restore it from a backup") from None
    return np.asarray(vector, dtype=np.int64)


def keep_update(
    config: Config,
    institution_id: str,
    round_id: RoundId,
    noised: np.ndarray,
    *,
    charge: ReleaseCharge,
    rounds: int,
) -> np.ndarray:
    """Keep `noised` as the institution's noisy update of `round_id`'s round, before anything of it is sealed, with
    the round's `charge` (the ledger's for a round of its run), once the charges of the round and of the rest of
    its run (`rounds` rounds in all) fit the period's cap (`refuse_run_past_cap`); returns the update kept (another
    process of the institution may have kept one first: that one)."""
    with contributions_lock(config, config.institution(institution_id)):  # a race past the cap: one is refused
        kept = kept_update(config, institution_id, round_id)
        if kept is not None:
            return kept
        refuse_run_past_cap(config, institution_id, round_id, charge, rounds=rounds)
        return _keep(config, institution_id, round_id, noised, charge)


def _keep(
    config: Config, institution_id: str, round_id: RoundId, noised: np.ndarray, charge: ReleaseCharge
) -> np.ndarray:
    directory = _directory(config, institution_id)
    key = round_key(round_id)
    data = _encode(noised)
    digest = hashlib.sha256(data).hexdigest()
    name = f"{key}-{digest[:16]}.npy"
    write_private(directory / name, data)
    pending = directory / f".{key}.{secrets.token_hex(4)}.json"
    doc = {
        "model": round_id.model_id,
        "round": round_id.round,
        "settings_sha256": round_id.parameters_digest,
        "release_id": round_id.release_id,
        "update": name,
        "sha256": digest,
        "charge": charge_doc(charge),
    }
    write_private(pending, json.dumps(doc).encode())
    try:
        os.link(pending, directory / f"{key}.json")  # create-once: the round's update is this one, or the first
    except FileExistsError:
        kept = kept_update(config, institution_id, round_id)
        if kept is None or not np.array_equal(kept, noised):
            (directory / name).unlink(missing_ok=True)  # not the update kept: it never leaves the institution
        if kept is None:
            raise FusionError(f"{directory / key}.json vanished while it was written; seal the round again") from None
        return kept
    finally:
        pending.unlink(missing_ok=True)
    return np.asarray(noised, dtype=np.int64)


def refuse_run_past_cap(
    config: Config, institution_id: str, round_id: RoundId, charge: ReleaseCharge, *, rounds: int
) -> None:
    """Refuse to draw noise for `round_id`'s round unless it and the rounds of its run after it (up to round
    `rounds`, each costing `charge`) fit the cap of the institution's config, counting the other rounds it drew noise
    for in the period (their records keep their charges) and the intervals it sealed there, composed as the key
    holder's ledger composes the period (privacy.accountant.period_loss, the composition of the charge: in sequence
    at entity level, by instant at event level, where a model's rounds share every instant of its readings). A round
    drawn and never decrypted counts all the same (its update has left the institution, masked). Checked at every
    round it draws, so a run's first round (or the first it draws on resuming) is refused, not a later one, where
    the whole run cannot fit; a later round only where the period took other contributions meanwhile."""
    period = period_of(config, charge.start, charge.end)
    institution = config.institution(institution_id)
    drawn = round_charges(
        config,
        institution,
        period,
        refusing=f"round {round_id.round} of model {round_id.model_id}",
        besides=round_key(round_id),
        drawing=(round_id.model_id, round_id.parameters_digest, charge),
    )
    sealed = sealed_charges(config, institution, period)
    left = max(rounds - round_id.round + 1, 1)  # this round and the run's later ones, none drawn yet
    cap = config.privacy.cap
    if past := past_cap([*sealed, *drawn], charge, cap=cap, delta=config.privacy.delta, times=left):
        before, after = past
        run = "" if left == 1 else f" with the {left - 1} round(s) of its run after it"
        raise BudgetExceeded(
            f"institution {institution_id} does not seal round {round_id.round} of model {round_id.model_id}: the "
            f"round{run} needs epsilon {after - before:.4f} in period {period.name}, which would reach {after:.4f} "
            f"with the {len(drawn)} training round(s) and {len(sealed)} interval(s) it contributed in the period; "
            f"the cap is {cap:.4f} and {max(cap - before, 0.0):.4f} is left (a round it draws is spent for good, so "
            "it draws none of a run that could not finish)"
        )


def check_answered_roster(config: Config, institution_id: str, round_id: RoundId, included: Sequence[str]) -> None:
    """Refuse to answer a roster of `round_id`'s round that includes other institutions than the first roster the
    institution answered for the round, under any attempt (recorded, create-once, here). Every attempt of a round
    sums the same noisy updates; two attempts summing different sets of them would give away the difference: an
    institution's update alone, with only its own share of the noise."""
    directory = _directory(config, institution_id)
    key = round_key(round_id)
    record = directory / f"{key}-roster.json"
    wanted = sorted(included)
    if not record.exists():
        pending = directory / f".{key}-roster.{secrets.token_hex(4)}.json"
        write_private(pending, json.dumps({"release_id": round_id.release_id, "included": wanted}).encode())
        try:
            os.link(pending, record)
            return
        except FileExistsError:
            pass  # another process of the institution answered first: check against its record
        finally:
            pending.unlink(missing_ok=True)
    what = f"institution {institution_id}'s record of the roster it answered for round {round_id.round}"
    try:
        doc = json.loads(read_private(record, what))
        answered, first = list(doc["included"]), str(doc["release_id"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise FusionError(f"{what} ({record}) is unreadable; restore it from a backup of the key directory") from None
    if answered != wanted:
        raise FusionError(
            f"institution {institution_id} answered round {round_id.round} of model {round_id.model_id} (attempt "
            f"{first}) for {', '.join(answered)}; it does not answer attempt {round_id.release_id}'s roster of "
            f"{', '.join(wanted)}: two sums of the same noisy updates over different institutions would give away "
            "their difference. The round completes once the aggregator closes a roster of the same institutions"
        )

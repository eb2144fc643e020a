"""The unmask round and double masking: what the aggregator and the key holder can and cannot get together."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fusion.errors import FusionError, ReleaseRefused
from fusion.keys.holder import load_secret_context_bytes
from fusion.keys.registry import load_registry, load_signing_key
from fusion.release.exchange import (
    aggregate_path,
    contribution_path,
    read_bytes,
    roster_path,
    unmask_path,
    write_bytes,
)
from fusion.release.plan import ReleasePlan, plan_release
from fusion.store.delta import Store
from pipelines.release import release
from pipelines.run import run_aggregate, run_contributions, run_unmask
from pipelines.unmask import (
    Roster,
    RosterConflict,
    _roster_message,
    _seal_answer,
    absent_mask_total,
    acknowledge,
    acknowledged,
    acknowledgements_needed,
    check_roster,
    layer_signatures_needed,
    self_mask_total,
    write_roster,
)
from privacy import he
from privacy.envelope import envelope_header, pack_envelope, unpack_envelope
from privacy.masking import centred
from privacy.signing import generate_signing_key, sign
from tests.conftest import END, START

pytestmark = pytest.mark.e2e


def decrypt(plan: ReleasePlan, ciphertexts: list[list[bytes]]) -> np.ndarray:
    """What a key holder colluding with the aggregator can compute: the decryption of any sum of envelopes."""
    secret = he.load_secret_context(load_secret_context_bytes(plan.config))
    public = he.load_public_context(read_bytes(plan.config.exchange_path + "/he_public.ctx"))
    total = ciphertexts[0] if len(ciphertexts) == 1 else he.add_encrypted(public, ciphertexts)
    return he.decrypt_vector(secret, total, plan.layout.slots)


def envelope(plan: ReleasePlan, institution: str) -> list[bytes]:
    return unpack_envelope(read_bytes(contribution_path(plan.config.exchange_path, plan.key, institution)))[1]


def uniform(values: np.ndarray) -> bool:
    residues = (values.astype(np.float64) % he.PLAIN_MODULUS) / he.PLAIN_MODULUS
    return bool(stats.kstest(residues, "uniform").pvalue > 1e-4)


FOUR = [(i, "csv") for i in ("alpha", "beta", "gamma", "delta")]


def delta_missing(make_federation: Any) -> tuple[Any, ReleasePlan, list[Any]]:
    """Four institutions, quorum 2; alpha, beta and gamma contribute, delta does not: (federation, plan, the
    three present)."""
    fed = make_federation(noise=False, quorum=2, institutions=FOUR)
    plan = plan_release(fed.config, START, END)
    present = [fed.config.institution(i) for i in ("alpha", "beta", "gamma")]
    run_contributions(plan, present)
    return fed, plan, present


def test_without_the_unmask_round_even_the_sum_of_all_envelopes_is_uniform(make_federation):
    """Pairwise masks cancel in the full sum, but the self masks do not: nothing is readable before the
    institutions answer a roster."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    everyone = [envelope(plan, i.id) for i in fed.config.institutions]
    assert uniform(decrypt(plan, everyone))
    assert uniform(decrypt(plan, everyone[:2]))


def test_the_coalition_cannot_declare_a_victim_absent_after_the_unmask_round(make_federation):
    """The attack pairwise masking alone allows: unmask and decrypt the full sum, then declare beta absent and
    collect the survivors' mask keys with beta to decrypt alpha + gamma; the difference would be beta's contribution.
    Every honest institution remembers the roster it answered and refuses the second one."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    first = run_aggregate(plan)
    assert first["status"] == "awaiting_unmask" and first["unmask_pending"] == ["alpha", "beta", "gamma"]
    run_unmask(plan, fed.config.institutions)
    assert run_aggregate(plan)["status"] == "aggregated"
    full = decrypt(plan, [unpack_envelope(read_bytes(aggregate_path(fed.config.exchange_path, plan.key)))[1]])
    assert not uniform(full)  # the honest aggregate is readable, as it should be

    # The coalition's second roster:
    write_roster(plan, Roster(release_id=plan.key.release_id, included=("alpha", "gamma"), absent=("beta",)))
    for survivor in ("alpha", "gamma"):
        with pytest.raises(RosterConflict, match="refuses a different one"):
            run_unmask(plan, [fed.config.institution(survivor)])
    # Their earlier answers are still the only ones in the exchange: the new roster can never be completed.
    status = run_aggregate(plan)
    assert status["status"] == "awaiting_unmask" and status["unmask_pending"] == ["alpha", "gamma"]
    reasons = sorted(r["reason"] for r in status["refused"])
    assert reasons == ["declared_absent"] + ["wrong_roster"] * 3


def test_split_view_rosters_isolate_no_one_because_nobody_answers_without_a_majority_of_signatures(make_federation):
    """A coalition of aggregator and key holder shows alpha and beta one signed roster (delta absent) and gamma and
    delta another (alpha absent). Answered, alpha's seed and its mask key with delta come back from alpha's and
    beta's answers, and beta's and gamma's mask keys with alpha from gamma's and delta's: alpha's contribution,
    decrypted exactly. Each institution first signs the roster it was shown and answers only once 3 of the 4
    signed that same roster, so no one answers either."""
    fed = make_federation(noise=False, quorum=2, institutions=FOUR)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    key = plan.key.release_id
    first = Roster(release_id=key, included=("alpha", "beta", "gamma"), absent=("delta",))
    second = Roster(release_id=key, included=("beta", "delta", "gamma"), absent=("alpha",))
    shown = {"alpha": first, "beta": first, "gamma": second, "delta": second}
    for institution, roster in shown.items():
        write_roster(plan, roster)
        answer = run_unmask(plan, [fed.config.institution(institution)])[0]
        assert answer.path is None and answer.needed == 3
    assert acknowledged(plan, first) == ("alpha", "beta") and acknowledged(plan, second) == ("delta", "gamma")
    for institution, roster in shown.items():  # asked again, each still sees its roster signed twice
        write_roster(plan, roster)
        assert run_unmask(plan, [fed.config.institution(institution)])[0].path is None
    assert not list((fed.directory / "exchange").rglob("unmask/*.fenv")), "no institution answered"

    # What the answers would have given the coalition (each sealed as before the consistency round):
    registry = load_registry(fed.config)
    answers = {}
    for institution, roster in shown.items():
        _seal_answer(plan, institution, roster, registry)
        answers[institution] = envelope_header(read_bytes(unmask_path(fed.config.exchange_path, plan.key, institution)))
    contributions = {
        i: envelope_header(read_bytes(contribution_path(fed.config.exchange_path, plan.key, i)))
        for i in ("alpha", "beta", "gamma")
    }
    t = he.PLAIN_MODULUS
    on_first = [answers["alpha"], answers["beta"]]
    seed_mask = self_mask_total(plan, {"alpha": contributions["alpha"]}, on_first)
    with_delta = absent_mask_total(plan, {"alpha": contributions["alpha"]}, on_first, ("delta",))
    # beta's and gamma's masks with alpha are the negations of alpha's with them.
    on_second = [answers["gamma"], answers["delta"]]
    others = {i: contributions[i] for i in ("beta", "gamma")}
    with_beta_gamma = absent_mask_total(plan, others, on_second, ("alpha",))
    isolated = decrypt(plan, [envelope(plan, "alpha")]) % t
    for mask in (seed_mask, with_delta):
        isolated = (isolated - mask) % t
    isolated = centred((isolated + with_beta_gamma) % t, t)
    assert isolated.any() and np.abs(isolated).max() < 2**40, "alpha's own contribution, in the clear"


def test_split_view_rosters_double_signed_by_the_contributor_keeping_its_draws_are_not_answered(make_federation):
    """Five institutions, c = 0, quorum 3: each sealed share is v / 2. Gamma, the contributor that keeps its own
    draws, signs both of two rosters: {alpha, beta, gamma} (delta, epsilon absent) shown to alpha and beta, and
    {alpha, gamma, delta, epsilon} (beta absent) shown to delta and epsilon. At more than (n + c) / 2 = 3
    signatures both were answered, and their answers with gamma's own mask key isolated alpha's contribution
    with only v / 2 of noise on it (epsilon 1.45 where 1.00 was reported). More than (n + c + 1) / 2 = 4 are
    needed now, which two rosters cannot both gather: neither is answered."""
    from fusion.release.exchange import acknowledgement_path, write_json
    from pipelines.unmask import _acknowledgement_message

    five = [(i, "csv") for i in ("alpha", "beta", "gamma", "delta", "epsilon")]
    fed = make_federation(noise=True, seed=None, mode="production", quorum=3, institutions=five, entities=3)
    plan = plan_release(fed.config, START, END)
    assert plan.params.share_variance == pytest.approx(plan.params.total_variance / 2)
    run_contributions(plan, fed.config.institutions)
    key, closed = plan.key.release_id, "2026-01-01T00:00:00+00:00"  # past its deadline: nobody waits for layers
    first = Roster(release_id=key, included=("alpha", "beta", "gamma"), absent=("delta", "epsilon"), closed_at=closed)
    second = Roster(
        release_id=key, included=("alpha", "delta", "epsilon", "gamma"), absent=("beta",), closed_at=closed
    )
    outcomes = {}
    for roster, shown in ((first, ("alpha", "beta")), (second, ("delta", "epsilon"))):
        write_roster(plan, roster)
        signature = sign(load_signing_key(fed.config, "gamma"), _acknowledgement_message(roster, "gamma"))
        write_json(
            acknowledgement_path(fed.config.exchange_path, plan.key, "gamma"),
            {"institution": "gamma", "roster": roster.to_doc(), "signature": signature.hex()},
        )
        for institution in shown * 2:  # asked again once the other has signed
            try:
                answer = run_unmask(plan, [fed.config.institution(institution)])[0]
            except FusionError as exc:
                outcomes[institution] = str(exc)
            else:
                signed = f"{len(answer.acknowledged)} of {answer.needed}"
                outcomes[institution] = "answered" if answer.path else signed
    refused = "the roster includes 3 institutions; answering needs signatures of 4 on one roster"
    assert all(refused in outcomes[i] for i in ("alpha", "beta")), outcomes  # too small to gather 4
    assert outcomes["delta"] == outcomes["epsilon"] == "3 of 4", outcomes  # and the larger one stays at 3
    assert not list((fed.directory / "exchange").rglob("unmask/*.fenv")), "no institution answered"


def test_a_roster_naming_an_institution_twice_is_refused_so_no_signature_counts_twice(make_federation):
    """The split view again, each institution's id repeated in the roster it is shown ({alpha, alpha, beta}
    for alpha): counted per entry, its own signature alone reached the 2 needed and everyone answered."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    key = plan.key.release_id
    shown = {
        "alpha": Roster(release_id=key, included=("alpha", "alpha", "beta"), absent=("gamma",)),
        "beta": Roster(release_id=key, included=("beta", "beta", "gamma"), absent=("alpha",)),
        "gamma": Roster(release_id=key, included=("alpha", "beta", "gamma", "gamma"), absent=()),
    }
    for institution, roster in shown.items():
        write_roster(plan, roster)
        with pytest.raises(FusionError, match="names an institution twice"):
            run_unmask(plan, [fed.config.institution(institution)])
        with pytest.raises(FusionError, match="names an institution twice"):
            check_roster(plan, institution, roster)  # also when handed a roster directly
    assert not list((fed.directory / "exchange").rglob("unmask/*.fenv")), "no institution answered"
    assert not list((fed.directory / "exchange").rglob("acknowledgements/*.json")), "nor signed anything"


def test_a_crash_while_recording_the_roster_leaves_no_partial_record(make_federation, monkeypatch):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        acknowledge(plan, "alpha")
    monkeypatch.undo()
    assert not list((fed.directory / "institution-keys").rglob("answered/*")), "no partial record"
    run_unmask(plan, fed.config.institutions)  # alpha takes part as if nothing happened
    assert run_aggregate(plan)["status"] == "aggregated"


def test_only_valid_signatures_on_the_same_roster_count_as_acknowledgements(make_federation):
    from fusion.release.exchange import acknowledgement_path
    from pipelines.unmask import acknowledged, acknowledgements_needed

    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    roster = acknowledge(plan, "alpha")
    assert acknowledged(plan, roster) == ("alpha",)
    path = acknowledgement_path(fed.config.exchange_path, plan.key, "beta")
    other = Roster(release_id=plan.key.release_id, included=("alpha", "beta"), absent=("gamma",))
    forged_key, _ = generate_signing_key()
    alphas = json.loads(read_bytes(acknowledgement_path(fed.config.exchange_path, plan.key, "alpha")))
    for doc in (
        alphas,  # alpha's signature, filed as beta's
        {"signature": sign(forged_key, _roster_message(roster)).hex()},  # not beta's key
        {"signature": "zz"},
        {"no": "signature"},
    ):
        write_bytes(path, json.dumps(doc).encode())
        assert acknowledged(plan, roster) == ("alpha",)
    write_roster(plan, other)
    acknowledge(plan, "beta")  # beta signs another roster: it counts for that one, not for alpha's
    assert acknowledged(plan, roster) == ("alpha",) and acknowledged(plan, other) == ("beta",)
    # more than (n + c + 1) / 2 once the sealed share is below v (quorum >= c + 3); more than (n + c) / 2 at
    # quorum c + 2; a quorum below c + 2 (test mode) protects no one, and needs only its own
    needed = {(3, 2, 0): 2, (3, 3, 1): 3, (4, 2, 0): 3, (5, 3, 1): 4, (5, 4, 2): 4, (4, 1, 0): 1, (5, 2, 1): 1,
              (5, 3, 0): 4, (4, 3, 0): 3, (6, 4, 1): 5, (7, 5, 0): 5}
    for (n, quorum, c), expected in needed.items():
        config = fed.config.model_copy(update={"institutions": [fed.config.institutions[0]] * n})
        wary = replace(plan, config=config, params=replace(plan.params, quorum=quorum, max_colluding=c))
        assert acknowledgements_needed(wary) == expected, (n, quorum, c)


def test_a_roster_is_not_closed_with_fewer_institutions_than_one_round_of_signatures_needs(make_federation):
    """4 institutions: answers need 3 signatures on one roster. With 2 contributions (quorum 2) no roster could
    ever gather them, so the aggregator refuses instead of closing one."""
    fed = make_federation(noise=False, quorum=2, institutions=FOUR)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions[:2])
    with pytest.raises(ReleaseRefused, match="needs 3 included institutions to acknowledge one roster"):
        run_aggregate(plan)
    assert not os.path.exists(roster_path(fed.config.exchange_path, plan.key))
    run_contributions(plan, fed.config.institutions[2:3])
    assert run_aggregate(plan)["status"] == "awaiting_unmask"  # 3 of 4: the round can complete
    run_unmask(plan, fed.config.institutions[:3])
    assert run_aggregate(plan)["status"] == "aggregated"


def test_an_institution_refuses_a_roster_that_excludes_it_or_is_not_a_partition(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    with pytest.raises(FusionError, match="not closed"):
        run_unmask(plan, fed.config.institutions[:1])
    write_roster(plan, Roster(release_id=plan.key.release_id, included=("alpha", "gamma"), absent=("beta",)))
    with pytest.raises(FusionError, match="declared absent"):
        run_unmask(plan, [fed.config.institution("beta")])
    # beta neither included nor absent:
    write_roster(plan, Roster(release_id=plan.key.release_id, included=("alpha", "gamma"), absent=()))
    with pytest.raises(FusionError, match="partition"):
        run_unmask(plan, [fed.config.institution("alpha")])
    write_roster(plan, Roster(release_id=plan.key.release_id, included=("alpha",), absent=("beta", "gamma")))
    with pytest.raises(FusionError, match="below the quorum"):
        run_unmask(plan, [fed.config.institution("alpha")])
    write_roster(plan, Roster(release_id="r-another", included=("alpha", "beta", "gamma"), absent=()))
    with pytest.raises(FusionError, match="not " + plan.key.release_id):
        run_unmask(plan, [fed.config.institution("alpha")])
    assert not list((fed.directory / "institution-keys").rglob("answered/*.json"))  # nothing was answered


def test_a_roster_not_signed_by_the_registered_aggregator_is_not_answered(make_federation):
    """The key holder can write to the exchange (it publishes its public HE context there). Unsigned, a roster
    of its making, different for each institution, let it isolate one institution's contribution on its own;
    institutions now answer only a roster the registered aggregator signed, unaltered."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)  # the aggregator closes and signs the roster: everyone included
    path = roster_path(fed.config.exchange_path, plan.key)
    signed = json.loads(read_bytes(path))
    forged_key, _ = generate_signing_key()
    forged = Roster(release_id=plan.key.release_id, included=("alpha", "beta"), absent=("gamma",))
    for doc, expected in (
        ({**signed, "included": ["alpha", "beta"], "absent": ["gamma"]}, "not signed"),  # altered after signing
        (forged.to_doc(), "not signed"),
        ({**forged.to_doc(), "signature": sign(forged_key, _roster_message(forged)).hex()}, "not signed"),
        ({**signed, "signature": "zz"}, "malformed"),
    ):
        write_bytes(path, json.dumps(doc).encode())
        with pytest.raises(FusionError, match=expected):
            run_unmask(plan, [fed.config.institution("alpha")])
    assert not list((fed.directory / "institution-keys").rglob("answered/*.json")), "nothing was answered"
    write_bytes(path, json.dumps(signed).encode())
    run_unmask(plan, fed.config.institutions)
    assert run_aggregate(plan)["status"] == "aggregated"


def test_junk_rosters_and_acknowledgements_in_the_exchange_are_refused_or_ignored_not_crashed_on(make_federation):
    """Anyone who can write the exchange can drop junk there. A roster whose ids are JSON objects crashed the
    aggregator and every unmask step with a TypeError (its duplicate check ran before the signature check, outside
    the parsing's try), one nested 100,000 deep with a RecursionError; now each is a malformed roster, and one
    larger than any roster is not read. A junk acknowledgement (nested too deep, or too large) crashed the others'
    answers with a RecursionError; it counts for nothing."""
    from fusion.release.exchange import acknowledgement_path

    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    path = roster_path(fed.config.exchange_path, plan.key)
    signed = read_bytes(path)
    doc = json.loads(signed)
    for junk, expected in (
        (json.dumps({**doc, "included": [{}], "absent": []}).encode(), "included and absent must be lists of"),
        (json.dumps({**doc, "closed_at": 7}).encode(), "included and absent must be lists of"),
        (b"[" * 100_000, "malformed"),
        (json.dumps({**doc, "pad": "x" * 1_000_000}).encode(), "more than the"),
    ):
        write_bytes(path, junk)
        with pytest.raises(FusionError, match=expected):
            run_aggregate(plan)
        with pytest.raises(FusionError, match=expected):
            run_unmask(plan, [fed.config.institution("alpha")])
    write_bytes(path, signed)
    roster = acknowledge(plan, "alpha")
    gamma = acknowledgement_path(fed.config.exchange_path, plan.key, "gamma")
    for junk in (b"[" * 100_000, json.dumps({"signature": "00", "pad": "x" * 1_000_000}).encode()):
        write_bytes(gamma, junk)
        assert "gamma" not in acknowledged(plan, roster)
        assert run_unmask(plan, [fed.config.institution("beta")])[0].path  # alpha's and beta's: 2 of 2 needed
    run_unmask(plan, fed.config.institutions)
    assert run_aggregate(plan)["status"] == "aggregated"


def test_answering_the_same_roster_again_is_allowed(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    run_unmask(plan, fed.config.institutions)
    run_unmask(plan, fed.config.institutions)  # e.g. a retry after a crash: the same roster, the same shares
    assert run_aggregate(plan)["status"] == "aggregated"


def test_answering_again_with_an_institution_absent_republishes_the_same_bytes(make_federation):
    """An answer is kept: answering again (a retry) republishes the same bytes, with the same revealed shares of
    the mask keys held with the absent institution, and the release completes."""
    fed = make_federation(noise=True, quorum=2)
    plan = plan_release(fed.config, START, END)
    survivors = [fed.config.institution("alpha"), fed.config.institution("beta")]
    run_contributions(plan, survivors)  # gamma never contributes
    run_aggregate(plan)
    assert json.loads(read_bytes(roster_path(fed.config.exchange_path, plan.key)))["absent"] == ["gamma"]
    run_unmask(plan, survivors)
    first = read_bytes(unmask_path(fed.config.exchange_path, plan.key, "alpha"))
    run_unmask(plan, survivors[:1])
    assert read_bytes(unmask_path(fed.config.exchange_path, plan.key, "alpha")) == first
    assert run_aggregate(plan)["status"] == "aggregated"
    assert release(plan, Store(fed.config.store_path)).status == "released"


def test_one_institution_may_miss_the_unmask_round_when_none_is_absent(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    alone = run_unmask(plan, fed.config.institutions[:1])[0]
    assert (alone.path, alone.acknowledged, alone.needed) == (None, ("alpha",), 2)  # acknowledged, not answered
    waiting = run_aggregate(plan)
    assert waiting["status"] == "awaiting_unmask" and waiting["unmask_pending"] == ["alpha", "beta", "gamma"]
    assert waiting["acknowledged"] == ["alpha"]
    assert run_unmask(plan, [fed.config.institution("gamma")])[0].path  # two of three signed: gamma answers
    waiting = run_aggregate(plan)
    assert waiting["status"] == "awaiting_unmask" and waiting["unmask_pending"] == ["alpha", "beta"]
    assert run_unmask(plan, fed.config.institutions[:1])[0].path  # alpha, asked again, now answers too
    assert run_aggregate(plan)["status"] == "aggregated"  # beta never answers: quorum-many shares suffice
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())


def test_a_lying_institutions_share_is_outvoted_by_the_commitment(make_federation):
    """A (malicious) institution reveals a wrong share of alpha's seed, validly signed: the aggregator finds a
    subset of shares that matches alpha's commitment, and the release is still exact."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    run_unmask(plan, fed.config.institutions)
    path = unmask_path(fed.config.exchange_path, plan.key, "gamma")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    x, y = header.revealed_shares["alpha"].split(":")
    lie = {**header.revealed_shares, "alpha": f"{x}:{int(y, 16) ^ 1:x}"}
    write_bytes(
        path,
        pack_envelope(
            replace(header, revealed_shares=lie), ciphertexts, signing_key=load_signing_key(fed.config, "gamma")
        ),
    )
    assert run_aggregate(plan)["status"] == "aggregated"
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(t.num_rows for t in fed.raw.values())


def test_a_lying_mask_key_share_is_discarded_and_the_release_waits_for_a_good_one(make_federation):
    """delta is absent. gamma reveals a wrong share of alpha's mask key with delta and an unreadable one of beta's,
    validly signed. With alpha's and gamma's answers only, alpha's key cannot be rebuilt: nothing is aggregated
    (never corrupted), and the aggregator waits for beta. Once beta answers, the good shares rebuild every key
    and the release is exact. Had every included institution answered, the release would be refused."""
    fed, plan, present = delta_missing(make_federation)
    assert run_aggregate(plan)["absent"] == ["delta"]
    acknowledge(plan, "beta")
    assert all(a.path for a in run_unmask(plan, [present[0], present[2]]))
    path = unmask_path(fed.config.exchange_path, plan.key, "gamma")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    x, y = header.revealed_pair_shares["alpha/delta"].split(":")
    lie = {**header.revealed_pair_shares, "alpha/delta": f"{x}:{int(y, 16) ^ 1:x}", "beta/delta": "junk"}
    signing_key = load_signing_key(fed.config, "gamma")
    write_bytes(path, pack_envelope(replace(header, revealed_pair_shares=lie), ciphertexts, signing_key=signing_key))
    status = run_aggregate(plan)
    assert status["status"] == "awaiting_unmask" and status["unmask_pending"] == ["beta"], status
    assert "masks cannot be removed yet" in status["reason"]
    assert not os.path.exists(aggregate_path(fed.config.exchange_path, plan.key))
    assert run_unmask(plan, [present[1]])[0].path
    assert run_aggregate(plan)["status"] == "aggregated"
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(fed.raw[i.id].num_rows for i in present)


def test_an_answer_reveals_mask_keys_held_with_the_absent_only(make_federation):
    fed, plan, present = delta_missing(make_federation)
    run_aggregate(plan)
    run_unmask(plan, present)
    for institution in present:
        answer = envelope_header(read_bytes(unmask_path(fed.config.exchange_path, plan.key, institution.id)))
        assert set(answer.revealed_shares) == {"alpha", "beta", "gamma"}
        assert set(answer.revealed_pair_shares) == {"alpha/delta", "beta/delta", "gamma/delta"}
        assert unpack_envelope(read_bytes(unmask_path(fed.config.exchange_path, plan.key, institution.id)))[1] == []


def test_no_roster_with_absences_over_a_contribution_without_shared_mask_keys(make_federation):
    """A contribution sealed before mask keys were shared (an upgrade mid-release) cannot have its masks with an
    absent institution removed: the aggregator closes no roster (so nobody commits to one) until all contribute."""
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions[:2])
    path = contribution_path(fed.config.exchange_path, plan.key, "alpha")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    older = replace(header, pair_commitments={}, pair_shares={}, pair_share_digests={})
    write_bytes(path, pack_envelope(older, ciphertexts, signing_key=load_signing_key(fed.config, "alpha")))
    with pytest.raises(ReleaseRefused, match=r"contributions of \['alpha'\] were sealed by a Fusion version before"):
        run_aggregate(plan)
    assert not os.path.exists(roster_path(fed.config.exchange_path, plan.key))
    run_contributions(plan, fed.config.institutions[2:])
    assert run_aggregate(plan)["status"] == "awaiting_unmask"  # nobody absent: no mask key is needed
    run_unmask(plan, fed.config.institutions)
    assert run_aggregate(plan)["status"] == "aggregated"


def test_an_unopenable_mask_key_share_names_its_dealer(make_federation):
    fed, plan, present = delta_missing(make_federation)
    path = contribution_path(fed.config.exchange_path, plan.key, "beta")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    broken = {**header.pair_shares, "delta/alpha": "00" * 98}
    write_bytes(path, pack_envelope(replace(header, pair_shares=broken), ciphertexts,
                                    signing_key=load_signing_key(fed.config, "beta")))
    run_aggregate(plan)
    with pytest.raises(FusionError, match="beta's signed contribution is faulty"):
        run_unmask(plan, present)


def test_an_answer_to_another_roster_is_refused(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    run_unmask(plan, fed.config.institutions)
    path = unmask_path(fed.config.exchange_path, plan.key, "beta")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    forged = replace(header, included=("alpha", "beta"), absent=("gamma",))
    write_bytes(path, pack_envelope(forged, ciphertexts, signing_key=load_signing_key(fed.config, "beta")))
    status = run_aggregate(plan)
    assert [r["reason"] for r in status["refused"]] == ["wrong_roster"]
    assert status["status"] == "aggregated"  # alpha's and gamma's shares are enough (quorum 2, nobody absent)
    assert json.loads(read_bytes(roster_path(fed.config.exchange_path, plan.key)))["absent"] == []


def test_the_key_holder_decrypts_only_an_aggregate_signed_by_the_registered_aggregator(make_federation):
    fed = make_federation(noise=False, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    run_unmask(plan, fed.config.institutions)
    run_aggregate(plan)
    path = aggregate_path(fed.config.exchange_path, plan.key)
    genuine = read_bytes(path)
    header, ciphertexts = unpack_envelope(genuine)
    store = Store(fed.config.store_path)
    for forged in (
        pack_envelope(header, ciphertexts),  # unsigned
        pack_envelope(header, ciphertexts, signing_key=generate_signing_key()[0]),  # signed by someone else
    ):
        write_bytes(path, forged)
        with pytest.raises(ReleaseRefused, match="registered aggregator"):
            release(plan, store)
    assert store.read("budget").num_rows == 0  # nothing was charged for the forgeries
    write_bytes(path, genuine)
    assert release(plan, store).status == "released"


def test_an_institution_seals_one_envelope_per_interval_ever(make_federation):
    """The coalition deletes the envelopes to make the institutions draw fresh noise (averaging many noisy sums
    would wear the noise away), or asks for the same interval under other parameters: it gets the same bytes
    back, or a refusal."""
    fed = make_federation(noise=True, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    path = contribution_path(fed.config.exchange_path, plan.key, "alpha")
    first = read_bytes(path)
    Path(path).unlink()
    run_contributions(plan, fed.config.institutions)
    assert read_bytes(path) == first  # re-published, not re-drawn
    privacy = fed.config.privacy.model_copy(update={"epsilon": 2.0})
    other = plan_release(fed.config.model_copy(update={"privacy": privacy}), START, END)
    assert other.key.release_id != plan.key.release_id
    with pytest.raises(FusionError, match="already contributed"):
        run_contributions(other, fed.config.institutions[:1])
    # After a week the kept copy is pruned (the record stays): the interval is never sealed again.
    alpha = fed.config.institutions[:1]
    for kept in (fed.directory / "institution-keys" / "alpha" / "sealed").glob("*.fenv"):
        os.utime(kept, (0, 0))
    run_contributions(plan_release(fed.config, END, END + (END - START)), alpha)  # sealing prunes old copies
    Path(path).unlink()
    with pytest.raises(FusionError, match="pruned"):
        run_contributions(plan, alpha)


def test_an_institution_never_noises_a_reading_twice_through_overlapping_intervals(make_federation):
    """[00:00, 06:00) then [00:00, 01:00) or [05:00, 07:00): each would draw fresh noise on readings already
    sealed; whoever decrypts both could average the draws. Adjacent intervals are sealed as usual."""
    fed = make_federation(noise=True, quorum=2)
    alpha = fed.config.institutions[:1]
    run_contributions(plan_release(fed.config, START, END), alpha)
    hour = timedelta(hours=1)
    for start, end in ((START, START + hour), (END - hour, END + hour), (START, END + hour)):
        with pytest.raises(FusionError, match="overlaps"):
            run_contributions(plan_release(fed.config, start, end), alpha)
    sealed = fed.directory / "institution-keys" / "alpha" / "sealed"
    assert len(list(sealed.glob("*.fenv"))) == 1  # nothing was sealed, not even unpublished
    run_contributions(plan_release(fed.config, END, END + hour), alpha)
    run_contributions(plan_release(fed.config, START - hour, START), alpha)
    assert len(list(sealed.glob("*.fenv"))) == 3


def test_two_overlapping_intervals_racing_to_seal_cannot_both_succeed(make_federation, monkeypatch):
    import threading
    import time

    import pipelines.sealing as sealing

    fed = make_federation(noise=True, quorum=2)
    alpha = fed.config.institution("alpha")
    plans = [plan_release(fed.config, START, END), plan_release(fed.config, START, START + timedelta(hours=1))]
    slow = sealing.write_private

    def write_slowly(path, data):  # widens the window between the overlap check and the record
        time.sleep(0.2)
        slow(path, data)

    monkeypatch.setattr(sealing, "write_private", write_slowly)
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def seal(plan: ReleasePlan) -> None:
        start.wait()
        try:
            sealing.record_sealed(plan, alpha, plan.key.release_id.encode())
            outcomes.append("sealed")
        except FusionError as exc:
            outcomes.append("refused" if "overlaps" in str(exc) else str(exc))

    threads = [threading.Thread(target=seal, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "sealed"]


def test_excess_noise_layers_are_removed_and_a_bad_or_missing_reveal_only_keeps_more_noise(make_federation):
    """Quorum 2 of 3: each institution seals v (v / (2 - 1)) and, with all three included, reveals its layer 2
    (v / 2), keeping v / 2. Beta forges its reveal (validly signed) and gamma lost its record: their layers stay,
    so the release carries more noise than the floor and says so, never less."""
    fed = make_federation(noise=True, seed=5, quorum=2)
    plan = plan_release(fed.config, START, END)
    v = plan.params.total_variance
    assert plan.params.share_variance == pytest.approx(v) and plan.params.layers.layer(2) == pytest.approx(v / 2)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    gamma = fed.config.institution("gamma")
    record = Path(fed.config.institution_keys_path(gamma)) / "sealed" / f"{plan.key.interval_name}.json"
    doc = json.loads(record.read_text())
    del doc["layer_seed"]
    record.write_text(json.dumps(doc))
    run_unmask(plan, fed.config.institutions)
    path = unmask_path(fed.config.exchange_path, plan.key, "beta")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    level, seed = header.revealed_layers["beta"].split(":")
    assert level == "2"
    forged = {"beta": f"2:{int(seed, 16) ^ 1:064x}"}
    write_bytes(
        path,
        pack_envelope(replace(header, revealed_layers=forged), ciphertexts,
                      signing_key=load_signing_key(fed.config, "beta")),
    )
    assert not unpack_envelope(read_bytes(unmask_path(fed.config.exchange_path, plan.key, "gamma")))[
        0
    ].revealed_layers
    alpha = Path(fed.config.institution_keys_path(fed.config.institution("alpha"))) / "sealed"
    assert "layer_seed" not in json.loads((alpha / f"{plan.key.interval_name}.json").read_text())  # answered: gone
    status = run_aggregate(plan)
    assert status["status"] == "aggregated"
    assert status["noise_variance"] == pytest.approx(3 * v - v / 2)  # only alpha's layer came out
    assert set(status["noise_layers_kept"]) == {"beta", "gamma"}
    assert "commitment" in status["noise_layers_kept"]["beta"]
    release(plan, Store(fed.config.store_path))
    released = Store(fed.config.store_path).read("releases")
    weight = plan.params.encodings[0].count_weight
    metric = fed.config.metrics[0].name
    sds = [sd for m, sd in zip(released.column("metric").to_pylist(), released.column("count_sd").to_pylist(),
                               strict=True) if m == metric]
    assert sds and sds == pytest.approx([math.sqrt(2.5 * v) / weight] * len(sds))


def test_answers_before_a_strong_majority_signed_unmask_but_keep_their_noise_layers(make_federation):
    """Five institutions, quorum 2: three signatures let an institution answer (more than (n + c) / 2), but its
    excess noise layers come out only once more than (n + c + 1) / 2 have signed, counting the contributor that
    keeps its own draws as a colluder. Otherwise a split view (one roster of all five signed by the victim, one
    more and that contributor; another signed by the rest and that contributor) could show the victim a roster
    larger than the sum it ends up in, and have it remove noise that sum needs."""
    five = [(i, "csv") for i in ("alpha", "beta", "gamma", "delta", "epsilon")]
    fed = make_federation(noise=True, seed=3, quorum=2, institutions=five, entities=3)
    plan = plan_release(fed.config, START, END)
    assert (acknowledgements_needed(plan), layer_signatures_needed(plan)) == (3, 4)
    run_contributions(plan, fed.config.institutions)
    assert run_aggregate(plan)["status"] == "awaiting_unmask"
    first = fed.config.institutions[:3]
    waiting = run_unmask(plan, first)  # before the deadline they wait for a fourth signature
    assert all(a.path is None and a.layers_until and a.needed == 4 for a in waiting)
    text = fed.config_path.read_text()
    fed.config_path.write_text(text.replace("[federation]", '[federation]\ndeadline = "0"', 1))
    plan = plan_release(fed.config, START, END)
    answers = run_unmask(plan, first)  # past it, they answer keeping their layers
    assert all(a.path for a in answers)
    for a in answers:
        assert not unpack_envelope(read_bytes(a.path))[0].revealed_layers
    status = run_aggregate(plan)
    assert status["status"] == "aggregated"
    assert status["noise_variance"] == pytest.approx(5 * plan.params.share_variance)  # every layer kept
    assert set(status["noise_layers_kept"]) == {i.id for i in fed.config.institutions}


def test_no_two_rosters_can_both_be_answered_with_layers_revealed_under_one():
    """Honest institutions sign one roster each; the colluders and the contributor keeping its draws (c + 1) may
    sign both: a roster answered at all needs k = (n + c) // 2 + 1 signatures, one that removes layers
    k' = (n + c + 1) // 2 + 1, and k + k' > n + c + 1."""
    for institutions in range(2, 60):
        for colluding in range(institutions):
            k = (institutions + colluding) // 2 + 1
            k_layers = (institutions + colluding + 1) // 2 + 1
            assert k + k_layers > institutions + colluding + 1


def test_a_reveal_of_an_absurd_layer_is_kept_at_once_not_chained(make_federation):
    """A validly signed answer revealing layer 10^15: the level is checked before the seed chain is walked (it
    would have hashed 10^15 seeds, memory growing all the way), so the answer only keeps its layers."""
    fed = make_federation(noise=True, seed=5, quorum=2)
    plan = plan_release(fed.config, START, END)
    run_contributions(plan, fed.config.institutions)
    run_aggregate(plan)
    run_unmask(plan, fed.config.institutions)
    path = unmask_path(fed.config.exchange_path, plan.key, "beta")
    header, ciphertexts = unpack_envelope(read_bytes(path))
    _, seed = header.revealed_layers["beta"].split(":")
    forged = {"beta": f"{10**15}:{seed}"}
    write_bytes(
        path,
        pack_envelope(replace(header, revealed_layers=forged), ciphertexts,
                      signing_key=load_signing_key(fed.config, "beta")),
    )
    started = time.monotonic()
    status = run_aggregate(plan)
    assert time.monotonic() - started < 30
    assert status["status"] == "aggregated" and set(status["noise_layers_kept"]) == {"beta"}
    assert "revealed layer 1000000000000000" in status["noise_layers_kept"]["beta"]

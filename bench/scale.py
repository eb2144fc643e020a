"""Benchmark of double masking as federations grow: n simulated institutions in one process, each sealing a
contribution on the release's masking graph (privacy/masking_graph.py), a few dropping out, the unmask round, the
aggregator removing the masks, the key holder checking the aggregate and decrypting.

    .venv/bin/python -m bench.scale                      # n = 5, 20, 100, 500; writes bench/results/scale.json
    .venv/bin/python -m bench.scale --sizes 5,20 --absent 0.1

The layout is tiny (64 slots, one ciphertext) so that the HE work, the same at every n, does not hide the masking
costs. Reported per n: the graph (k, t), each envelope's bytes beyond its ciphertexts (header, shares, digests,
signature: what grows with the federation), the same for one envelope on the complete graph (n <= --complete-upto),
an answer's bytes in the unmask round, the aggregator's time (read and check every envelope, sum, check the
answers, rebuild and remove the masks) and the key holder's (the same two passes again, to check the aggregate
before any charge as pipelines/aggregate_envelope.py does, then decrypt). Targets: at most 64 KB beyond the
ciphertexts at n = 500; aggregator time linear in n (its time per institution at the largest n at most 1.5x the
time per institution at 100). Every run checks the decrypted sum against the plaintext sum of the included.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.unmask import Roster, absent_mask_sum, opened_shares, self_mask_sum, sparse_roster_problem
from privacy import he
from privacy.envelope import EnvelopeHeader, pack_envelope, payload_digest, signature_valid, unpack_envelope
from privacy.masking import add_mod, centred, generate_agreement_key, pairwise_mask
from privacy.masking_graph import MaskingGraph, dropout_failure_bound
from privacy.sharing import commitment, new_seed, self_mask, share_coordinates, share_pair_keys, share_seed
from privacy.signing import generate_signing_key

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
SLOTS = 64
MAX_COLLUDING = 2
TARGET_OVERHEAD_BYTES = 64 * 1024  # at n = 500
TARGET_LINEAR_RATIO = 1.5  # aggregator time per institution, largest n over n = 100
CONTEXT = b"r-bench-scale"


@dataclass(frozen=True)
class Party:
    id: str
    agreement: tuple[bytes, bytes]  # X25519 (private, public)
    signing: tuple[bytes, bytes]  # Ed25519 (private, public)
    vector: np.ndarray


def _header(kind: str, contributor: str, **fields: Any) -> EnvelopeHeader:
    return EnvelopeHeader(
        kind=kind,
        federation="bench",
        interval_start="2026-01-01T00:00:00+00:00",
        interval_end="2026-01-02T00:00:00+00:00",
        layout_digest="0" * 64,
        parameters_digest="0" * 64,
        slots=SLOTS,
        contributors=(contributor,),
        noise_variance=0.0,
        context_sha256="0" * 64,
        nonce=secrets.token_hex(16),
        created_at=datetime.now(UTC).isoformat(),
        reject_counts={},
        **fields,
    )


def seal(party: Party, graph: MaskingGraph, everyone: dict[str, bytes], public: Any) -> tuple[bytes, int]:
    """One institution's contribution on `graph`, as SealContribution builds it: (envelope, ciphertext bytes)."""
    peers = {peer: everyone[peer] for peer in graph.closed(party.id)}
    coordinates = None if graph.complete else share_coordinates(everyone)
    own = party.agreement[0]
    mask = pairwise_mask(party.id, own, peers, slots=SLOTS, modulus=he.PLAIN_MODULUS, context=CONTEXT)
    seed = new_seed()
    mask = (mask + self_mask(seed, slots=SLOTS, modulus=he.PLAIN_MODULUS, context=CONTEXT)) % he.PLAIN_MODULUS
    shares, digests = share_seed(
        seed,
        own_id=party.id,
        own_private=own,
        peers=peers,
        threshold=graph.threshold,
        context=CONTEXT,
        coordinates=coordinates,
    )
    pair_shares, pair_digests, pair_commitments = share_pair_keys(
        own_id=party.id,
        own_private=own,
        peers=peers,
        threshold=graph.threshold,
        context=CONTEXT,
        coordinates=coordinates,
    )
    ciphertexts = he.encrypt_vector(public, add_mod(party.vector, mask, he.PLAIN_MODULUS), residues=True)
    header = _header(
        "contribution",
        party.id,
        seed_commitment=commitment(seed, context=CONTEXT),
        seed_shares=shares,
        share_digests=digests,
        pair_commitments=pair_commitments,
        pair_shares=pair_shares,
        pair_share_digests=pair_digests,
    )
    envelope = pack_envelope(header, ciphertexts, signing_key=party.signing[0])
    empty = pack_envelope(_header("contribution", party.id), ciphertexts)  # the same ciphertexts, a bare header
    bare_header = len(pack_envelope(_header("contribution", party.id), []))
    return envelope, len(empty) - bare_header


def _first_pass(
    sealed: dict[str, tuple[bytes, int]], registry: dict[str, bytes], public: Any
) -> tuple[dict[str, EnvelopeHeader], list[bytes]]:
    """Read and check every contribution (its signature against the registry), and sum their ciphertexts."""
    headers, ciphertexts = {}, []
    for institution, (envelope, _) in sealed.items():
        header, cts = unpack_envelope(envelope, max_ciphertexts=1)
        if not signature_valid(header, registry[institution]):
            raise RuntimeError(f"{institution}'s signature does not verify")
        headers[institution] = header
        ciphertexts.append(cts)
    return headers, he.add_encrypted(public, ciphertexts)


def _second_pass(
    graph: MaskingGraph,
    headers: dict[str, EnvelopeHeader],
    total: list[bytes],
    answers: dict[str, bytes],
    registry: dict[str, bytes],
    roster: Roster,
    public: Any,
) -> list[bytes]:
    """Check the answers, rebuild the masks from their shares and remove them: the aggregate's ciphertexts."""
    opened = []
    for institution, envelope in answers.items():
        header, _ = unpack_envelope(envelope, max_ciphertexts=0)
        if not signature_valid(header, registry[institution]):
            raise RuntimeError(f"{institution}'s answer does not verify")
        opened.append(header)
    masks = self_mask_sum(graph, headers, opened, slots=SLOTS, context=CONTEXT)
    masks = (masks + absent_mask_sum(graph, headers, opened, roster.absent, slots=SLOTS, context=CONTEXT)) % (
        he.PLAIN_MODULUS
    )
    aggregate: list[bytes] = he.add_plain(public, total, centred(he.PLAIN_MODULUS - masks, he.PLAIN_MODULUS))
    return aggregate


def run_size(n: int, *, absent_rate: float, complete_upto: int, rng: np.random.Generator) -> dict[str, Any]:
    ids = [f"inst-{i:04d}" for i in range(n)]
    quorum = max(MAX_COLLUDING + 2, n // 2)
    graph = MaskingGraph.build(ids, context=CONTEXT, quorum=quorum, max_colluding=MAX_COLLUDING)
    secret_bytes, public_bytes = he.generate_keys()
    public, secret = he.load_public_context(public_bytes), he.load_secret_context(secret_bytes)
    parties = {i: Party(i, generate_agreement_key(), generate_signing_key(), rng.integers(0, 1000, SLOTS)) for i in ids}
    everyone = {i: p.agreement[1] for i, p in parties.items()}
    registry = {i: p.signing[1] for i, p in parties.items()}

    # A roster every honest institution would answer: a random absent set, redrawn if the checks refuse it.
    for _ in range(100):
        gone = set(rng.choice(ids, size=max(1, round(absent_rate * n)), replace=False).tolist())
        roster = Roster(tuple(sorted(set(ids) - gone)), tuple(sorted(gone)), "bench")
        if sparse_roster_problem(graph, roster, max_colluding=MAX_COLLUDING) is None:
            break
    else:
        raise RuntimeError(f"no answerable roster with {absent_rate:.0%} absent at n = {n}")

    started = time.perf_counter()
    sealed = {i: seal(parties[i], graph, everyone, public) for i in roster.included}
    seal_s = (time.perf_counter() - started) / len(sealed)
    overheads = [len(envelope) - ct_bytes for envelope, ct_bytes in sealed.values()]

    # The aggregator's first pass: read, check and sum every contribution.
    started = time.perf_counter()
    headers, total = _first_pass(sealed, registry, public)
    first_pass_s = time.perf_counter() - started

    # The unmask round: each included institution opens the shares its closed neighbourhood sealed for it.
    started = time.perf_counter()
    answers = {}
    for institution in roster.included:
        neighbourhood = {p: headers[p] for p in graph.closed(institution) if p in headers}
        revealed, revealed_pairs = opened_shares(
            graph, institution, parties[institution].agreement[0], everyone, neighbourhood, roster, context=CONTEXT
        )
        header = _header(
            "unmask",
            institution,
            absent=roster.absent,
            included=roster.included,
            revealed_shares=revealed,
            revealed_pair_shares=revealed_pairs,
        )
        answers[institution] = pack_envelope(header, [], signing_key=parties[institution].signing[0])
    answer_s = (time.perf_counter() - started) / len(answers)
    answer_bytes = [len(a) for a in answers.values()]

    # The aggregator's second pass: check the answers, rebuild and remove the masks.
    started = time.perf_counter()
    aggregate = _second_pass(graph, headers, total, answers, registry, roster, public)
    second_pass_s = time.perf_counter() - started

    # The key holder: recompute the aggregate from the same envelopes and answers (pipelines/aggregate_envelope.py
    # does this before any charge: the same two passes), compare, then decrypt.
    started = time.perf_counter()
    again_headers, again_total = _first_pass(sealed, registry, public)
    again = _second_pass(graph, again_headers, again_total, answers, registry, roster, public)
    if payload_digest(again) != payload_digest(aggregate):
        raise RuntimeError(f"n = {n}: the key holder's recomputed aggregate differs from the aggregator's")
    key_holder_check_s = time.perf_counter() - started
    started = time.perf_counter()
    result = he.decrypt_vector(secret, aggregate, SLOTS)
    key_holder_decrypt_s = time.perf_counter() - started
    expected = sum(parties[i].vector for i in roster.included)
    if not np.array_equal(result, expected):
        raise RuntimeError(f"n = {n}: the unmasked sum is wrong")

    complete_overhead = None
    if not graph.complete and n <= complete_upto:
        full = MaskingGraph.build(ids, context=CONTEXT, quorum=quorum, degree=n - 1)
        envelope, ct_bytes = seal(parties[ids[0]], full, everyone, public)
        complete_overhead = len(envelope) - ct_bytes
    aggregator_s = first_pass_s + second_pass_s
    return {
        "institutions": n,
        "quorum": quorum,
        "max_colluding": MAX_COLLUDING,
        "neighbours": graph.degree,
        "threshold": graph.threshold,
        "complete_graph": graph.complete,
        "absent": len(roster.absent),
        "colluders_to_split": graph.colluders_to_split(roster.included),
        "dropout_failure_bound_at_90pct": dropout_failure_bound(graph, present=0.9),
        "envelope_overhead_bytes_mean": float(np.mean(overheads)),
        "envelope_overhead_bytes_max": int(max(overheads)),
        "complete_graph_overhead_bytes": complete_overhead if not graph.complete else float(np.mean(overheads)),
        "ciphertext_bytes": int(next(iter(sealed.values()))[1]),
        "unmask_answer_bytes_mean": float(np.mean(answer_bytes)),
        "unmask_answer_bytes_max": int(max(answer_bytes)),
        "unmask_round_bytes_total": int(sum(answer_bytes)),
        "institution_seal_s": seal_s,
        "institution_answer_s": answer_s,
        "aggregator_s": aggregator_s,
        "aggregator_s_per_institution": aggregator_s / n,
        "aggregator_unmask_s": second_pass_s,
        "key_holder_s": key_holder_check_s + key_holder_decrypt_s,
        "key_holder_recompute_s": key_holder_check_s,
        "key_holder_decrypt_s": key_holder_decrypt_s,
        "exact": True,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5,20,100,500", help="comma-separated federation sizes")
    parser.add_argument("--absent", type=float, default=0.05, help="fraction of institutions that drop out")
    parser.add_argument("--complete-upto", type=int, default=100, help="measure a complete-graph envelope up to n")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)  # which institutions drop out, their vectors: not secrets
    runs = []
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        run = run_size(n, absent_rate=args.absent, complete_upto=args.complete_upto, rng=rng)
        runs.append(run)
        print(
            f"n={n:4d} k={run['neighbours']:3d} t={run['threshold']:3d} absent={run['absent']:3d}  "
            f"overhead {run['envelope_overhead_bytes_mean'] / 1024:7.1f} KB "
            f"(complete graph {_kb(run['complete_graph_overhead_bytes'])})  "
            f"answer {run['unmask_answer_bytes_mean'] / 1024:6.1f} KB  "
            f"aggregator {run['aggregator_s']:7.2f} s ({1000 * run['aggregator_s_per_institution']:5.1f} ms/inst)  "
            f"key holder {1000 * run['key_holder_s']:5.1f} ms  seal {1000 * run['institution_seal_s']:6.1f} ms/inst"
        )
    targets = _targets(runs)
    for name, check in targets.items():
        print(f"{name}: {check['value']} (target {check['target']}) {'met' if check['met'] else 'NOT met'}")
    report = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "slots": SLOTS,
        "absent_rate": args.absent,
        "runs": runs,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")
    return report


def _kb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024:.1f} KB"


def _targets(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_n = {r["institutions"]: r for r in runs}
    targets: dict[str, dict[str, Any]] = {}
    if 500 in by_n:
        worst = by_n[500]["envelope_overhead_bytes_max"]
        targets["overhead_bytes_at_500"] = {
            "value": worst,
            "target": f"<= {TARGET_OVERHEAD_BYTES}",
            "met": worst <= TARGET_OVERHEAD_BYTES,
        }
    largest = max(by_n)
    if 100 in by_n and largest > 100:
        ratio = by_n[largest]["aggregator_s_per_institution"] / by_n[100]["aggregator_s_per_institution"]
        targets[f"aggregator_per_institution_{largest}_over_100"] = {
            "value": round(ratio, 3),
            "target": f"<= {TARGET_LINEAR_RATIO}",
            "met": ratio <= TARGET_LINEAR_RATIO and math.isfinite(ratio),
        }
    return targets


if __name__ == "__main__":
    main()

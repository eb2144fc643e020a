"""The aggregator's checks of the institutions' envelopes, without Beam: the aggregator's DoFns (pipelines/aggregate.py)
run them, and so does the key holder when it recomputes the aggregate (pipelines/aggregate_envelope.py).

An envelope is its signer's (verified signature), never its file name's; and it counts only in its signer's own
place, `contributions/<institution>.fenv` (`unmask/<institution>.fenv` for an answer), because that is where the
institutions answering the roster read each included contribution. One filed under another institution's name
(two envelopes swapped by hand, say) is refused as misnamed, naming the file and both institutions, and the round
goes on without it: accepted under its signer's name instead, it would close a roster nobody can answer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

from fusion.errors import FusionError
from fusion.release.exchange import (
    EnvelopePlace,
    FileTooLarge,
    public_context_sha256,
    read_bounded,
    read_bytes,
    read_head,
)
from fusion.release.plan import ReleasePlan
from pipelines.unmask import Roster
from privacy import he
from privacy.envelope import (
    HEADER_PREFIX,
    EnvelopeError,
    EnvelopeHeader,
    PayloadMismatch,
    envelope_header,
    header_region_size,
    max_envelope_bytes,
    signature_valid,
    unpack_envelope,
)

#: An envelope that passed every check: (path, header, ciphertexts).
Opened = tuple[str, EnvelopeHeader, list[bytes]]

_LOADED: dict[tuple[str, str], tuple[bytes, Any]] = {}  # (path, digest) -> (bytes, context), per process


class PublicContext:
    """The exchange's public HE context by path and SHA-256: Beam pickles a few bytes instead of megabytes, and
    each worker process loads (and checks) it once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sha256 = public_context_sha256(path)

    def _load(self) -> tuple[bytes, Any]:
        key = (self.path, self.sha256)
        if key not in _LOADED:
            data = read_bytes(self.path)
            if hashlib.sha256(data).hexdigest() != self.sha256:
                raise FusionError(f"the public HE context {self.path} changed while the aggregator ran")
            _LOADED[key] = (data, he.load_public_context(data))
        return _LOADED[key]

    @property
    def context(self) -> Any:
        return self._load()[1]


class EnvelopeChecks:
    """The checks of one release's institution envelopes (contributions and, once `roster` is closed, the answers
    to it): `open(path)` gives ((kind, institution), (path, header, ciphertexts)), or a refusal
    ({"source", "institution", "reason"}, and "claimed" for one filed under another institution's name);
    `open_header(path)` checks the header alone."""

    def __init__(
        self, plan: ReleasePlan, public_context: PublicContext, registry: dict[str, bytes], roster: Roster | None
    ) -> None:
        self._plan = plan
        self._public_context = public_context
        self._registry = registry
        self._roster = roster
        self._ciphertexts = he.ciphertexts_for(plan.layout.slots)

    def open(self, path: str) -> tuple[tuple[str, str], Opened] | dict[str, str]:
        try:
            data = read_bounded(path, max_envelope_bytes(self._ciphertexts))
        except FileTooLarge as exc:  # not read: no envelope of this layout is that large
            return {"source": path, "institution": "", "reason": f"unreadable: {exc}"}
        try:
            header, ciphertexts = unpack_envelope(data, max_ciphertexts=self._ciphertexts)
        except PayloadMismatch:
            return {"source": path, "institution": "", "reason": "tampered"}
        except EnvelopeError as exc:
            return {"source": path, "institution": "", "reason": f"unreadable: {exc}"}
        refusal = self._judge(path, header)
        if refusal is None:
            reason = self._check_ciphertexts(header, ciphertexts)
            refusal = {"source": path, "institution": header.contributors[0], "reason": reason} if reason else None
        return refusal if refusal is not None else ((header.kind, header.contributors[0]), (path, header, ciphertexts))

    def open_header(self, path: str) -> tuple[tuple[str, str], EnvelopeHeader] | dict[str, str]:
        """`open` without reading the ciphertexts: the checks of the header alone (whose signature binds the
        payload's SHA-256), for a party that has the payload's use from elsewhere."""
        try:
            header = envelope_header(read_head(path, header_region_size(read_head(path, HEADER_PREFIX))))
        except EnvelopeError as exc:
            return {"source": path, "institution": "", "reason": f"unreadable: {exc}"}
        refusal = self._judge(path, header)
        return refusal if refusal is not None else ((header.kind, header.contributors[0]), header)

    def _judge(self, path: str, header: EnvelopeHeader) -> dict[str, str] | None:
        """The refusal of a readable envelope's header, or None: who signed it, where it lies, for what release."""
        institution = header.contributors[0] if header.contributors else ""
        refusal = {"source": path, "institution": institution}
        reason = self._check_signer(header)
        place = EnvelopePlace.of(path)
        if not reason and self._filed_as_another(place, header):
            # Before the release checks: whatever else is wrong with it, the audit says whose it is and where it lay.
            refusal["claimed"] = place.named
            reason = misnamed(place, header.kind, institution)
        reason = reason or self._check_release(header)
        return {**refusal, "reason": reason} if reason else None

    def _filed_as_another(self, place: EnvelopePlace, header: EnvelopeHeader) -> bool:
        """Whether a verified envelope lies in another institution's place, or in the folder of the other kind.
        (A file named after no institution, e.g. a copy, is judged with its signer's other envelopes.)"""
        own = EnvelopePlace.own(header.kind, header.contributors[0])
        registered = {i.id for i in self._plan.config.institutions}
        return place.folder != own.folder or (place.named != own.named and place.named in registered)

    def _check_signer(self, header: EnvelopeHeader) -> str:
        """The checks that establish who signed the envelope, and for which release."""
        plan = self._plan
        registered = {i.id for i in plan.config.institutions}
        if header.kind not in ("contribution", "unmask") or len(header.contributors) != 1:
            return "not_a_contribution"
        if header.federation != plan.key.federation:
            return "wrong_federation"
        if (header.interval_start, header.interval_end) != (
            plan.layout.start.isoformat(),
            plan.layout.end.isoformat(),
        ):
            return "wrong_interval"
        if header.layout_digest != plan.key.layout_digest or header.slots != plan.layout.slots:
            return "wrong_layout"
        if header.parameters_digest != plan.key.parameters_digest:
            return "wrong_parameters"
        if header.contributors[0] not in registered or header.contributors[0] not in self._registry:
            return "unregistered_institution"
        if not header.signature:
            return "unsigned"
        if not signature_valid(header, self._registry[header.contributors[0]]):
            return "bad_signature"
        return ""

    def _check_release(self, header: EnvelopeHeader) -> str:
        """The checks of a signed envelope against this release's public context and roster."""
        if header.context_sha256 != self._public_context.sha256:
            return "wrong_he_context"
        if header.kind == "contribution" and not self._sealed_variance(header.noise_variance):
            # Summed into the aggregate's header, a claim the key holder's error bars and its plausibility check
            # rest on: negative, it would fail the decode after the charge; NaN, it would disable the check.
            return "wrong_noise_variance"
        roster = self._roster
        if header.kind == "contribution" and roster is not None and header.contributors[0] in roster.absent:
            return "declared_absent"  # too late: its masks must keep it unreadable now
        if header.kind == "unmask":
            if roster is None or (tuple(sorted(header.included)), tuple(sorted(header.absent))) != (
                roster.included,
                roster.absent,
            ):
                return "wrong_roster"
            if header.contributors[0] not in roster.included:
                return "declared_absent"
        return ""

    def _sealed_variance(self, claimed: float) -> bool:
        """Whether a contribution's noise variance is the share every institution seals under this plan (with
        noise off, test mode, none or the share: a training round seals its share whatever the config says)."""
        share = self._plan.params.share_variance
        allowed = (share,) if self._plan.params.noise else (0.0, share)
        return math.isfinite(claimed) and any(math.isclose(claimed, a, rel_tol=1e-9, abs_tol=0.0) for a in allowed)

    def _check_ciphertexts(self, header: EnvelopeHeader, ciphertexts: list[bytes]) -> str:
        # An answer is revealed shares alone: the aggregator removes every mask itself.
        expected = 0 if header.kind == "unmask" else he.ciphertexts_for(self._plan.layout.slots)
        if len(ciphertexts) != expected:
            return "wrong_layout"
        sizes = he.ciphertext_sizes(self._plan.layout.slots) if expected else []
        context = self._public_context.context
        for data, size in zip(ciphertexts, sizes, strict=True):
            try:
                slots = he.check_ciphertext(context, data)
            except ValueError:
                return "unreadable_ciphertext"
            if slots != size:  # it would stop the sum of every envelope, the roster already closed on it
                return "wrong_layout"
        return ""


def misnamed(place: EnvelopePlace, kind: str, signer: str) -> str:
    """The reason an envelope signed by `signer` and filed at `place`, not in its own place, is refused."""
    return (
        f"misnamed: signed by {signer}, filed as {place.relative}; it counts only as "
        f"{EnvelopePlace.own(kind, signer).relative} (put it back there, then run `fusion aggregate` again)"
    )


def one_per_institution(
    kind: str, institution: str, envelopes: Iterable[Opened]
) -> tuple[Opened | None, list[dict[str, str]]]:
    """(the one of an institution's signed envelopes of `kind` that counts for it: the one in its own place, or
    None; the refusals of the others).

    Copies of it elsewhere (same nonce and payload) are replays, refused, so dropping a copy into the exchange
    cannot knock an institution out; with none in its own place, none counts (misnamed: the institutions answering
    the roster would not find it). Two different envelopes signed by one institution are ambiguous: all are
    refused as duplicates.
    """
    own = EnvelopePlace.own(kind, institution)
    ordered = sorted(envelopes, key=lambda e: (EnvelopePlace.of(e[0]) != own, e[0]))  # its own place first

    def refused(path: str, reason: str) -> dict[str, str]:
        place = EnvelopePlace.of(path)
        claimed = {} if place == own else {"claimed": place.named}
        return {"source": path, "institution": institution, **claimed, "reason": reason}

    if len({(h.nonce, h.payload_sha256) for _, h, _ in ordered}) > 1:
        return None, [refused(path, "duplicate") for path, _, _ in ordered]
    if EnvelopePlace.of(ordered[0][0]) != own:
        return None, [refused(path, misnamed(EnvelopePlace.of(path), kind, institution)) for path, _, _ in ordered]
    return ordered[0], [refused(path, "replayed") for path, _, _ in ordered[1:]]

"""Who signs what around the mechanisms, as listed in the federation's registry (registry.toml):

    [mechanism_operator]            # runs `fusion recommend`: signs every recommendation
    signing_key = "<hex>"
    retired_signing_keys = []       # earlier keys: what they signed still verifies

    [[authorities]]                 # decides: ratifies, overrides or rejects recommendations
    id = "grid-ops"
    regions = ["nc-triad-east"]     # the regions its decisions may cover ("*": all)
    kinds = ["dispatch", "pareto"]  # the kinds of recommendation it decides on
    threshold = 2                   # k of its n signers must sign the same decision for it to take effect
    [[authorities.signers]]
    id = "alice"
    signing_key = "<hex>"
    [[authorities.signers]]         # a key of alice's that a newer one replaced (`--overwrite`): it verifies
    id = "alice"                    # her decisions dated before retired_at, and signs nothing new
    signing_key = "<hex>"
    retired_at = "2026-01-02T18:00:00.000000Z"

    [[bidders]]                     # may bid in auctions
    id = "brighton"
    signing_key = "<hex>"

Each party makes its own key pair (`fusion mechanism-keys`); the private half stays in its own directory
(owner-only), the public half goes in the registry. Nothing here touches the federation's other keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fusion.api import load_mechanism_sections, read_private, write_mechanism_sections, write_private
from fusion.config.federation import Config
from fusion.errors import FusionError
from mechanisms.records import Kind, now, timestamp
from privacy.signing import generate_signing_key, public_key

OPERATOR_KEY = "operator-signing.key"
ALL_REGIONS = "*"


@dataclass(frozen=True)
class Signer:
    id: str
    key: bytes
    retired_at: datetime | None = None  # when a newer key replaced this one; None: the signer's current key


@dataclass(frozen=True)
class Authority:
    id: str
    regions: frozenset[str] | None  # None: every region
    kinds: frozenset[str]
    threshold: int
    signers: tuple[Signer, ...]  # each signer's current key
    retired: tuple[Signer, ...] = ()  # keys that newer ones replaced

    def signer(self, signer_id: str) -> Signer | None:
        return next((s for s in self.signers if s.id == signer_id), None)

    def holds(self, signer_id: str, key: bytes, at: datetime | None) -> bool:
        """Whether `key` is registered for `signer_id` at `at` (a decision's time): its current key, or one retired
        after `at`. So a rotated key's earlier decisions still verify, and it signs nothing dated later."""
        return any(
            s.id == signer_id and s.key == key
            and (s.retired_at is None or (at is not None and at < s.retired_at))
            for s in (*self.signers, *self.retired)
        )

    def out_of_scope(self, kind: str, regions: Sequence[str]) -> str | None:
        """Why a decision on a recommendation of `kind` covering `regions` is outside this authority's scope."""
        if kind not in self.kinds:
            return f"authority {self.id} decides on {', '.join(sorted(self.kinds))} recommendations, not {kind}"
        outside = sorted(set(regions) - self.regions) if self.regions is not None else []
        if outside:
            return f"authority {self.id}'s scope does not cover region(s) {', '.join(outside)}"
        return None


@dataclass(frozen=True)
class Parties:
    operator_keys: tuple[bytes, ...]  # current first, then retired
    authorities: dict[str, Authority]
    bidders: dict[str, bytes]


def load_parties(config: Config) -> Parties:
    """The registry's mechanism parties, validated; a malformed entry is refused naming it."""
    sections = load_mechanism_sections(config)
    where = config.registry_path
    try:
        operator = sections.get("mechanism_operator", {})
        keys = ([bytes.fromhex(operator["signing_key"])] if operator.get("signing_key") else []) + [
            bytes.fromhex(k) for k in operator.get("retired_signing_keys", [])
        ]
        authorities = {}
        for number, entry in enumerate(sections.get("authorities", [])):
            label = f"authorities[{number}]"
            regions = entry.get("regions", [ALL_REGIONS])
            kinds = entry.get("kinds", [k.value for k in Kind])
            unknown = sorted(set(kinds) - {k.value for k in Kind})
            if unknown:
                raise ValueError(f"{label}.kinds: unknown kinds {unknown} (known: {', '.join(Kind)})")
            threshold = entry.get("threshold", 1)
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
                raise ValueError(f"{label}.threshold: a positive whole number of signers")
            signers = [Signer(s["id"], bytes.fromhex(s["signing_key"]), _retired_at(s, f"{label}.signers"))
                       for s in entry.get("signers", [])]
            authorities[entry["id"]] = Authority(
                entry["id"], None if ALL_REGIONS in regions else frozenset(regions), frozenset(kinds), threshold,
                tuple(s for s in signers if s.retired_at is None), tuple(s for s in signers if s.retired_at),
            )
        bidders = {b["id"]: bytes.fromhex(b["signing_key"]) for b in sections.get("bidders", [])}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FusionError(f"the registry {where} has a malformed mechanisms entry: {exc}") from None
    return Parties(tuple(keys), authorities, bidders)


def _retired_at(entry: dict[str, Any], label: str) -> datetime | None:
    if "retired_at" not in entry:
        return None
    moment = datetime.fromisoformat(str(entry["retired_at"]).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{label}: retired_at {entry['retired_at']!r} has no time zone (Fusion writes UTC, ...Z)")
    return moment


def operator_key_file(config: Config) -> Path:
    return Path(config.resolve(_mechanisms(config).keys)) / OPERATOR_KEY


def _mechanisms(config: Config) -> Any:
    if config.mechanisms is None:
        raise FusionError(f"{config.base / 'federation.toml'}: no [mechanisms] block; add one naming the network "
                          "(see docs/mechanisms.md)")
    return config.mechanisms


def load_operator_key(config: Config) -> tuple[bytes, bytes]:
    """(private, public) of the operator's signing key; refused unless the public half is the registered one."""
    private = read_private(operator_key_file(config),
                           "the mechanisms operator's signing key (`fusion mechanism-keys --operator`)")
    public = public_key(private)
    registered = load_parties(config).operator_keys
    if not registered or registered[0] != public:
        raise FusionError(
            f"the operator's key {operator_key_file(config)} is not the one registered in {config.registry_path} "
            "as [mechanism_operator]; run `fusion mechanism-keys --operator` to create and register one"
        )
    return private, public


def create_operator_key(config: Config, *, overwrite: bool = False) -> Path:
    """Create the operator's Ed25519 key (mode 0600) and register it; a replaced key stays registered as retired,
    so the recommendations it signed still verify."""
    path = operator_key_file(config)
    public = _new_key(config, path, overwrite=overwrite)
    sections = load_mechanism_sections(config)
    operator = dict(sections.get("mechanism_operator", {}))
    retired = list(operator.get("retired_signing_keys", []))
    if operator.get("signing_key") and operator["signing_key"] not in retired:
        retired.append(operator["signing_key"])
    sections["mechanism_operator"] = {"signing_key": public.hex(), "retired_signing_keys": retired}
    write_mechanism_sections(config, sections)
    return path


def signer_key_file(config: Config, authority: str, signer: str, directory: str | None = None) -> Path:
    return Path(config.resolve(directory or "authority-keys")) / authority / f"{signer}.key"


def bidder_key_file(config: Config, bidder: str, directory: str | None = None) -> Path:
    return Path(config.resolve(directory or "bidder-keys")) / f"{bidder}.key"


def create_signer_key(
    config: Config, authority: str, signer: str, *, regions: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None, threshold: int | None = None, directory: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Create a signer's key for `authority` (registering the authority on its first signer) and register it.
    `regions`, `kinds` and `threshold`, when given, set the authority's scope and rule. A key it replaces stays
    registered as retired from now, so the decisions it signed before still verify."""
    unknown = sorted(set(kinds or ()) - {k.value for k in Kind})
    if unknown:
        raise FusionError(f"--kinds: unknown kinds {unknown}; choose from {', '.join(Kind)}")
    unknown = sorted(set(regions or ()) - set(config.regions) - {ALL_REGIONS})
    if unknown:
        raise FusionError(f"--regions: {unknown} are not regions of this federation ({', '.join(config.regions)})")
    if threshold is not None and threshold < 1:
        raise FusionError("--threshold: a decision needs at least 1 signature")
    path = signer_key_file(config, authority, signer, directory)
    public = _new_key(config, path, overwrite=overwrite)
    sections = load_mechanism_sections(config)
    entries = [dict(e) for e in sections.get("authorities", [])]
    entry = next((e for e in entries if e.get("id") == authority), None)
    if entry is None:
        entry = {"id": authority, "regions": [ALL_REGIONS], "kinds": [k.value for k in Kind], "threshold": 1,
                 "signers": []}
        entries.append(entry)
    if regions:
        entry["regions"] = list(regions)
    if kinds:
        entry["kinds"] = list(kinds)
    if threshold is not None:
        entry["threshold"] = threshold
    retired_at = timestamp(now())
    entry["signers"] = [
        {**s, "retired_at": retired_at} if s.get("id") == signer and "retired_at" not in s else s
        for s in entry.get("signers", [])
    ] + [{"id": signer, "signing_key": public.hex()}]
    sections["authorities"] = entries
    write_mechanism_sections(config, sections)
    return path


def create_bidder_key(config: Config, bidder: str, *, directory: str | None = None, overwrite: bool = False) -> Path:
    path = bidder_key_file(config, bidder, directory)
    public = _new_key(config, path, overwrite=overwrite)
    sections = load_mechanism_sections(config)
    bidders = [b for b in sections.get("bidders", []) if b.get("id") != bidder]
    sections["bidders"] = [*bidders, {"id": bidder, "signing_key": public.hex()}]
    write_mechanism_sections(config, sections)
    return path


def _new_key(config: Config, path: Path, *, overwrite: bool) -> bytes:
    from fusion.config.federation import _overlap

    for label, other in (("store", config.store_path), ("exchange", config.exchange_path)):
        if _overlap(str(path.parent), other):
            raise FusionError(f"{path.parent} overlaps federation.{label} ({other}), which other parties read; a "
                              "signing key stays in a private directory")
    if path.exists() and not overwrite:
        raise FusionError(f"{path} already exists; pass --overwrite to replace it (and re-register)")
    private, public = generate_signing_key()
    write_private(path, private)
    return public


def load_private(path: Path, what: str) -> tuple[bytes, bytes]:
    """(private, public) of a signing key file (refused if group or others can read it)."""
    private = read_private(path, what)
    if len(private) != 32:
        raise FusionError(f"{path} is not an Ed25519 signing key (32 bytes); it holds {len(private)} bytes")
    return private, public_key(private)


__all__ = [
    "ALL_REGIONS",
    "Authority",
    "Parties",
    "Signer",
    "create_bidder_key",
    "create_operator_key",
    "create_signer_key",
    "load_operator_key",
    "load_parties",
    "load_private",
]

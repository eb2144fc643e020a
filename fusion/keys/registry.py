"""Who may contribute and who speaks for the federation: institutions' signing keys, the aggregator's, the key
holder's, and the registry of their public halves.

Each institution creates its own Ed25519 key pair (`fusion keys --institution ID`); the private key stays in
its key directory, owner-readable only, and the public half is entered in the federation's registry (a TOML
file the operator distributes). The aggregator accepts only envelopes signed by a registered key; the key
holder decrypts only aggregates the registered aggregator signed, and signs every release it publishes, so
readers can check the store against the registry (`fusion verify`).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import secrets
import stat
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fusion.config.federation import Config
from fusion.errors import FusionError
from privacy.masking import generate_agreement_key
from privacy.signing import generate_signing_key

SIGNING_KEY = "signing.key"
#: The key holder's, a name of its own: a key directory shared by mistake with another role never hands it theirs.
RELEASE_SIGNING_KEY = "release-signing.key"
AGREEMENT_KEY = "agreement.key"
#: The length of every key, private or public, that the registry and the key files hold (Ed25519, X25519).
KEY_BYTES = 32
#: The `[key_holder]` field holding the SHA-256 of the federation's public HE context.
HE_CONTEXT_FIELD = "he_context_sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def write_private(path: Path, data: bytes) -> None:
    """Create a secret file owner-readable only (0600), in a directory only its owner can enter (0700).

    Written to a new owner-only sibling, then renamed over `path`: replacing a file that was readable by
    others never exposes the new secret through the old file's mode, and a crash leaves the old key or the
    new one, never half of one."""
    path = path.resolve()  # a key symlinked onto a secrets volume is rotated there, not beside the link
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    pending = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(pending, path)
    finally:
        pending.unlink(missing_ok=True)


def read_private(path: Path, what: str) -> bytes:
    """Read a secret file, refusing one that group or others can access."""
    if not path.exists():
        raise FusionError(f"{what} is missing ({path})")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FusionError(
            f"{path} is accessible to group or others (mode {stat.filemode(mode)}); run `chmod 600 {path}`"
        )
    return path.read_bytes()


def _read_private_key(path: Path, what: str) -> bytes:
    """A raw 32-byte private key (Ed25519 or X25519) from an owner-only file, refusing a file of another length
    (truncated, or not a key), which would otherwise fail deep inside a pipeline without naming the file."""
    key = read_private(path, what)
    if len(key) != KEY_BYTES:
        raise FusionError(
            f"{path} ({what}) holds {len(key)} bytes, not a raw {KEY_BYTES}-byte key; restore the file from a "
            "backup, or create a new key with `fusion keys ... --overwrite` (which registers it anew)"
        )
    return key


def signing_key_file(config: Config, institution_id: str) -> Path:
    return Path(config.institution_keys_path(config.institution(institution_id))) / SIGNING_KEY


@dataclass(frozen=True)
class _Registry:
    institutions: dict[str, dict[str, bytes]]  # id -> {signing, agreement} public keys
    aggregator: bytes | None  # the aggregator's signing public key
    key_holder: bytes | None  # the key holder's signing public key (it signs releases)
    retired: tuple[bytes, ...] = ()  # the key holder's earlier signing keys: releases they signed still verify
    unsigned: tuple[str, ...] = ()  # releases published before the key holder had a key (nothing to verify)
    unsigned_rounds: tuple[str, ...] = ()  # training rounds committed before Fusion signed rounds (nothing to verify)
    # The SHA-256 (hex) of the public HE context the key holder published: the exchange's copy is checked against
    # it before anyone encrypts or sums under it (anyone who can write the exchange could swap it for their own).
    he_context: str | None = None
    # The mechanisms' parties (MECHANISM_SECTIONS, as parsed; mechanisms/authorities.py validates them): kept as
    # they are when the registry is rewritten.
    mechanisms: dict[str, Any] = field(default_factory=dict)


#: The last registry parsed by this process, with the bytes it was parsed from: a release reads the registry a few
#: dozen times (every envelope checked, every key looked up), and reading the small file again costs far less than
#: parsing it. Keyed by the bytes themselves, so a rewritten registry, however soon after and by whoever, is
#: parsed again.
_PARSED: dict[str, tuple[bytes, _Registry]] = {}
_PARSED_LOCK = threading.Lock()


def _read(config: Config) -> _Registry:
    path = Path(config.registry_path)
    try:
        text = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return _Registry({}, None, None)
    key = str(path.absolute())
    with _PARSED_LOCK:
        cached = _PARSED.get(key)
    if cached is not None and cached[0] == text:
        return cached[1]
    registry = _parse(path, text.decode())
    with _PARSED_LOCK:
        _PARSED.clear()  # one registry per federation: keep the latest only
        _PARSED[key] = (text, registry)
    return registry


def _parse(path: Path, text: str) -> _Registry:
    try:
        doc = tomllib.loads(text)
        institutions = {
            entry["id"]: {
                "signing": _public_key(entry["signing_key"], f"institutions[{entry['id']}].signing_key"),
                "agreement": _public_key(entry["agreement_key"], f"institutions[{entry['id']}].agreement_key"),
            }
            for entry in doc.get("institutions", [])
        }
        aggregator = doc.get("aggregator", {}).get("signing_key")
        key_holder = doc.get("key_holder", {}).get("signing_key")
        retired = doc.get("key_holder", {}).get("retired_signing_keys", [])
        unsigned = doc.get("key_holder", {}).get("unsigned_releases", [])
        if not all(isinstance(r, str) for r in unsigned):
            raise TypeError("key_holder.unsigned_releases must list release ids")
        unsigned_rounds = doc.get("key_holder", {}).get("unsigned_rounds", [])
        if not all(isinstance(r, str) for r in unsigned_rounds):
            raise TypeError("key_holder.unsigned_rounds must list training round ids")
        he_context = doc.get("key_holder", {}).get(HE_CONTEXT_FIELD)
        if he_context is not None and not _SHA256_HEX.fullmatch(str(he_context)):
            raise ValueError(f"key_holder.{HE_CONTEXT_FIELD} must be a SHA-256 in hex (64 characters 0-9a-f)")
        return _Registry(
            institutions,
            _public_key(aggregator, "aggregator.signing_key") if aggregator else None,
            _public_key(key_holder, "key_holder.signing_key") if key_holder else None,
            tuple(_public_key(k, "key_holder.retired_signing_keys") for k in retired),
            tuple(unsigned),
            tuple(unsigned_rounds),
            he_context,
            {name: doc[name] for name in MECHANISM_SECTIONS if name in doc},
        )
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FusionError(f"the registry {path} is malformed: {exc}") from None


def _public_key(text: str, field: str) -> bytes:
    """A registered Ed25519 or X25519 public key: 32 bytes in hex. A key of another length would pass into the
    signature checks and mask derivations and fail there, deep in a pipeline, without naming the registry."""
    try:
        key = bytes.fromhex(text)
    except (ValueError, TypeError):
        raise ValueError(f"{field} is not hex") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{field} is {len(key)} bytes; a key is {KEY_BYTES} ({2 * KEY_BYTES} hex digits)")
    return key


def _entries(config: Config) -> dict[str, dict[str, bytes]]:
    return _read(config).institutions


def load_registry(config: Config) -> dict[str, bytes]:
    """institution id -> raw Ed25519 public key, from the registry file (empty if there is none yet)."""
    return {institution: keys["signing"] for institution, keys in _entries(config).items()}


def load_agreement_keys(config: Config) -> dict[str, bytes]:
    """institution id -> raw X25519 public key (for pairwise masks) of every configured institution."""
    entries = _entries(config)
    missing = sorted(i.id for i in config.institutions if i.id not in entries)
    if missing:
        raise FusionError(
            f"institutions {missing} are not in the registry {config.registry_path}; each runs "
            "`fusion keys --institution ID` first"
        )
    return {i.id: entries[i.id]["agreement"] for i in config.institutions}


def _update_registry(config: Config, change: Callable[[_Registry], _Registry]) -> None:
    """Rewrite the registry as `change` makes it from the current one, under an exclusive lock (a `.lock` file
    beside it): parties registering at the same time, each reading the registry and writing it back with its own
    entry, would otherwise keep only the last writer's."""
    path = Path(config.registry_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        _write_registry(config, change(_read(config)))
    finally:
        os.close(descriptor)  # releases the lock


def _write_registry(config: Config, registry: _Registry) -> None:
    lines = ["# Fusion federation registry: institutions that may contribute, and their public keys"]
    lines += ["# (Ed25519 to verify their envelopes, X25519 for pairwise masks), the aggregator's (it signs"]
    lines += ["# aggregates) and the key holder's (it signs releases)."]
    if registry.aggregator is not None:
        lines += ["", "[aggregator]", f'signing_key = "{registry.aggregator.hex()}"']
    if registry.key_holder is not None or registry.he_context is not None:
        lines += ["", "[key_holder]"]
    if registry.key_holder is not None:
        lines += [f'signing_key = "{registry.key_holder.hex()}"']
        if registry.retired:
            lines += [f"retired_signing_keys = [{', '.join(repr(k.hex()) for k in registry.retired)}]"]
        if registry.unsigned:
            lines += [f"unsigned_releases = [{', '.join(repr(r) for r in registry.unsigned)}]"]
        if registry.unsigned_rounds:
            lines += [f"unsigned_rounds = [{', '.join(repr(r) for r in registry.unsigned_rounds)}]"]
    if registry.he_context is not None:
        lines += [f'{HE_CONTEXT_FIELD} = "{registry.he_context}"']
    for institution, entry in sorted(registry.institutions.items()):
        lines += [
            "",
            "[[institutions]]",
            f'id = "{institution}"',
            f'signing_key = "{entry["signing"].hex()}"',
            f'agreement_key = "{entry["agreement"].hex()}"',
        ]
    lines += _mechanism_lines(registry.mechanisms)
    path = Path(config.registry_path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        temporary.write_text("\n".join(lines) + "\n")
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


#: The registry's sections for the mechanisms (mechanisms/authorities.py): the operator who signs recommendations,
#: the authorities who decide on them (their signers' keys, scope and threshold) and the bidders of auctions.
MECHANISM_SECTIONS = ("mechanism_operator", "authorities", "bidders")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"a registry value of type {type(value).__name__} cannot be written")


def _mechanism_lines(sections: dict[str, Any]) -> list[str]:
    """The mechanism sections as TOML: a table of values, or an array of tables whose entries may hold one level
    of arrays of tables (an authority's signers)."""
    lines: list[str] = []
    for name in MECHANISM_SECTIONS:
        section = sections.get(name)
        if isinstance(section, dict):
            lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in section.items())]
        for entry in section if isinstance(section, list) else ():
            lines += ["", f"[[{name}]]"]
            nested = {k: v for k, v in entry.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
            lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items() if k not in nested]
            for key, items in nested.items():
                for item in items:
                    lines += [f"[[{name}.{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in item.items())]
    return lines


def load_mechanism_sections(config: Config) -> dict[str, Any]:
    """The registry's mechanism sections as parsed (empty where absent); mechanisms/authorities.py reads them."""
    return copy.deepcopy(_read(config).mechanisms)  # the parsed registry is shared (cached): callers get their own


def write_mechanism_sections(config: Config, sections: dict[str, Any]) -> None:
    """Replace the registry's mechanism sections, keeping everything else in it."""
    unknown = sorted(set(sections) - set(MECHANISM_SECTIONS))
    if unknown:
        raise ValueError(f"not mechanism sections of the registry: {unknown}")
    _update_registry(config, lambda registry: replace(registry, mechanisms=dict(sections)))


def create_institution_keys(config: Config, institution_id: str, *, overwrite: bool = False) -> Path:
    """Create an institution's signing and key-agreement keys (mode 0600) and register their public halves."""
    key_file = signing_key_file(config, institution_id)
    if key_file.exists() and not overwrite:
        raise FusionError(f"{key_file} already exists; pass --overwrite to replace it (and re-register)")
    private, public = generate_signing_key()
    agreement_private, agreement_public = generate_agreement_key()
    write_private(key_file, private)
    write_private(key_file.parent / AGREEMENT_KEY, agreement_private)
    entry = {"signing": public, "agreement": agreement_public}
    _update_registry(
        config, lambda registry: replace(registry, institutions={**registry.institutions, institution_id: entry})
    )
    return key_file


def aggregator_key_file(config: Config) -> Path:
    return Path(config.aggregator_keys_path) / SIGNING_KEY


def _new_signing_key(key_file: Path, *, overwrite: bool) -> bytes:
    """Create an Ed25519 key at `key_file` (mode 0600), refusing to replace one unless `overwrite`; returns its
    public half, for the caller to register."""
    if key_file.exists() and not overwrite:
        raise FusionError(f"{key_file} already exists; pass --overwrite to replace it (and re-register)")
    private, public = generate_signing_key()
    write_private(key_file, private)
    return public


def create_aggregator_key(config: Config, *, overwrite: bool = False) -> Path:
    """Create the aggregator's signing key (mode 0600) and register its public half."""
    key_file = aggregator_key_file(config)
    public = _new_signing_key(key_file, overwrite=overwrite)
    _update_registry(config, lambda registry: replace(registry, aggregator=public))
    return key_file


def load_aggregator_signing_key(config: Config) -> bytes:
    return _read_private_key(aggregator_key_file(config), "the aggregator's signing key (`fusion keys --aggregator`)")


def load_aggregator_public_key(config: Config) -> bytes:
    """The registered aggregator's Ed25519 public key; the key holder decrypts only aggregates it signed."""
    aggregator = _read(config).aggregator
    if aggregator is None:
        raise FusionError(
            f"no aggregator is registered in {config.registry_path}; the aggregator runs `fusion keys --aggregator`"
        )
    return aggregator


def load_signing_key(config: Config, institution_id: str) -> bytes:
    return _read_private_key(signing_key_file(config, institution_id), f"institution {institution_id}'s signing key")


def load_agreement_key(config: Config, institution_id: str) -> bytes:
    path = signing_key_file(config, institution_id).parent / AGREEMENT_KEY
    return _read_private_key(path, f"institution {institution_id}'s key-agreement key")


def key_holder_signing_key_file(config: Config) -> Path:
    """The key holder's release-signing key, beside its HE secret key."""
    return Path(config.keys_path) / RELEASE_SIGNING_KEY


def create_key_holder_key(config: Config, *, published: Iterable[str] = (), overwrite: bool = False) -> Path:
    """Create the key holder's release-signing key (mode 0600) and register its public half. The first key of a
    federation that already published releases (`published`, their ids) registers them as unsigned, the only
    releases `fusion verify` accepts without a signature; a replaced key stays registered as retired."""
    key_file = key_holder_signing_key_file(config)
    public = _new_signing_key(key_file, overwrite=overwrite)
    unsigned_if_first = tuple(sorted(set(published)))

    def registered(registry: _Registry) -> _Registry:
        retired = registry.retired + ((registry.key_holder,) if registry.key_holder is not None else ())
        unsigned = registry.unsigned if registry.key_holder is not None else unsigned_if_first
        return replace(registry, key_holder=public, retired=tuple(dict.fromkeys(retired)), unsigned=unsigned)

    _update_registry(config, registered)
    return key_file


def load_key_holder_signing_key(config: Config) -> bytes:
    return _read_private_key(
        key_holder_signing_key_file(config),
        "the key holder's release-signing key (`fusion keys --release-signing`, once, by the key holder)",
    )


def load_unsigned_releases(config: Config) -> frozenset[str]:
    """Releases published before the key holder had a signing key, as registered with its first key."""
    return frozenset(_read(config).unsigned)


def register_unsigned_rounds(config: Config, rounds: Iterable[str]) -> tuple[str, ...]:
    """Register training rounds committed by a Fusion from before rounds were signed (`rounds`: the ids of the
    store's rounds whose audit record holds no signature, fusion.store.verification.unsigned_rounds) as unsigned,
    which `fusion verify` then reports `legacy`; returns the ids newly registered. Refused before the key holder
    has a registered signing key: there is nothing to verify against, and no `[key_holder]` to record them in."""
    if not load_key_holder_public_keys(config):
        raise FusionError(
            f"no key holder signing key is registered in {config.registry_path}: the key holder runs "
            "`fusion keys --release-signing` first"
        )
    added: list[str] = []

    def registered(registry: _Registry) -> _Registry:
        added[:] = sorted(set(rounds) - set(registry.unsigned_rounds))
        return replace(registry, unsigned_rounds=tuple(sorted({*registry.unsigned_rounds, *added})))

    _update_registry(config, registered)
    return tuple(added)


def load_unsigned_rounds(config: Config) -> frozenset[str]:
    """Training rounds committed before Fusion signed rounds, as the key holder registered them."""
    return frozenset(_read(config).unsigned_rounds)


def require_registry(config: Config) -> None:
    """Refuse a reader that checks the store against the registry where the registry file is missing. Without it
    no key is registered, which readers take as a federation whose key holder signs nothing (every release read as
    it stands): a registry left behind when a store was copied, or removed, must not turn the checks off."""
    path = Path(config.registry_path)
    if not path.exists():
        raise FusionError(
            f"the registry {path} is missing: the store's releases cannot be checked against the keys it registers, "
            "so none is taken as verified; copy the federation's registry.toml there (the key holder and the "
            "operator share it) or point federation.registry at it"
        )


def load_key_holder_public_keys(config: Config) -> tuple[bytes, ...]:
    """The key holder's registered Ed25519 public keys, current first, then the retired ones (a rotated key's
    releases still verify); empty when its key holder has not created one yet."""
    registry = _read(config)
    return ((registry.key_holder,) if registry.key_holder is not None else ()) + registry.retired


def register_he_context(config: Config, digest: str) -> None:
    """Record the SHA-256 of the public HE context the key holder published, which institutions and the aggregator
    check the exchange's copy against."""
    _update_registry(config, lambda registry: replace(registry, he_context=digest))


def check_he_context(config: Config, digest: str) -> None:
    """Refuse a public HE context (by its SHA-256) other than the one the key holder registered: whoever can write
    the exchange could otherwise have every institution encrypt under a context whose secret key it holds."""
    registered = _read(config).he_context
    if registered is None:
        raise FusionError(
            f"the registry {config.registry_path} records no digest of the federation's public HE context "
            f"([key_holder] {HE_CONTEXT_FIELD}), so the exchange's copy cannot be trusted: the key holder runs "
            "`fusion keys --register-context` (a registry written before Fusion checked the context) and shares the "
            "registry again"
        )
    if digest != registered:
        raise FusionError(
            f"the public HE context in the exchange ({digest[:12]}...) is not the one the key holder registered in "
            f"{config.registry_path} ({registered[:12]}...): nothing is encrypted or summed under it. Use the "
            "registry the key holder wrote last; if it is current, someone replaced the exchange's he_public.ctx: "
            "the key holder puts back the one it published (`fusion keys --register-context` checks it)"
        )

"""The key holder's keys: the HE keys (generated once, secret half kept owner-readable only, public half
published) and its release-signing key (registered)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fusion.config.federation import Config
from fusion.errors import FusionError
from fusion.keys.registry import (
    check_he_context,
    create_aggregator_key,
    create_institution_keys,
    create_key_holder_key,
    key_holder_signing_key_file,
    read_private,
    register_he_context,
    write_private,
)
from fusion.release.exchange import SECRET_CONTEXT, exists, public_context_path, read_bytes, write_bytes
from fusion.store.delta import Store
from privacy import he

PUBLIC_DIGEST = "he_public.sha256"


def secret_key_file(config: Config) -> Path:
    return Path(config.keys_path) / SECRET_CONTEXT


def create_federation_keys(config: Config, institutions: Iterable[str] | None = None) -> None:
    """Every role's keys of a federation whose parties all run on this machine (the demo, benchmarks, tests): the
    key holder's (`create_keys`), the aggregator's, and each institution's (the config's, unless named)."""
    create_keys(config)
    create_aggregator_key(config)
    for institution in [i.id for i in config.institutions] if institutions is None else institutions:
        create_institution_keys(config, institution)


def create_keys(config: Config, *, overwrite: bool = False) -> tuple[Path, str]:
    """Generate BFV keys: the secret context under `keys` (mode 0600), the public one in the exchange, its SHA-256
    in the registry (what institutions and the aggregator check the exchange's copy against); and the
    release-signing key, if the key holder has none (re-created HE keys keep it: readers go on verifying).

    Refuses, unless `overwrite`, where keys were published already, even when the secret key is missing: keys
    re-created then leave every pending interval undecryptable (an institution seals an interval once)."""
    secret_file = secret_key_file(config)
    digest_file = secret_file.parent / PUBLIC_DIGEST
    public_path = public_context_path(config.exchange_path)
    if not overwrite:
        if secret_file.exists():
            raise FusionError(
                f"{secret_file} already exists; keys are created once per federation "
                "(pass --overwrite to replace them; envelopes sealed under the old keys are then refused)"
            )
        published = [str(digest_file)] if digest_file.exists() else []
        if exists(public_path):
            published.append(public_path)
        if published:
            raise FusionError(
                f"this federation's HE keys were published already ({', '.join(published)}): re-creating HE keys "
                "abandons every pending interval (envelopes sealed under the old public context can never be "
                f"decrypted); restore the secret key instead ({secret_file}, from the key holder's backup). Only "
                "if it is lost for good, pass --overwrite"
            )
    secret, public = he.generate_keys()
    write_private(secret_file, secret)
    digest = hashlib.sha256(public).hexdigest()
    digest_file.write_text(digest)
    write_bytes(public_path, public)
    if not key_holder_signing_key_file(config).exists():
        create_key_holder_key(config, published=Store(config.store_path).release_ids())
    register_he_context(config, digest)
    return secret_file, public_path


def register_published_context(config: Config) -> str:
    """Record in the registry the SHA-256 of the public HE context this key holder published (a federation whose
    registry predates the record), once the exchange's copy is checked to be that context; returns the digest."""
    digest = published_context_digest(config)
    public_path = public_context_path(config.exchange_path)
    if hashlib.sha256(load_public_context_bytes(config)).hexdigest() != digest:
        raise FusionError(
            f"the public HE context in the exchange ({public_path}) is not the one this key holder published "
            f"(SHA-256 {digest}, in {secret_key_file(config).parent / PUBLIC_DIGEST}): someone replaced it. Put "
            "back the he_public.ctx published with the secret key, then run this again"
        )
    register_he_context(config, digest)
    return digest


def published_context_digest(config: Config) -> str:
    """The SHA-256 of the public context this key holder published (recorded at `fusion keys`)."""
    path = secret_key_file(config).parent / PUBLIC_DIGEST
    if not path.exists():
        raise FusionError(
            f"{path} is missing; restore it (and the HE secret key beside it) from the key holder's backup"
        )
    return path.read_text().strip()


def load_public_context_bytes(config: Config) -> bytes:
    """The exchange's public HE context, as published: unchecked (`register_published_context` checks it)."""
    path = public_context_path(config.exchange_path)
    try:
        return read_bytes(path)
    except FusionError:
        raise FusionError(
            f"the federation's public HE context is missing ({path}); the key holder runs `fusion keys` first"
        ) from None


def load_registered_public_context_bytes(config: Config) -> bytes:
    """The exchange's public HE context, refused unless it is the one the key holder registered."""
    data = load_public_context_bytes(config)
    check_he_context(config, hashlib.sha256(data).hexdigest())
    return data


def load_secret_context_bytes(config: Config) -> bytes:
    """Only the key holder's release step calls this. Refuses a key file others can read."""
    path = secret_key_file(config)
    if not path.exists():
        raise FusionError(
            f"the HE secret key is missing ({path}); run this as the key holder, with its `keys` directory, or "
            "restore the key from the key holder's backup (`fusion keys` would not recover it: new keys cannot "
            "decrypt what was sealed under the published ones)"
        )
    return read_private(path, "the HE secret key")


#: Encrypted under the published public context and decrypted with the secret one: they agree only if the secret
#: key is the one whose public half the institutions seal under.
_PROBE = np.array([271_828, -314_159], dtype=np.int64)


def load_checked_secret_context(config: Config) -> Any:
    """The key holder's secret HE context (a TenSEAL context), checked before anything is charged: the file
    parses, and it decrypts what the published public context (the one `published_context_digest` names)
    encrypts. A key holder whose secret key is missing, damaged or another federation's could otherwise spend
    budget on an aggregate it cannot decrypt. Raises FusionError naming the file and the fix."""
    path = secret_key_file(config)
    secret_bytes = load_secret_context_bytes(config)  # missing, or readable by others: its own message
    try:
        context = he.load_secret_context(secret_bytes)
    except (ValueError, RuntimeError, TypeError) as exc:  # TenSEAL: "failed to parse stream", or a public context
        raise FusionError(
            f"the HE secret key {path} is unreadable ({exc}); restore the key holder's keys from their backup "
            "(re-created keys cannot decrypt what was sealed under the published ones)"
        ) from None
    public_bytes = load_public_context_bytes(config)
    if hashlib.sha256(public_bytes).hexdigest() != published_context_digest(config):
        raise FusionError(
            f"the public HE context in the exchange ({public_context_path(config.exchange_path)}) is not the one "
            f"this key holder published; restore it (the key holder's keys and {PUBLIC_DIGEST} go together)"
        )
    probe = he.encrypt_vector(he.load_public_context(public_bytes), _PROBE)
    if not np.array_equal(he.decrypt_vector(context, probe, _PROBE.size), _PROBE):
        raise FusionError(
            f"the HE secret key {path} does not belong to the public context this key holder published (keys "
            "copied from another federation, or re-created without publishing); restore the key holder's keys"
        )
    return context

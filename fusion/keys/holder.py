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
    create_aggregator_key,
    create_institution_keys,
    create_key_holder_key,
    key_holder_signing_key_file,
    read_private,
    write_private,
)
from fusion.release.exchange import SECRET_CONTEXT, public_context_path, read_bytes, write_bytes
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
    """Generate BFV keys: the secret context under `keys` (mode 0600), the public one in the exchange; and the
    release-signing key, if the key holder has none (re-created HE keys keep it: readers go on verifying)."""
    secret_file = secret_key_file(config)
    if secret_file.exists() and not overwrite:
        raise FusionError(
            f"{secret_file} already exists; keys are created once per federation "
            "(pass --overwrite to replace them; envelopes sealed under the old keys are then refused)"
        )
    secret, public = he.generate_keys()
    write_private(secret_file, secret)
    (secret_file.parent / PUBLIC_DIGEST).write_text(hashlib.sha256(public).hexdigest())
    public_path = public_context_path(config.exchange_path)
    write_bytes(public_path, public)
    if not key_holder_signing_key_file(config).exists():
        create_key_holder_key(config, published=Store(config.store_path).release_ids())
    return secret_file, public_path


def published_context_digest(config: Config) -> str:
    """The SHA-256 of the public context this key holder published (recorded at `fusion keys`)."""
    path = secret_key_file(config).parent / PUBLIC_DIGEST
    if not path.exists():
        raise FusionError(f"{path} is missing; re-create the federation's keys with `fusion keys`")
    return path.read_text().strip()


def load_public_context_bytes(config: Config) -> bytes:
    path = public_context_path(config.exchange_path)
    try:
        return read_bytes(path)
    except FusionError:
        raise FusionError(
            f"the federation's public HE context is missing ({path}); the key holder runs `fusion keys` first"
        ) from None


def load_secret_context_bytes(config: Config) -> bytes:
    """Only the key holder's release step calls this. Refuses a key file others can read."""
    path = secret_key_file(config)
    if not path.exists():
        raise FusionError(f"the HE secret key is missing ({path}); run `fusion keys` as the key holder")
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

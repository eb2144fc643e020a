"""What a reader of the store may trust: the store's releases checked against the key holder's release-signing keys
in the registry (public keys only). What `fusion verify` reports (`fusion.api.verify` re-exports `verify`), and the
releases a reader that trusts only signed releases leaves out (`unverified_releases`: forecasting/, the mechanisms
and the dashboard read only the others). Readers reach it here, beside the store's read surface
(fusion.store.access), never through fusion.keys."""

from __future__ import annotations

from pathlib import Path

from fusion.config.federation import Config, load_config
from fusion.errors import NoReleaseSigningKey
from fusion.keys.registry import (
    load_key_holder_public_keys,
    load_unsigned_releases,
    load_unsigned_rounds,
    require_registry,
)
from fusion.store.delta import Store
from fusion.store.verification import GOOD, ReleaseCheck, verify_releases


def verify(config: Config | str | Path, *, release_id: str | None = None, seen: int = 0) -> list[ReleaseCheck]:
    """What `fusion verify` reports on the releases: each (or `release_id`) checked against the key holder's
    registered signing keys, a list of fusion.store.verification.ReleaseCheck; `seen`: the highest sequence number
    the caller saw before (a newest release removed whole is then `missing`). Reads the store and the registry only;
    NoReleaseSigningKey when no key holder signing key is registered (nothing can be verified), but a FusionError
    naming the registry where its file is missing and the store holds releases (fusion.keys.registry.require_registry:
    a registry gone missing is no federation without a signing key); StoreUnreadable when a data file of a table it
    reads is damaged or missing (fusion.store.delta.Store.read)."""
    cfg = config if isinstance(config, Config) else load_config(config, check_release=False)
    keys = load_key_holder_public_keys(cfg)
    store = Store(cfg.store_path)
    if not keys:
        if store.data_files("releases"):  # a federation not set up yet has no registry, and nothing to check
            require_registry(cfg)
        raise NoReleaseSigningKey(
            f"no key holder signing key is registered in {cfg.registry_path}: nothing can be verified (the key "
            "holder's `fusion keys --release-signing` registers one)",
            public="no key holder signing key is registered in this federation's registry: nothing can be verified "
            "(the key holder's `fusion keys --release-signing` registers one)",
        )
    return verify_releases(store, keys, unsigned=load_unsigned_releases(cfg),
                           unsigned_rounds=load_unsigned_rounds(cfg), release_id=release_id, seen=seen)


def unverified_releases(config: Config | str | Path) -> dict[str, str] | None:
    """The releases `fusion verify` does not call verified or legacy (tampered, missing, a violation...), each with
    its status. None when no key holder signing key is registered: nothing can be verified then, and a reader has
    every release as it stands (a registry file gone missing is refused: `verify`)."""
    try:
        checks = verify(config)
    except NoReleaseSigningKey:
        return None
    return {c.release_id: c.status for c in checks if c.status not in GOOD}


__all__ = ["unverified_releases", "verify"]

"""Who may contribute: institutions' signing keys, and the registry of their public halves.

Each institution creates its own Ed25519 key pair (`fusion keys --institution ID`); the private key stays in
its key directory, owner-readable only, and the public half is entered in the federation's registry (a TOML
file the operator distributes). The aggregator accepts only envelopes signed by a registered key.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from fusion.config import Config
from fusion.errors import FusionError
from privacy.signing import generate_signing_key

SIGNING_KEY = "signing.key"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


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


def signing_key_file(config: Config, institution_id: str) -> Path:
    return Path(config.institution_keys_path(config.institution(institution_id))) / SIGNING_KEY


def load_registry(config: Config) -> dict[str, bytes]:
    """institution id -> raw Ed25519 public key, from the registry file (empty if there is none yet)."""
    path = Path(config.registry_path)
    if not path.exists():
        return {}
    try:
        doc = tomllib.loads(path.read_text())
        return {entry["id"]: bytes.fromhex(entry["signing_key"]) for entry in doc.get("institutions", [])}
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
        raise FusionError(f"the registry {path} is malformed: {exc}") from None


def _write_registry(config: Config, keys: dict[str, bytes]) -> None:
    lines = ["# Fusion federation registry: institutions that may contribute, and their Ed25519 public keys."]
    for institution, key in sorted(keys.items()):
        lines += ["", "[[institutions]]", f'id = "{institution}"', f'signing_key = "{key.hex()}"']
    path = Path(config.registry_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)


def create_institution_keys(config: Config, institution_id: str, *, overwrite: bool = False) -> Path:
    """Create an institution's signing key (mode 0600) and register its public half."""
    key_file = signing_key_file(config, institution_id)
    if key_file.exists() and not overwrite:
        raise FusionError(f"{key_file} already exists; pass --overwrite to replace it (and re-register)")
    private, public = generate_signing_key()
    _write_private(key_file, private)
    _write_registry(config, {**load_registry(config), institution_id: public})
    return key_file


def load_signing_key(config: Config, institution_id: str) -> bytes:
    return read_private(signing_key_file(config, institution_id), f"institution {institution_id}'s signing key")

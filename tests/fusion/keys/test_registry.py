"""Institution signing keys and the registry of their public halves."""

from __future__ import annotations

import multiprocessing
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fusion.config.federation import Config, parse_config
from fusion.errors import FusionError
from fusion.keys.registry import (
    AGREEMENT_KEY,
    create_institution_keys,
    create_key_holder_key,
    key_holder_signing_key_file,
    load_agreement_key,
    load_key_holder_public_keys,
    load_key_holder_signing_key,
    load_registry,
    load_signing_key,
    load_unsigned_releases,
    load_unsigned_rounds,
    register_unsigned_rounds,
    signing_key_file,
)
from tests.conftest import config_text


@pytest.fixture
def config(tmp_path: Path):
    text = config_text(institutions=[("alpha", "csv"), ("beta", "csv")], quorum=1)
    return parse_config(tomllib.loads(text), base=tmp_path)


def test_keys_are_private_and_their_public_halves_registered(config) -> None:
    assert load_registry(config) == {}
    for institution in ("alpha", "beta"):
        key_file = create_institution_keys(config, institution)
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.parent.stat().st_mode & 0o777 == 0o700
    registry = load_registry(config)
    assert set(registry) == {"alpha", "beta"} and all(len(k) == 32 for k in registry.values())
    assert len(load_signing_key(config, "alpha")) == 32


def test_keys_are_not_replaced_by_accident_and_re_registered_when_they_are(config) -> None:
    create_institution_keys(config, "alpha")
    first = load_registry(config)["alpha"]
    with pytest.raises(FusionError, match="already exists"):
        create_institution_keys(config, "alpha")
    create_institution_keys(config, "alpha", overwrite=True)
    assert load_registry(config)["alpha"] != first


def test_a_signing_key_readable_by_others_is_refused(config) -> None:
    create_institution_keys(config, "alpha")
    signing_key_file(config, "alpha").chmod(0o640)
    with pytest.raises(FusionError, match="chmod 600"):
        load_signing_key(config, "alpha")


def test_missing_keys_and_unknown_institutions_are_clear_errors(config) -> None:
    with pytest.raises(FusionError, match="signing key is missing"):
        load_signing_key(config, "alpha")
    with pytest.raises(FusionError, match="unknown institution"):
        create_institution_keys(config, "nobody")


def test_a_malformed_registry_is_refused(config) -> None:
    Path(config.registry_path).write_text('[[institutions]]\nid = "alpha"\nsigning_key = "not hex"\n')
    with pytest.raises(FusionError, match="malformed"):
        load_registry(config)


def test_write_private_replaces_a_file_others_could_read_without_exposing_the_new_secret(tmp_path: Path) -> None:
    from fusion.keys.registry import write_private

    path = tmp_path / "keys" / "signing.key"
    path.parent.mkdir()
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    before = path.stat().st_ino
    write_private(path, b"new secret")
    assert path.read_bytes() == b"new secret"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_ino != before  # a new file: the old one (and its mode) never held the secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.key"]  # no temporary file left


def test_write_private_rotates_a_symlinked_key_where_it_lives_whatever_the_umask(tmp_path: Path) -> None:
    from fusion.keys.registry import write_private

    volume = tmp_path / "secrets"
    volume.mkdir()
    (volume / "signing.key").write_bytes(b"old")
    link = tmp_path / "keys" / "signing.key"
    link.parent.mkdir()
    link.symlink_to(volume / "signing.key")
    previous = os.umask(0o477)
    try:
        write_private(link, b"new secret")
    finally:
        os.umask(previous)
    assert link.is_symlink() and (volume / "signing.key").read_bytes() == b"new secret"
    assert (volume / "signing.key").stat().st_mode & 0o777 == 0o600


def test_the_key_holders_signing_key_is_registered_and_rotation_keeps_the_old_one_as_retired(config) -> None:
    assert load_key_holder_public_keys(config) == ()
    create_institution_keys(config, "alpha")
    key_file = create_key_holder_key(config)
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(load_key_holder_signing_key(config)) == 32
    (first,) = load_key_holder_public_keys(config)
    with pytest.raises(FusionError, match="already exists"):
        create_key_holder_key(config)
    create_key_holder_key(config, overwrite=True)
    second, retired = load_key_holder_public_keys(config)
    assert retired == first and second != first
    create_key_holder_key(config, overwrite=True)
    assert load_key_holder_public_keys(config)[1:] == (first, second)  # each retired key once, oldest first
    assert set(load_registry(config)) == {"alpha"}  # the institutions' entries are kept


def test_releases_published_before_the_first_key_are_registered_as_unsigned_once(config) -> None:
    create_key_holder_key(config, published={"r-2", "r-1"})
    assert load_unsigned_releases(config) == {"r-1", "r-2"}
    create_key_holder_key(config, published={"r-3"}, overwrite=True)  # a rotation adds nothing unsigned
    assert load_unsigned_releases(config) == {"r-1", "r-2"}
    assert "unsigned_releases = ['r-1', 'r-2']" in Path(config.registry_path).read_text()


def test_unsigned_training_rounds_are_registered_by_the_key_holder_and_kept(config) -> None:
    with pytest.raises(FusionError, match="fusion keys --release-signing"):
        register_unsigned_rounds(config, ["t-1"])  # no key holder key yet: nothing to verify against
    create_key_holder_key(config, published={"r-1"})
    assert register_unsigned_rounds(config, ["t-2", "t-1"]) == ("t-1", "t-2")
    assert register_unsigned_rounds(config, ["t-1", "t-3"]) == ("t-3",)  # added to, never replaced
    create_key_holder_key(config, overwrite=True)  # a rotation keeps them, as the unsigned releases
    assert load_unsigned_rounds(config) == {"t-1", "t-2", "t-3"} and load_unsigned_releases(config) == {"r-1"}
    assert "unsigned_rounds = ['t-1', 't-2', 't-3']" in Path(config.registry_path).read_text()


def test_a_registry_rewritten_in_place_is_read_again_at_once(config: Config) -> None:
    # Parsed registries are kept per process: an edit of the same size, in place, within the file system's
    # timestamp granularity, must still be seen by the next read.
    create_institution_keys(config, "alpha")
    create_institution_keys(config, "beta")
    before = load_registry(config)
    path = Path(config.registry_path)
    text = path.read_text()
    swapped = text.replace(before["alpha"].hex(), "00" * 32).replace(before["beta"].hex(), before["alpha"].hex())
    assert len(swapped) == len(text)
    with path.open("r+") as handle:  # same file, same size
        handle.write(swapped)
    after = load_registry(config)
    assert after == {"alpha": bytes(32), "beta": before["alpha"]}
    path.write_text("[[institutions]]\nid = 1\n")
    with pytest.raises(FusionError, match="malformed"):
        load_registry(config)


def _register_at_once(config: Config, institution: str, barrier: Any) -> None:
    barrier.wait()
    create_institution_keys(config, institution)


def test_institutions_registering_at_the_same_time_are_all_registered(tmp_path: Path) -> None:
    """Each registration reads the registry and writes it back with its entry: without a lock, institutions
    registering in the same instant overwrote each other's entries (their keys existed, unregistered)."""
    institutions = [f"inst{i}" for i in range(8)]
    text = config_text(institutions=[(i, "csv") for i in institutions], quorum=2)
    processes = multiprocessing.get_context("fork")
    for trial in range(4):  # unlocked, 1 or 2 of the 8 were lost in most trials
        config = parse_config(tomllib.loads(text), base=tmp_path / str(trial))
        barrier = processes.Barrier(len(institutions))
        workers = [processes.Process(target=_register_at_once, args=(config, i, barrier)) for i in institutions]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert [worker.exitcode for worker in workers] == [0] * len(institutions)
        assert sorted(load_registry(config)) == institutions
        assert not list(Path(config.registry_path).parent.glob("*.tmp"))


@pytest.mark.parametrize("field", ["signing_key", "agreement_key"])
def test_a_registered_key_of_the_wrong_length_is_refused_naming_the_registry_and_field(config, field) -> None:
    create_institution_keys(config, "alpha")
    create_institution_keys(config, "beta")
    path = Path(config.registry_path)
    key = load_registry(config)["beta"].hex() if field == "signing_key" else None
    text = path.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{field} =") and (key is None or key in ln))
    path.write_text(text.replace(line, line[:-3] + '"'))  # one byte short: still hex
    with pytest.raises(FusionError, match=rf"{re.escape(str(path))} is malformed: .*\.{field} is 31 bytes"):
        load_registry(config)


@pytest.mark.parametrize(
    ("key_file", "load"),
    [
        (lambda c: signing_key_file(c, "alpha"), lambda c: load_signing_key(c, "alpha")),
        (lambda c: signing_key_file(c, "alpha").parent / AGREEMENT_KEY, lambda c: load_agreement_key(c, "alpha")),
        (key_holder_signing_key_file, load_key_holder_signing_key),
    ],
    ids=["signing", "agreement", "release-signing"],
)
def test_a_truncated_private_key_is_refused_naming_its_file(config, key_file, load) -> None:
    create_institution_keys(config, "alpha")
    create_key_holder_key(config)
    path = key_file(config)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(FusionError, match=rf"{re.escape(str(path))} .* holds 10 bytes, not a raw 32-byte key"):
        load(config)

"""The exchange's local fast paths against Beam's file system, their reference: listing a release's folder,
an envelope's place, and the public context's digest (kept only while the file is unchanged)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

from fusion.errors import FusionError
from fusion.release.exchange import EnvelopePlace, list_files, public_context_sha256


def beam_list(directory: str, suffix: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([os.path.join(directory, f"*{suffix}")])[0].metadata_list)


def test_a_local_folder_is_listed_as_beam_lists_it(tmp_path: Path) -> None:
    folder = tmp_path / "20260301T0000Z-20260301T0100Z" / "contributions"
    folder.mkdir(parents=True)
    for name in ("alpha.fenv", "beta.fenv", ".alpha.fenv.123-ab", "beta.fenv.tmp-01", "notes.txt", ".hidden.fenv"):
        (folder / name).write_bytes(b"x")
    (folder / "link.fenv").symlink_to(folder / "alpha.fenv")
    (folder / "dangling.fenv").symlink_to(folder / "gone.fenv")
    (folder / "sub.fenv").mkdir()  # a folder is not listed, nor what lies in it
    (folder / "sub.fenv" / "inner.fenv").write_bytes(b"x")
    for directory in (str(folder), str(folder) + "/"):
        assert list_files(directory, ".fenv") == beam_list(directory, ".fenv")
    assert [Path(p).name for p in list_files(str(folder), ".fenv")] == [
        ".hidden.fenv", "alpha.fenv", "beta.fenv", "link.fenv"
    ]
    assert list_files(str(tmp_path / "absent"), ".fenv") == beam_list(str(tmp_path / "absent"), ".fenv") == []


@pytest.mark.parametrize("path", ["/x/r/contributions/alpha.fenv", "/x/r/unmask/beta.fenv", "alpha.fenv", "a/b"])
def test_an_envelope_place_is_read_from_a_local_path_as_beam_splits_it(path: str) -> None:
    directory, name = FileSystems.split(path)
    assert EnvelopePlace.of(path) == EnvelopePlace(FileSystems.split(directory)[1], name.removesuffix(".fenv"))


def test_the_public_context_digest_follows_every_change_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "he_public.ctx"
    path.write_bytes(b"first context")
    assert public_context_sha256(str(path)) == hashlib.sha256(b"first context").hexdigest()
    assert public_context_sha256(str(path)) == hashlib.sha256(b"first context").hexdigest()  # kept
    replacement = tmp_path / "new.ctx"
    replacement.write_bytes(b"other context")
    os.replace(replacement, path)  # as the key holder publishes one
    assert public_context_sha256(str(path)) == hashlib.sha256(b"other context").hexdigest()
    # Rewritten in place, same size, its modification time put back: its change time still tells.
    times = path.stat()
    path.write_bytes(b"third context")
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert public_context_sha256(str(path)) == hashlib.sha256(b"third context").hexdigest()
    path.unlink()
    with pytest.raises(FusionError, match="not found"):
        public_context_sha256(str(path))

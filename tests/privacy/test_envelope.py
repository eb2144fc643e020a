"""Envelope wire format: packed ciphertexts round-trip exactly, are smaller than 32 bytes a slot, and any
damage to them is a payload mismatch; version 1 envelopes are still read."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest

from privacy import he
from privacy.envelope import (
    HEADER_PREFIX,
    MAGIC,
    MAGIC_V1,
    MAGIC_V2,
    MAX_CIPHERTEXT_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_VALUES,
    MAX_STORED_HEADER_BYTES,
    EnvelopeError,
    PayloadMismatch,
    envelope_header,
    header_region_size,
    header_signer,
    max_envelope_bytes,
    pack_ciphertext,
    pack_envelope,
    payload_digest,
    unpack_ciphertext,
    unpack_envelope,
)
from tests.privacy.test_signing import HEADER


@pytest.fixture(scope="module")
def ciphertexts() -> list[bytes]:
    _, public = he.generate_keys()
    vector = np.random.default_rng(3).integers(-he.MAX_ABS_TOTAL, he.MAX_ABS_TOTAL, size=2 * he.SLOTS_PER_CIPHERTEXT)
    return he.encrypt_vector(he.load_public_context(public), vector, residues=True)


@pytest.mark.parametrize("data", [b"", b"x", b"0123456789abcdefg", bytes(range(256)) * 3])
def test_pack_ciphertext_round_trips_any_bytes(data: bytes) -> None:
    assert unpack_ciphertext(pack_ciphertext(data)) == data


def test_envelopes_round_trip_real_ciphertexts_below_32_bytes_a_slot(ciphertexts: list[bytes]) -> None:
    data = pack_envelope(HEADER, ciphertexts)
    header, back = unpack_envelope(data)
    assert back == ciphertexts
    assert header.payload_sha256 == payload_digest(ciphertexts)
    (head_len,) = struct.unpack_from(">I", data, len(MAGIC))
    payload = len(data) - head_len
    assert payload / (len(ciphertexts) * he.SLOTS_PER_CIPHERTEXT) < 32.0


def test_ciphertexts_packed_by_earlier_versions_with_lz77_are_still_read(ciphertexts: list[bytes]) -> None:
    # Envelopes sealed before Huffman-only packing (zlib level 1 over the same lanes) are kept and re-published.
    ct = ciphertexts[0]
    whole = len(ct) - len(ct) % 8
    lanes = np.frombuffer(ct, dtype=np.uint8, count=whole).reshape(-1, 8).T.tobytes() + ct[whole:]
    assert unpack_ciphertext(zlib.compress(lanes, 1)) == ct
    assert len(pack_ciphertext(ct)) < len(ct)


def test_ciphertexts_packed_with_huffman_over_every_segment_are_still_read(ciphertexts: list[bytes]) -> None:
    """Envelopes sealed before random segments were stored (Huffman coding over the whole stream) are read as
    before; the packing now is an ordinary zlib stream of the same bytes, stored blocks and all, and smaller."""
    for ct in ciphertexts:
        whole = len(ct) - len(ct) % 8
        lanes = np.frombuffer(ct, dtype=np.uint8, count=whole).reshape(-1, 8).T.tobytes() + ct[whole:]
        deflater = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        earlier = deflater.compress(lanes) + deflater.flush()
        assert unpack_ciphertext(earlier) == ct
        packed = pack_ciphertext(ct)
        assert zlib.decompress(packed) == lanes
        assert unpack_ciphertext(packed) == ct
        assert len(packed) < len(earlier) < len(ct)


@pytest.mark.parametrize("size", [4095, 4096, 3 * 4096 + 5, 70_000, 200_001])
def test_packing_stores_random_segments_and_round_trips(size: int) -> None:
    # Random bytes (stored blocks, several over 64 KiB), zeros (Huffman), and the two interleaved by segment.
    rng = np.random.default_rng(size)
    random, zeros = rng.bytes(size), bytes(size)
    mixed = b"".join(random[i : i + 4096] + zeros[i : i + 4096] for i in range(0, size, 8192))
    for data in (random, zeros, mixed):
        packed = pack_ciphertext(data)
        assert unpack_ciphertext(packed) == data
    assert len(pack_ciphertext(random)) < size + 64  # stored: 5 bytes a block, no Huffman tables
    damaged = bytearray(pack_ciphertext(random))
    damaged[len(damaged) // 2] ^= 0x01  # inside a stored block: only the Adler-32 check sees it
    with pytest.raises(PayloadMismatch):
        unpack_ciphertext(bytes(damaged))


def test_the_header_alone_is_the_unpacked_header_and_a_truncated_one_is_refused(ciphertexts: list[bytes]) -> None:
    data = pack_envelope(HEADER, ciphertexts)
    assert envelope_header(data) == unpack_envelope(data)[0]
    head_end = len(MAGIC) + 4 + struct.unpack_from(">I", data, len(MAGIC))[0]
    for cut in (3, 13, head_end - 1):
        with pytest.raises(EnvelopeError):
            envelope_header(data[:cut])
    with pytest.raises(EnvelopeError, match="bad magic"):
        envelope_header(b"PNG" + data[3:])


def test_the_header_region_alone_is_what_a_header_reader_needs(ciphertexts: list[bytes]) -> None:
    """A party that only checks headers reads the region `header_region_size` names from the first HEADER_PREFIX
    bytes: the same header and signer as from the whole file; a cut region or another file is refused."""
    from privacy.signing import generate_signing_key

    private, public = generate_signing_key()
    signed = replace(HEADER, contributors=("alpha",))
    data = pack_envelope(signed, ciphertexts, signing_key=private)
    size = header_region_size(data[:HEADER_PREFIX])
    assert size < len(data) // 100
    assert header_signer(data[:size], {"alpha": public}) == header_signer(data, {"alpha": public})
    assert header_signer(data[:size], {"alpha": public})[1] == "alpha"
    with pytest.raises(EnvelopeError, match="truncated"):
        header_signer(data[: size - 1], {"alpha": public})
    with pytest.raises(EnvelopeError, match="truncated"):
        header_region_size(data[: HEADER_PREFIX - 1])
    with pytest.raises(EnvelopeError, match="bad magic"):
        header_region_size(b"PAR1" + data[4:HEADER_PREFIX])


def test_a_damaged_packed_payload_is_a_payload_mismatch(ciphertexts: list[bytes]) -> None:
    data = bytearray(pack_envelope(HEADER, ciphertexts[:1]))
    for position in (-5, -10, -20_000):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(PayloadMismatch):
            unpack_envelope(bytes(damaged))


def test_a_payload_inflating_beyond_any_ciphertext_is_refused() -> None:
    with pytest.raises(PayloadMismatch):
        unpack_ciphertext(zlib.compress(bytes(MAX_CIPHERTEXT_BYTES + 8)))


def test_version_1_envelopes_are_still_read() -> None:
    cts = [b"ct-1", b"ct-22"]
    header = replace(HEADER, payload_sha256=payload_digest(cts))
    head = header.to_json()
    parts = [MAGIC_V1, struct.pack(">I", len(head)), head, struct.pack(">I", len(cts))]
    for ct in cts:
        parts += [struct.pack(">Q", len(ct)), ct]
    assert unpack_envelope(b"".join(parts))[1] == cts
    with pytest.raises(EnvelopeError):
        unpack_envelope(b"FUSIONENV9\n" + b"".join(parts)[len(MAGIC_V1):])


def _with_header(doc: dict[str, object], cts: list[bytes] | None = None, *, count: int | None = None) -> bytes:
    import json

    head = json.dumps(doc).encode()
    cts = cts or []
    parts = [MAGIC_V2, struct.pack(">I", len(head)), head, struct.pack(">I", len(cts) if count is None else count)]
    for ct in cts:
        packed = pack_ciphertext(ct)
        parts += [struct.pack(">Q", len(packed)), packed]
    return b"".join(parts)


@pytest.mark.parametrize(
    "field,value",
    [("signature", 123), ("contributors", [["alpha"]]), ("slots", "3"), ("slots", True), ("noise_variance", None),
     ("seed_shares", {"beta": 7}), ("refused", [{"source": 1}]), ("reject_counts", {"alpha": {"late": "2"}}),
     ("absent", "beta"), ("kind", ["contribution"])],
)
def test_a_header_field_of_the_wrong_type_is_unreadable_not_a_crash(field: str, value: object) -> None:
    """A header copied from a real envelope with one field's type changed used to raise TypeError inside the
    aggregator's checks (failing the whole aggregation); it is an unreadable envelope, refused with a reason."""
    import json

    doc = json.loads(replace(HEADER, payload_sha256=payload_digest([])).to_json())
    doc[field] = value
    with pytest.raises(EnvelopeError, match=f"'{field}'"):
        unpack_envelope(_with_header(doc))
    with pytest.raises(EnvelopeError, match=f"'{field}'"):
        envelope_header(_with_header(doc))


def test_a_header_nested_too_deep_for_json_is_unreadable() -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for data in (MAGIC_V2 + struct.pack(">I", len(nested)) + nested + struct.pack(">I", 0),
                 _deflated(nested)):
        with pytest.raises(EnvelopeError, match="unreadable"):
            unpack_envelope(data)
        with pytest.raises(EnvelopeError, match="unreadable"):
            envelope_header(data)


def _deflated(head_json: bytes, *, level: int = 6) -> bytes:
    head = zlib.compress(head_json, level)
    return MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">I", 0)


def test_the_header_travels_deflated_and_version_2_headers_are_still_read() -> None:
    """Shares and digests are hex, and a contribution's mask-key shares grow with the square of the federation:
    the header is deflated (version 3). The signature is over the JSON, so a version 2 envelope of the same
    header reads back the same."""
    import json

    doc = json.loads(replace(HEADER, payload_sha256=payload_digest([])).to_json())
    doc["pair_shares"] = {f"p{i}/r{j}": hashlib_hex(i, j) for i in range(20) for j in range(20)}
    head = json.dumps(doc).encode()
    v3 = _deflated(head)
    v2 = MAGIC_V2 + struct.pack(">I", len(head)) + head + struct.pack(">I", 0)
    assert unpack_envelope(v3)[0] == unpack_envelope(v2)[0] == envelope_header(v3)
    assert len(v3) < 0.6 * len(v2)


def hashlib_hex(i: int, j: int) -> str:
    import hashlib

    return "".join(hashlib.sha256(f"{i}/{j}/{k}".encode()).hexdigest() for k in range(3))


def test_a_header_that_does_not_inflate_or_inflates_too_far_is_refused() -> None:
    junk = MAGIC + struct.pack(">I", 5) + b"\x00junk" + struct.pack(">I", 0)
    bomb = _deflated(b" " * (MAX_HEADER_BYTES + 1), level=9)  # about 64 KB on disk
    truncated = MAGIC + struct.pack(">I", 10) + zlib.compress(b"{}" * 100)[:10] + struct.pack(">I", 0)
    for data, reason in ((junk, "does not inflate"), (bomb, "inflates beyond"), (truncated, "does not inflate")):
        with pytest.raises(EnvelopeError, match=reason):
            unpack_envelope(data)
        with pytest.raises(EnvelopeError, match=reason):
            envelope_header(data)


def test_an_envelope_claiming_more_ciphertexts_than_the_layout_holds_is_refused_before_inflating() -> None:
    """Each claimed ciphertext may inflate to MAX_CIPHERTEXT_BYTES: a small file claiming many was a memory bomb
    for the aggregator and the key holder. A reader that knows the layout bounds the count first."""
    import json

    cts = [bytes(64)] * 3
    data = _with_header(json.loads(replace(HEADER, payload_sha256=payload_digest(cts)).to_json()), cts)
    assert unpack_envelope(data, max_ciphertexts=3)[1] == cts
    with pytest.raises(EnvelopeError, match="more than this layout's 2"):
        unpack_envelope(data, max_ciphertexts=2)
    bomb = _with_header(json.loads(HEADER.to_json()), count=1_000_000)
    with pytest.raises(EnvelopeError, match="more than"):
        unpack_envelope(bomb, max_ciphertexts=2)


def test_a_header_with_more_json_values_than_any_honest_one_is_refused_before_parsing() -> None:
    """'{},{},...' spends three bytes a value: a 16 KB file inflating to 16 MiB of it would be 5 million Python
    objects. The values are counted before parsing; an honest header holds far fewer (MAX_HEADER_VALUES)."""
    import json

    doc = json.loads(HEADER.to_json())
    honest = _deflated(json.dumps({**doc, "refused": [{"source": "x", "reason": "y"}] * 1000}).encode())
    assert len(envelope_header(honest).refused) == 1000
    bomb = _deflated(json.dumps({**doc, "refused": [{}] * (MAX_HEADER_VALUES // 2)}).encode(), level=9)
    assert len(bomb) < 4096
    for read in (unpack_envelope, envelope_header, lambda data: header_signer(data, {"alpha": bytes(32)})):
        with pytest.raises(EnvelopeError, match="JSON values"):
            read(bomb)


def test_a_header_larger_than_any_honest_one_is_refused_before_it_is_read() -> None:
    """20 MiB of JSON (here blanks, as cheap to deflate as any junk) is more than a header of 200 institutions on
    the complete graph holds; a stored header's length beyond that is refused from the envelope's first bytes."""
    padded = HEADER.to_json()[:-1] + b" " * (20 << 20) + b"}"
    with pytest.raises(EnvelopeError, match="inflates beyond"):
        envelope_header(_deflated(padded, level=9))
    with pytest.raises(EnvelopeError, match="more than any header holds"):
        header_region_size(MAGIC_V2 + struct.pack(">I", MAX_STORED_HEADER_BYTES + 1))
    assert max_envelope_bytes(2) < MAX_STORED_HEADER_BYTES + 3 * MAX_CIPHERTEXT_BYTES


def test_header_signer_remembers_only_headers_whose_signature_verified() -> None:
    """A process reading the same contributions again (an unmask round, a burst of windows) reuses their parsed
    headers; unsigned or forged ones are parsed again each time and never kept, so junk costs no lasting memory."""
    from privacy.signing import generate_signing_key

    private, public = generate_signing_key()
    signed = pack_envelope(HEADER, [], signing_key=private)
    unsigned = pack_envelope(replace(HEADER, nonce="u" * 32), [])
    first, signer = header_signer(signed, {"alpha": public})
    assert signer == "alpha" and header_signer(signed, {"alpha": public})[0] is first
    junk, signer = header_signer(unsigned, {"alpha": public})
    assert signer is None and header_signer(unsigned, {"alpha": public})[0] is not junk
    # A key that did not sign it: the header remembered is not taken as signed by it.
    assert header_signer(signed, {"alpha": generate_signing_key()[1]})[1] is None

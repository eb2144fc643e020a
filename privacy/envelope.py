"""Envelopes: the only thing that crosses between parties. A JSON header plus serialized ciphertexts.

Binary layout (all integers big-endian):
    b"FUSIONENV3\\n" | u32 header length | zlib(header JSON, UTF-8) | u32 count | (u64 length | packed ciphertext)*
A packed ciphertext is zlib over the ciphertext's bytes regrouped by position in each 8-byte word: BFV
coefficients are below 2^60, so one byte lane in eight holds only 4 random bits and compresses, bringing an
envelope to about 30 bytes per slot instead of 32 (random segments stored, the others Huffman-coded). The
header is deflated too: its shares and digests are hex, and a contribution's mask-key shares grow with the
square of its masking neighbourhood (about 6 KB of JSON at 5 institutions on the complete graph; k (k + 1)
shares, about 58 KB deflated at 500 institutions with k = 18, on a sparse one: privacy/masking_graph.py), which
deflate halves. Version 2 envelopes (the header as plain JSON) and version 1 (ciphertexts stored as is, too) are
still read; the signature is over the header JSON either way. The header records the SHA-256 of the (unpacked)
ciphertexts so a damaged or swapped payload is detected when read, and an institution signs the header (Ed25519,
`signature` left empty in the signed bytes), which binds the payload too.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import numpy as np

from privacy.signing import sign, verify

MAGIC = b"FUSIONENV3\n"
MAGIC_V2 = b"FUSIONENV2\n"
MAGIC_V1 = b"FUSIONENV1\n"
#: Each version's magic -> (ciphertexts packed, header deflated). All are the same length.
_VERSIONS = {MAGIC: (True, True), MAGIC_V2: (True, False), MAGIC_V1: (False, False)}
#: No honest header inflates beyond this; more is refused before it is inflated further. A contribution's header
#: is mostly its mask-key shares, k (k + 1) of them on a masking graph of degree k (privacy/masking_graph.py),
#: about 300 bytes of JSON each: under 150 KB up to 1,000 institutions on the sparse graph (k = 20), about 12 MB
#: for one of 200 institutions on the complete graph (k = 199, which only a max_colluding near half the
#: federation asks for); an aggregate's header lists refused envelopes (about 200 bytes each) and reject counts.
MAX_HEADER_BYTES = 16 << 20
#: Nor does one hold more JSON values than this: the count of '{', '[', ',' and ':' in its JSON, which bounds
#: how many objects parsing it builds, is checked before it is parsed. Honest JSON spends 30 bytes or more on
#: each (a mask-key share: its 'peer/recipient' key and about 200 hex digits, then its digest; a refusal: three
#: text fields), so a header within MAX_HEADER_BYTES holds at most about 500,000 (the complete graph of 200:
#: 160,000). At a few bytes each, as in '[{},{},...]', the 16 MiB allowed would have been 5 million objects, over
#: 400 MB of memory from a 16 KB file; this many cost at most about 30 MB to parse.
MAX_HEADER_VALUES = 1 << 19
#: The most bytes a header takes in an envelope: MAX_HEADER_BYTES of JSON, deflated (deflate adds 5 bytes per
#: stored 64 KiB block and 6 in all) or stored as is (version 2).
MAX_STORED_HEADER_BYTES = MAX_HEADER_BYTES + MAX_HEADER_BYTES // 1000 + 64
_WORD = 8
#: No serialized ciphertext is larger (one is 262,283 bytes; two 8192-coefficient polynomials over three 60-bit
#: primes are 393,216 bytes at most); a payload inflating beyond it is refused before more is inflated.
MAX_CIPHERTEXT_BYTES = 1 << 20
#: Header fields by JSON type: a header copied from a real envelope with a field of another type is unreadable
#: (refused with a reason), never a TypeError deep in a check.
_TEXT_FIELDS = ("kind", "federation", "interval_start", "interval_end", "layout_digest", "parameters_digest",
                "context_sha256", "nonce", "created_at", "payload_sha256", "signature", "seed_commitment")
_TEXT_LISTS = ("contributors", "absent", "included")
_TEXT_MAPS = ("seed_shares", "share_digests", "revealed_shares", "pair_commitments", "pair_shares",
              "pair_share_digests", "revealed_pair_shares", "layer_commitments", "layer_digests", "revealed_layers")


class EnvelopeError(ValueError):
    """An envelope is malformed or its payload does not match its header."""


class PayloadMismatch(EnvelopeError):
    """The ciphertexts are not the ones the header (and so its signature) vouches for."""


@dataclass(frozen=True)
class EnvelopeHeader:
    """What an envelope claims to hold. `kind` is 'contribution' or 'unmask' (one institution's) or 'aggregate'
    (the aggregator's, signed with its own key)."""

    kind: str
    federation: str
    interval_start: str  # ISO 8601, UTC
    interval_end: str
    layout_digest: str
    parameters_digest: str
    slots: int
    contributors: tuple[str, ...]
    noise_variance: float  # total Skellam variance inside the payload, integer units squared
    context_sha256: str  # SHA-256 of the public HE context the payload was encrypted under
    nonce: str
    created_at: str
    payload_sha256: str = ""
    signature: str = ""  # hex Ed25519 signature of the header with this field empty
    # Per institution: {reason: rows rejected}. Data-quality counts only (never rows, never read/accepted
    # totals, which would reveal exact counts of the protected readings); they reach the `rejects` table.
    reject_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Envelopes the aggregator refused: [{"source": ..., "institution": ..., "reason": ...}]
    refused: tuple[dict[str, str], ...] = ()
    # Unmask envelopes: the roster answered (included, absent); they hold no ciphertexts.
    absent: tuple[str, ...] = ()
    included: tuple[str, ...] = ()
    # Contributions: SHA-256 commitment to the self-mask seed, and its Shamir shares sealed to each recipient.
    seed_commitment: str = ""
    seed_shares: dict[str, str] = field(default_factory=dict)
    share_digests: dict[str, str] = field(default_factory=dict)  # recipient -> SHA-256 of its share
    # Unmask envelopes: the sender's (opened) share of each included institution's seed, 'x:y' in hex.
    revealed_shares: dict[str, str] = field(default_factory=dict)
    # Contributions: for each other institution (peer), a commitment to the pairwise mask key held with it, and
    # that key's Shamir shares sealed to each recipient and their digests, keyed 'peer/recipient'.
    pair_commitments: dict[str, str] = field(default_factory=dict)
    pair_shares: dict[str, str] = field(default_factory=dict)
    pair_share_digests: dict[str, str] = field(default_factory=dict)
    # Unmask envelopes with institutions absent: the sender's share of the key each included institution (dealer)
    # holds with each absent one, keyed 'dealer/absent'.
    revealed_pair_shares: dict[str, str] = field(default_factory=dict)
    # Contributions: per removable noise layer (its number as text), the commitment to its seed and the digest
    # of its noise (privacy/noise_shares.py). Unmask envelopes: the sender's own top revealed layer, as
    # {sender: "layer:seed hex"}, from which the aggregator derives the lower layers and removes them. The
    # aggregate: the reveals whose layers it removed, in the same form (the key holder removes the same ones).
    layer_commitments: dict[str, str] = field(default_factory=dict)
    layer_digests: dict[str, str] = field(default_factory=dict)
    revealed_layers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        # Shallow (every field is text, a number, a tuple or a flat dict): asdict's deep copy cost more than the
        # signature it feeds, and the JSON is the same.
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["contributors"] = list(self.contributors)
        doc["refused"] = list(self.refused)
        doc["absent"] = list(self.absent)
        doc["included"] = list(self.included)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> EnvelopeHeader:
        if len(data) > MAX_HEADER_BYTES:
            raise EnvelopeError(f"unreadable envelope header: larger than {MAX_HEADER_BYTES} bytes")
        values = sum(data.count(token) for token in (b"{", b"[", b",", b":"))
        if values > MAX_HEADER_VALUES:  # counted before parsing: each value would become a Python object
            raise EnvelopeError(f"unreadable envelope header: {values} JSON values, more than {MAX_HEADER_VALUES}")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("the header is not a JSON object")
            for name in (*_TEXT_LISTS, "refused"):  # tuple("beta") would be ('b', 'e', 't', 'a')
                if not isinstance(doc.get(name, []), list):
                    raise TypeError(f"field '{name}' has the wrong type")
            doc["contributors"] = tuple(doc["contributors"])
            doc["refused"] = tuple(doc.get("refused", ()))
            doc["absent"] = tuple(doc.get("absent", ()))
            doc["included"] = tuple(doc.get("included", ()))
            header = cls(**doc)
            _check_types(header)
            return header
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise EnvelopeError(f"unreadable envelope header: {exc}") from None


def _texts(items: object) -> bool:
    return isinstance(items, (tuple, list, dict)) and all(isinstance(x, str) for x in items)


def _text_map(items: object) -> bool:
    return isinstance(items, dict) and _texts(items) and _texts(list(items.values()))


def _check_types(h: EnvelopeHeader) -> None:
    """Raise TypeError naming the first header field whose JSON type is not the one the checks rely on."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks: list[tuple[str, bool]] = [(name, isinstance(getattr(h, name), str)) for name in _TEXT_FIELDS]
    checks += [(name, _texts(getattr(h, name))) for name in _TEXT_LISTS]
    checks += [(name, _text_map(getattr(h, name))) for name in _TEXT_MAPS]
    checks += [
        ("slots", number(h.slots) and isinstance(h.slots, int)),
        ("noise_variance", number(h.noise_variance)),
        ("refused", all(_text_map(r) for r in h.refused)),
        ("reject_counts", isinstance(h.reject_counts, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and _texts(v)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in v.values())
            for k, v in h.reject_counts.items())),
    ]
    for name, ok in checks:
        if not ok:
            raise TypeError(f"field '{name}' has the wrong type")


def payload_digest(ciphertexts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for ct in ciphertexts:
        digest.update(struct.pack(">Q", len(ct)))
        digest.update(ct)
    return digest.hexdigest()


def pack_envelope(header: EnvelopeHeader, ciphertexts: list[bytes], *, signing_key: bytes | None = None) -> bytes:
    """Serialize; fills in the payload hash, then signs the header when given the sender's private key."""
    header = replace(header, payload_sha256=payload_digest(ciphertexts), signature="")
    if signing_key is not None:
        header = sign_header(header, signing_key)
    head = zlib.compress(header.to_json(), 6)
    parts = [MAGIC, struct.pack(">I", len(head)), head, struct.pack(">I", len(ciphertexts))]
    for ct in ciphertexts:
        packed = pack_ciphertext(ct)
        parts += [struct.pack(">Q", len(packed)), packed]
    return b"".join(parts)


def pack_ciphertext(data: bytes) -> bytes:
    """zlib over the bytes regrouped by lane (byte k of every 8-byte word together), the tail as is.

    Only the lane bytes that hold coefficients' zero high bits compress (a quarter of them); the rest are random.
    So the stream is deflated by 4 KiB segments: a segment whose sampled bytes carry more than 7 bits of entropy
    per byte is written as a stored block (Huffman coding would spend 1.4 ms a ciphertext to save nothing on
    them), the others are Huffman-coded (LZ77's search for repeats finds nothing in either). The result is an
    ordinary zlib stream (header, deflate blocks, Adler-32): any zlib reader, and every version of
    `unpack_ciphertext`, inflates it; earlier versions' packing (Huffman over every segment) is read as before."""
    whole = len(data) - len(data) % _WORD
    regrouped = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, _WORD).T.tobytes() + data[whole:]
    view = memoryview(regrouped)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)  # raw: header and check added here
    parts: list[bytes | memoryview] = [_ZLIB_HEADER]
    for start, end, random in _segment_runs(regrouped):
        if random:  # stored blocks (BFINAL 0, BTYPE 00, at a byte boundary: LEN, NLEN, the bytes)
            for at in range(start, end, _STORED_MAX):
                size = min(_STORED_MAX, end - at)
                parts += [b"\x00" + struct.pack("<HH", size, size ^ 0xFFFF), view[at : at + size]]
        else:  # Huffman blocks, flushed to a byte boundary
            parts += [deflater.compress(view[start:end]), deflater.flush(zlib.Z_SYNC_FLUSH)]
    parts += [deflater.flush(), struct.pack(">I", zlib.adler32(regrouped))]
    return b"".join(parts)


#: zlib stream header: deflate with a 32 KiB window, "fastest" level; (0x78 * 256 + 0x01) is a multiple of 31.
_ZLIB_HEADER = b"\x78\x01"
_STORED_MAX = 0xFFFF
_SEGMENT = 4096
_SAMPLE = 512  # bytes sampled per segment: a random one shows about 7.6 bits per byte, a coefficient-top one 4


def _segment_runs(data: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, random) runs of consecutive whole segments judged alike (the tail, if any, is not random)."""
    count = len(data) // _SEGMENT
    runs: list[tuple[int, int, bool]] = []
    if count:
        samples = np.frombuffer(data, dtype=np.uint8, count=count * _SEGMENT).reshape(count, _SEGMENT)[:, :_SAMPLE]
        rows = np.arange(count, dtype=np.int64)[:, None] * 256
        counts = np.bincount((rows + samples).ravel(), minlength=count * 256).reshape(count, 256) / _SAMPLE
        with np.errstate(divide="ignore", invalid="ignore"):
            bits = -np.where(counts > 0, counts * np.log2(counts), 0.0).sum(axis=1)
        for index, random in enumerate((bits > 7.0).tolist()):
            start = index * _SEGMENT
            if runs and runs[-1][2] == random:
                runs[-1] = (runs[-1][0], start + _SEGMENT, random)
            else:
                runs.append((start, start + _SEGMENT, random))
    if len(data) > count * _SEGMENT or not runs:
        runs.append((count * _SEGMENT, len(data), False))
    return runs


def unpack_ciphertext(packed: bytes) -> bytes:
    """The bytes `pack_ciphertext` packed; raises PayloadMismatch if they do not decompress."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(packed, MAX_CIPHERTEXT_BYTES)
    except zlib.error:
        raise PayloadMismatch("a ciphertext does not decompress: the payload is not the one signed") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise PayloadMismatch("a ciphertext is truncated or larger than any BFV ciphertext of this federation")
    whole = len(data) - len(data) % _WORD
    words = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(_WORD, -1).T
    return words.tobytes() + data[whole:]


def envelope_header(data: bytes) -> EnvelopeHeader:
    """Only the header, without unpacking or hashing the ciphertexts: enough for a party that checks the header's
    signature (which binds the payload's SHA-256) but never uses the payload."""
    return _header(data)[0]


def _header(data: bytes) -> tuple[EnvelopeHeader, int, bool]:
    """(the header, the offset just past it, whether the ciphertexts are packed); EnvelopeError if unreadable."""
    region = _header_region(data)
    return _parse_region(region), len(region), _VERSIONS[region[: len(MAGIC)]][0]


#: An envelope's first bytes: its magic and its header's length.
HEADER_PREFIX = len(MAGIC) + 4


def header_region_size(prefix: bytes) -> int:
    """How many leading bytes of an envelope hold its header (magic, length, header), from its first
    HEADER_PREFIX bytes: a party that needs only the header (`header_signer`) reads those, not the ciphertexts.
    EnvelopeError if the prefix is not an envelope's."""
    magic = prefix[: len(MAGIC)]
    if magic not in _VERSIONS:
        raise EnvelopeError("not a Fusion envelope (bad magic)")
    try:
        (head_len,) = struct.unpack_from(">I", prefix, len(magic))
    except struct.error:
        raise EnvelopeError("envelope is truncated") from None
    if head_len > MAX_STORED_HEADER_BYTES:  # deflate never makes a header much larger than its JSON
        raise EnvelopeError(f"the header claims {head_len} bytes, more than any header holds")
    return len(magic) + 4 + int(head_len)


def max_envelope_bytes(ciphertexts: int) -> int:
    """The largest file an envelope of at most `ciphertexts` ciphertexts can be: a reader that knows the layout
    refuses a larger file before reading it. Packed, a ciphertext is at most a few bytes over its size."""
    return HEADER_PREFIX + MAX_STORED_HEADER_BYTES + 4 + ciphertexts * (8 + MAX_CIPHERTEXT_BYTES + (1 << 12))


def _header_region(data: bytes) -> bytes:
    """The envelope's bytes up to the end of its header (magic, length, header); EnvelopeError if truncated."""
    end = header_region_size(data)
    if end > len(data):
        raise EnvelopeError("envelope is truncated")
    return data[:end]


def _parse_region(region: bytes) -> EnvelopeHeader:
    head = region[len(MAGIC) + 4 :]
    return EnvelopeHeader.from_json(_inflate_header(head) if _VERSIONS[region[: len(MAGIC)]][1] else head)


def header_signer(data: bytes, public_keys: Mapping[str, bytes]) -> tuple[EnvelopeHeader, str | None]:
    """(the header of envelope `data`, its one contributor if that institution's key in `public_keys` signed
    it, else None); EnvelopeError if unreadable. Headers whose signature verified are remembered by their bytes
    (the last `_REMEMBERED`): in one process, the institutions answering an unmask round, each window of a burst
    its own, read the same few contributions again and again. Unsigned ones are parsed each time, never kept: a
    junk file is not worth memory. The header returned may be one returned before: never change it (it is
    frozen; its maps are not copied)."""
    region = _header_region(data)
    with _VERIFIED_LOCK:
        remembered = _VERIFIED.get(region)
        if remembered is not None:
            _VERIFIED.move_to_end(region)
    if remembered is not None and public_keys.get(remembered[0].contributors[0]) == remembered[1]:
        return remembered[0], remembered[0].contributors[0]
    header = _parse_region(region)
    if len(header.contributors) != 1 or header.contributors[0] not in public_keys:
        return header, None
    signer = header.contributors[0]
    if not signature_valid(header, public_keys[signer]):
        return header, None
    with _VERIFIED_LOCK:
        _VERIFIED[region] = (header, public_keys[signer])
        while len(_VERIFIED) > _REMEMBERED:
            _VERIFIED.popitem(last=False)
    return header, signer


#: Verified headers `header_signer` keeps, with the key that verified each: a burst of windows holds a few dozen
#: contributions at once; at 500 institutions a header's region is about 60 KB, so this holds a few MB.
_REMEMBERED = 128
_VERIFIED: OrderedDict[bytes, tuple[EnvelopeHeader, bytes]] = OrderedDict()
_VERIFIED_LOCK = threading.Lock()


def _inflate_header(head: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        json_bytes = inflater.decompress(head, MAX_HEADER_BYTES)
    except zlib.error:
        raise EnvelopeError("the header does not inflate") from None
    if inflater.unconsumed_tail:
        raise EnvelopeError(f"the header inflates beyond {MAX_HEADER_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise EnvelopeError("the header does not inflate")
    return json_bytes


def unpack_envelope(data: bytes, *, max_ciphertexts: int | None = None) -> tuple[EnvelopeHeader, list[bytes]]:
    """Parse and check the payload hash; raises EnvelopeError on any inconsistency. A reader that knows the
    layout passes `max_ciphertexts`: an envelope claiming more is refused before anything is inflated (a small
    unsigned file could otherwise make its reader inflate up to MAX_CIPHERTEXT_BYTES per claimed ciphertext)."""
    header, offset, packed = _header(data)
    try:
        (count,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if max_ciphertexts is not None and count > max_ciphertexts:
            raise EnvelopeError(f"{count} ciphertexts, more than this layout's {max_ciphertexts}")
        ciphertexts = []
        for _ in range(count):
            (length,) = struct.unpack_from(">Q", data, offset)
            offset += 8
            if offset + length > len(data):
                raise EnvelopeError("envelope is truncated")
            ciphertexts.append(data[offset : offset + length])
            offset += length
        if packed:
            ciphertexts = [unpack_ciphertext(ct) for ct in ciphertexts]
    except struct.error:
        raise EnvelopeError("envelope is truncated") from None
    if offset != len(data):
        raise EnvelopeError("envelope has trailing bytes")
    if payload_digest(ciphertexts) != header.payload_sha256:
        raise PayloadMismatch("payload does not match the header's SHA-256")
    return header, ciphertexts


def signed_bytes(header: EnvelopeHeader) -> bytes:
    """What an institution signs: the header (which holds the payload's SHA-256) without its signature."""
    return replace(header, signature="").to_json()


def sign_header(header: EnvelopeHeader, private_key: bytes) -> EnvelopeHeader:
    return replace(header, signature=sign(private_key, signed_bytes(header)).hex())


def signature_valid(header: EnvelopeHeader, public_key: bytes) -> bool:
    try:
        signature = bytes.fromhex(header.signature)
    except ValueError:
        return False
    return bool(signature) and verify(public_key, signed_bytes(header), signature)

"""Signed bids for auctions: each bid is signed by its bidder's Ed25519 key, registered under `[[bidders]]`, and
names the window it is for (an old bid cannot be replayed into another auction). Ed25519 signatures are
deterministic, so a bid copied within a file carries its first copy's signature: it is refused, naming both, and a
signed bid counts once.

A bids file is TOML, one `[[bids]]` table per bid (`fusion bid` appends one):

    [[bids]]
    bidder = "brighton"
    bus = "E"
    mw = 600.0
    price = 10.0          # $/MWh
    co2 = 0.95            # t/MWh (optional)
    window = "2026-01-02T18:00:00.000000Z"
    signature = "<hex>"
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fusion.errors import FusionError
from mechanisms.records import canonical, timestamp
from mechanisms.vcg import Bid
from privacy.signing import sign, verify

BID_MESSAGE = b"fusion/bid/v1\n"


def out_of_range(bid: Bid) -> tuple[str, str] | None:
    """(the field of `bid` out of range, what it must be), or None. A signed bid holds finite numbers only."""
    if not (math.isfinite(bid.mw) and bid.mw >= 0):
        return "mw", "MW offered, a finite number of at least 0"
    if not math.isfinite(bid.price):
        return "price", "$/MWh asked, a finite number"
    if not (math.isfinite(bid.co2) and bid.co2 >= 0):
        return "co2", "t/MWh emitted, a finite number of at least 0"
    return None


def bid_message(bid: Bid, window: datetime) -> bytes:
    doc = {"bidder": bid.bidder, "bus": bid.bus, "mw": bid.mw, "price": bid.price, "co2": bid.co2,
           "window": timestamp(window)}
    return BID_MESSAGE + canonical(doc).encode()


def bid_entry(bid: Bid, window: datetime, private_key: bytes) -> dict[str, Any]:
    """A bid as a bids-file entry, signed."""
    return {"bidder": bid.bidder, "bus": bid.bus, "mw": bid.mw, "price": bid.price, "co2": bid.co2,
            "window": timestamp(window), "signature": sign(private_key, bid_message(bid, window)).hex()}


def append_bid(path: Path, entry: dict[str, Any]) -> None:
    lines = ["", "[[bids]]"]
    for key, value in entry.items():
        lines.append(f"{key} = {value!r}" if isinstance(value, float) else f"{key} = {json.dumps(value)}")
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def read_bids(path: Path, *, window: datetime, bidders: dict[str, bytes]) -> list[dict[str, Any]]:
    """The bids of `path` for `window`, each checked against its bidder's registered key. An unregistered bidder,
    a bad signature, a bid for another window or a copy of an earlier bid is refused, naming the bid."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FusionError(f"bids file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FusionError(f"bids file {path} cannot be read: {exc}") from None
    entries = doc.get("bids", [])
    if not isinstance(entries, list) or not entries:
        raise FusionError(f"bids file {path} holds no [[bids]]")
    checked = []
    seen: dict[tuple[str, bytes], int] = {}  # (bidder, signature) -> the bid's number
    for number, entry in enumerate(entries):
        where = f"{path}: bids[{number}]"
        try:
            bid = Bid(str(entry["bidder"]), str(entry["bus"]), float(entry["mw"]), float(entry["price"]),
                      float(entry.get("co2", 0.0)))
            signature = bytes.fromhex(entry["signature"])
            stated = str(entry["window"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FusionError(f"{where} is malformed ({exc}); each bid has bidder, bus, mw, price, window and "
                              "signature (`fusion bid` writes them)") from None
        bad = out_of_range(bid)
        if bad:
            raise FusionError(f"{where}.{bad[0]} = {getattr(bid, bad[0]):g} ({bid.bidder}): {bad[1]}")
        if stated != timestamp(window):
            raise FusionError(f"{where} ({bid.bidder}) is for the window {stated}, not this auction's "
                              f"{timestamp(window)}: bids are signed for one window")
        key = bidders.get(bid.bidder)
        if key is None:
            raise FusionError(f"{where}: bidder {bid.bidder} is not registered under [[bidders]] in the registry "
                              "(`fusion mechanism-keys --bidder ID`)")
        if not verify(key, bid_message(bid, window), signature):
            raise FusionError(f"{where}: the signature is not bidder {bid.bidder}'s (altered, or signed by another "
                              "key)")
        first = seen.setdefault((bid.bidder, signature), number)
        if first != number:
            raise FusionError(f"{where} repeats bids[{first}], bidder {bid.bidder}'s signed bid: a signed bid counts "
                              "once (a bidder offering more at the same bus and price signs one bid for the sum)")
        checked.append({**entry, "mw": bid.mw, "price": bid.price, "co2": bid.co2})
    return checked


def bids_of(entries: Sequence[dict[str, Any]]) -> list[Bid]:
    return [Bid(e["bidder"], e["bus"], e["mw"], e["price"], e.get("co2", 0.0)) for e in entries]


__all__ = ["append_bid", "bid_entry", "bid_message", "bids_of", "out_of_range", "read_bids"]

"""Which releases a forecast trusts: where the key holder has a release-signing key registered, only those `fusion
verify` calls verified or legacy (fusion.trust.unverified_releases names the others, which
forecasting.series leaves out); what a forecast's params and a run's output say of the ones left out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from forecasting.series import Series


def listed(statuses: dict[str, str], most: int = 5) -> str:
    """'r-a (tampered), r-b (missing) and 3 more'."""
    names = [f"{name} ({status})" for name, status in sorted(statuses.items())]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def trust_record(series: Series, unverified: dict[str, str] | None) -> dict[str, Any]:
    """What a forecast's params record of the releases it trusted: whether they were verified, and those of its
    span it left out."""
    if unverified is None:
        return {"releases_verified": False}  # no release-signing key registered: nothing can be verified
    record: dict[str, Any] = {"releases_verified": True, "unverified_releases_skipped": len(series.skipped)}
    if series.skipped:
        record["unverified_release_ids"] = list(series.skipped)
    return record


def skipped_releases(found: Sequence[Series], unverified: dict[str, str] | None) -> dict[str, str]:
    """The unverified releases the series read left out, with their status."""
    return with_status([name for s in found for name in s.skipped], unverified)


def with_status(names: Iterable[str], unverified: dict[str, str] | None) -> dict[str, str]:
    """Releases left out (`Series.skipped`, forecasting.series.released_points), each with its status."""
    return {name: (unverified or {}).get(name, "unverified") for name in names}


def left_out(skipped: dict[str, str], most: int | None = None) -> str:
    """How a run, a plot or a page names the releases it left out: 'left out 2 release(s) that `fusion verify`
    does not call verified or legacy: r-a (tampered), r-b (missing)', every one named, or at most `most`."""
    return (f"left out {len(skipped)} release(s) that `fusion verify` does not call verified or legacy: "
            f"{listed(skipped, len(skipped) if most is None else most)}")


__all__ = ["left_out", "listed", "skipped_releases", "trust_record", "with_status"]

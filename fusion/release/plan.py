"""A release plan: the layout, parameters and identity of one interval's release, derived from the config."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fusion.config.federation import Config
from fusion.config.parameters import ReleaseParameters, layout_components, release_parameters
from fusion.errors import FusionError
from fusion.release.exchange import ReleaseKey
from fusion.release.rejects import reject_tallies
from privacy.envelope import EnvelopeHeader
from privacy.layout import PartitionLayout
from privacy.masking_graph import MaskingGraph
from schemas.validation import ReadingRules


def parse_time(text: str) -> datetime:
    """ISO 8601 (e.g. 2026-01-01T00:00); naive times are UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FusionError(f"'{text}' is not an ISO 8601 time; write e.g. 2026-01-01T00:00") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    """A privacy period: releases whose intervals fall in it share its epsilon cap."""

    name: str
    start: datetime
    end: datetime


def period_of(config: Config, start: datetime, end: datetime) -> Period:
    """The privacy period holding [start, end); an interval may not straddle two periods."""
    length = config.period
    begin = _EPOCH + ((start.astimezone(UTC) - _EPOCH) // length) * length
    finish = begin + length
    if end > finish:
        raise FusionError(
            f"the interval {start.isoformat()} .. {end.isoformat()} crosses the privacy period boundary at "
            f"{finish.isoformat()}; release each period's part separately"
        )
    whole_days = length % timedelta(days=1) == timedelta(0)
    return Period(name=begin.strftime("%Y-%m-%d" if whole_days else "%Y-%m-%dT%H:%MZ"), start=begin, end=finish)


@dataclass(frozen=True)
class ReleasePlan:
    config: Config
    layout: PartitionLayout
    params: ReleaseParameters
    key: ReleaseKey
    period: Period
    # Institution id -> reason -> rows rejected before the readings reached the feeds this plan reads (a stream's
    # ingest), to publish with the release as noisy tallies (fusion/release/rejects.py); local to each institution.
    carried_rejects: dict[str, dict[str, int]] = field(default_factory=dict)

    def envelope_header(
        self,
        *,
        kind: str,
        contributors: tuple[str, ...],
        noise_variance: float,
        context_sha256: str,
        reject_counts: dict[str, dict[str, int]],
        refused: tuple[dict[str, str], ...] = (),
        absent: tuple[str, ...] = (),
        **fields: Any,
    ) -> EnvelopeHeader:
        """A header for this release's interval, layout and parameters, with a fresh nonce and time; `fields`
        are the kind-specific ones (seed commitment and shares, the roster answered, revealed shares)."""
        return EnvelopeHeader(
            kind=kind,
            federation=self.key.federation,
            interval_start=self.layout.start.isoformat(),
            interval_end=self.layout.end.isoformat(),
            layout_digest=self.key.layout_digest,
            parameters_digest=self.key.parameters_digest,
            slots=self.layout.slots,
            contributors=contributors,
            noise_variance=noise_variance,
            context_sha256=context_sha256,
            nonce=secrets.token_hex(16),
            created_at=datetime.now(UTC).isoformat(),
            reject_counts=reject_counts,
            refused=refused,
            absent=absent,
            **fields,
        )

    @property
    def rules(self) -> ReadingRules:
        return ReadingRules(
            plausible={m.name: m.plausible for m in self.config.metrics},
            regions=self.config.regions,
            start=self.layout.start,
            end=self.layout.end,
        )


def plan_release(config: Config, start: datetime, end: datetime) -> ReleasePlan:
    try:
        layout = PartitionLayout.for_interval(
            tuple(m.name for m in config.metrics),
            tuple(config.regions),
            start,
            end,
            config.window,
            layout_components(config),
            reject_tallies(config),
        )
    except ValueError as exc:
        raise FusionError(f"--start/--end: {exc}") from None
    params = release_parameters(config)
    key = ReleaseKey(config.federation.id, layout.start, layout.end, layout.digest(), params.digest())
    period = period_of(config, layout.start, layout.end)
    return ReleasePlan(config=config, layout=layout, params=params, key=key, period=period)


def masking_graph(plan: ReleasePlan) -> MaskingGraph:
    """The release's public masking graph (privacy/masking_graph.py): the same for every party, from the
    federation's institutions, the release id, the quorum and the collusion bound."""
    return MaskingGraph.build(
        (i.id for i in plan.config.institutions),
        context=plan.key.release_id.encode(),
        quorum=plan.params.quorum,
        max_colluding=plan.params.max_colluding,
    )


def noise_variance_problem(plan: ReleasePlan, header: EnvelopeHeader) -> str | None:
    """Why an aggregate's stated noise variance is one its contributions could not hold (None when it could): with
    noise on it lies between v (what the guarantee keeps, whatever layers came off) and every contributor's sealed
    share. The key holder refuses such an aggregate before anything is charged (releases and training rounds): the
    variance is signed, and every error bar and the plausibility check rest on it."""
    variance = header.noise_variance
    ceiling = len(header.contributors) * plan.params.share_variance
    low, high = (plan.params.total_variance, ceiling) if plan.params.noise else (0.0, ceiling)
    if math.isfinite(variance) and low * (1 - 1e-9) <= variance <= high * (1 + 1e-9):
        return None
    return (
        f"a noise variance of {variance}, outside [{low:.6g}, {high:.6g}] for its {len(header.contributors)} "
        "contributors: it is not decrypted, nothing is charged"
    )

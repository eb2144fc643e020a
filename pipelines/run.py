"""Running the role pipelines on a Beam runner (DirectRunner unless Beam options say otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from fusion.config import InstitutionConfig
from fusion.errors import ReleaseRefused
from fusion.exchange import (
    aggregate_path,
    contribution_path,
    exists,
    join,
    read_bytes,
    refusal_path,
)
from fusion.plan import ReleasePlan
from pipelines.aggregate import Aggregate
from pipelines.contribute import Contribute
from privacy.envelope import EnvelopeHeader, unpack_envelope


def beam_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options from pass-through arguments (e.g. --runner=FlinkRunner); DirectRunner by default."""
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args, save_main_session=False)


def dead_letter_dir(plan: ReleasePlan, institution: InstitutionConfig) -> str:
    return join(plan.config.dead_letter_path(institution), plan.key.interval_name)


def _clear(directory: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.exists(directory):
        FileSystems.delete([directory])


def run_contributions(
    plan: ReleasePlan, institutions: Sequence[InstitutionConfig], beam_args: Sequence[str] = ()
) -> list[EnvelopeHeader]:
    """Run the contribution pipelines of `institutions` (one Beam pipeline); returns their envelope headers."""
    for institution in institutions:
        _clear(dead_letter_dir(plan, institution))
    with beam.Pipeline(options=beam_options(beam_args)) as pipeline:
        for institution in institutions:
            _ = pipeline | Contribute(plan, institution, dead_letter_dir(plan, institution))
    headers = []
    for institution in institutions:
        data = read_bytes(contribution_path(plan.config.exchange_path, plan.key, institution.id))
        headers.append(unpack_envelope(data)[0])
    return headers


def run_aggregate(plan: ReleasePlan, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the aggregator pipeline; returns the aggregate's header fields or raises ReleaseRefused."""
    with beam.Pipeline(options=beam_options(beam_args)) as pipeline:
        _ = pipeline | Aggregate(plan)
    exchange = plan.config.exchange_path
    if exists(refusal_path(exchange, plan.key)):
        import json

        refusal = json.loads(read_bytes(refusal_path(exchange, plan.key)))
        raise ReleaseRefused(f"aggregation refused: {refusal['reason']}")
    header, _ = unpack_envelope(read_bytes(aggregate_path(exchange, plan.key)))
    return {
        "contributors": list(header.contributors),
        "refused": list(header.refused),
        "noise_variance": header.noise_variance,
    }

"""Running the role pipelines on a Beam runner (DirectRunner unless Beam options say otherwise)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from fusion.config.federation import InstitutionConfig
from fusion.errors import ReleaseRefused
from fusion.feeds.scan import list_sources
from fusion.keys.registry import load_agreement_keys, load_signing_key
from fusion.release.exchange import (
    aggregation_status_path,
    contribution_path,
    exists,
    join,
    read_bytes,
    remove_tree,
    write_bytes,
    write_json,
)
from fusion.release.plan import ReleasePlan
from pipelines.aggregate import Aggregate
from pipelines.contribute import Contribute, dead_letter_dir, remove_staging
from pipelines.sealing import sealed_envelope
from pipelines.unmask import Answer, acknowledge, seal_unmask


def names_runner(beam_args: Sequence[str]) -> bool:
    """Whether the pass-through Beam arguments choose a runner (otherwise the local DirectRunner runs)."""
    return any(a.startswith("--runner") for a in beam_args)


def spreads_work(beam_args: Sequence[str]) -> bool:
    """Whether the scan shards should be redistributed among workers: a runner is named, or the DirectRunner is
    given several workers (in one in-memory worker, the extra shuffle would only cost time)."""
    if names_runner(beam_args):
        return True
    workers = PipelineOptions(list(beam_args)).view_as(DirectOptions).direct_num_workers
    return workers != 1


def beam_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options from pass-through arguments (e.g. --runner=FlinkRunner); DirectRunner by default."""
    args = list(beam_args)
    if not names_runner(args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args, save_main_session=False)


@contextmanager
def beam_scratch() -> Iterator[None]:
    """Run a pipeline with the system temp directory pointed at a private one, removed afterwards: Beam's
    runners leave empty scratch directories (beam-temp*, tmp*) behind after every pipeline."""
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="fusion-beam-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous


def report_path(plan: ReleasePlan, institution: InstitutionConfig) -> str:
    """The institution's local run report: rows read, accepted, bounded and rejected (never shared)."""
    return join(dead_letter_dir(plan, institution), "report.json")


def run_contributions(
    plan: ReleasePlan,
    institutions: Sequence[InstitutionConfig],
    beam_args: Sequence[str] = (),
    *,
    in_process: bool = False,
    accept_rejects: bool = False,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """Seal the contributions of `institutions` (one Beam pipeline); returns each one's local run report (row
    counts; `missing` feed paths, `files` refused whole, a `warning`; `withheld`: why it sealed nothing).

    An institution that already sealed this release's envelope is not run again: its noise share is drawn
    once per interval and kept by the institution (`sealed_envelope`), so no party ever sees two noisy versions
    of one contribution: an envelope deleted from the exchange is re-published as it was. One without any feed
    file for the interval seals nothing, nor does one above its max_reject_rate unless `accept_rejects`.
    `workers`: in process, how many scan shards or seals run at a time (pipelines.local.contribute_locally).
    """
    exchange = plan.config.exchange_path
    pending = []
    for institution in institutions:
        kept = sealed_envelope(plan, institution)
        if kept is None:
            if not exists(contribution_path(exchange, plan.key, institution.id)):
                pending.append(institution)
        else:
            # The same bytes again where they are missing, or where something else lies in this institution's
            # place (an envelope swapped or misfiled there): only its own envelope counts there.
            place = contribution_path(exchange, plan.key, institution.id)
            if not exists(place) or read_bytes(place) != kept:
                write_bytes(place, kept)
    if pending:
        load_agreement_keys(plan.config)  # every institution must be registered before anyone can mask
    for institution in pending:
        load_signing_key(plan.config, institution.id)  # fail now, not after the pipeline, if it is missing
        remove_tree(dead_letter_dir(plan, institution))
    listings = {institution.id: list_sources(plan, institution) for institution in pending}
    without_files = [i for i in pending if not listings[i.id].sources]
    for institution in without_files:  # no data for the interval: absent from it (reported, nothing sealed)
        missing = listings[institution.id].missing
        write_json(
            report_path(plan, institution),
            {
                "read": 0,
                "accepted": 0,
                "rejected": {},
                "missing": missing,
                "withheld": f"institution {institution.id} has no feed file for {plan.key.interval_name} (nothing "
                f"matches {', '.join(missing)}); it seals nothing",
            },
        )
    pending = [i for i in pending if i not in without_files]
    remove_staging(plan, institutions)  # what a crashed run left, including one that crashed after sealing
    try:
        if pending and in_process:
            from pipelines.local import contribute_locally

            contribute_locally(plan, pending, accept_rejects=accept_rejects, workers=workers)
        elif pending:
            # One pipeline for all of them: only packed vectors (one per scan shard) cross between its stages.
            with beam_scratch(), beam.Pipeline(options=beam_options(beam_args)) as pipeline:
                spread = spreads_work(beam_args)
                _ = pipeline | Contribute(plan, pending, spread=spread, accept_rejects=accept_rejects)
    finally:
        remove_staging(plan, pending)  # what is derived from the readings does not outlive the run
    reports = {}
    for institution in institutions:
        path = report_path(plan, institution)
        reports[institution.id] = json.loads(read_bytes(path)) if exists(path) else {}
    return reports


def run_aggregate(
    plan: ReleasePlan, beam_args: Sequence[str] = (), *, may_declare_absent: bool = True, in_process: bool = False
) -> dict[str, Any]:
    """Run the aggregator pipeline; returns its status (with `status` 'aggregated', 'awaiting_unmask' or
    'waiting', the contributors and the refused envelopes) or raises ReleaseRefused. `in_process` runs the
    same steps without Beam (pipelines/local.py), for small releases where a pipeline costs more than the work."""
    if in_process:
        from pipelines.local import aggregate_locally

        aggregate_locally(plan, may_declare_absent=may_declare_absent)
    else:
        with beam_scratch(), beam.Pipeline(options=beam_options(beam_args)) as pipeline:
            _ = pipeline | Aggregate(plan, may_declare_absent=may_declare_absent)
    exchange = plan.config.exchange_path
    status: dict[str, Any] = json.loads(read_bytes(aggregation_status_path(exchange, plan.key)))
    if status["status"] == "refused":
        raise ReleaseRefused(f"aggregation refused: {status['reason']}")
    return status


def run_unmask(plan: ReleasePlan, institutions: Sequence[InstitutionConfig]) -> list[Answer]:
    """The unmask round for `institutions` (included in the roster): each acknowledges the roster, then each
    answers it if enough institutions have acknowledged it (pipelines/unmask.py)."""
    rosters = {institution.id: acknowledge(plan, institution.id) for institution in institutions}
    return [seal_unmask(plan, institution.id, rosters[institution.id]) for institution in institutions]

"""A federation large enough for a sparse masking graph (12 institutions: k = 8, t = 5), end to end: envelopes
carry shares for their closed neighbourhood only, two institutions drop out, their neighbours' answers remove the
masks that no longer cancel, and the release is exact. A roster that would let the assumed colluders cut the
graph is never closed, nor answered."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fusion.errors import FusionError, ReleaseRefused
from fusion.release.exchange import contribution_path, read_bytes, unmask_path
from fusion.release.plan import plan_release
from fusion.release.planning import privacy_plan
from fusion.store.delta import Store
from pipelines.contribute import masking_graph
from pipelines.release import release
from pipelines.run import run_aggregate, run_contributions, run_unmask
from pipelines.unmask import Roster, check_roster, sparse_roster_problem
from privacy.envelope import envelope_header
from tests.conftest import END, START, Federation

pytestmark = pytest.mark.e2e

TWELVE = [(f"inst{i:02d}", "csv") for i in range(12)]


def test_a_sparse_federation_releases_exactly_with_two_institutions_absent(
    make_federation: Callable[..., Federation],
) -> None:
    fed = make_federation(noise=False, quorum=7, institutions=TWELVE, entities=1, extra_privacy="max_colluding = 1")
    plan = plan_release(fed.config, START, END)
    graph = masking_graph(plan)
    assert not graph.complete and (graph.degree, graph.threshold) == (8, 5)
    planned = privacy_plan(fed.config)[0]  # what `fusion plan` prints
    assert planned.mask_neighbours == 8 and "k = 8 neighbours" in planned.masking and "threshold 5" in planned.masking
    # Two neighbours drop out: each of their included neighbours loses at most 2 of its 9, t = 5 remain.
    absent = {graph.ring[0], graph.ring[1]}
    present = [i for i in fed.config.institutions if i.id not in absent]
    run_contributions(plan, present)
    for institution in present:
        header = envelope_header(read_bytes(contribution_path(fed.config.exchange_path, plan.key, institution.id)))
        closed = set(graph.closed(institution.id))
        assert set(header.seed_shares) == closed
        assert set(header.pair_commitments) == set(graph.neighbours(institution.id))
        assert len(header.pair_shares) == 8 * 9

    status = run_aggregate(plan)
    assert status["status"] == "awaiting_unmask" and set(status["absent"]) == absent
    run_unmask(plan, present)
    for institution in present:
        answer = envelope_header(read_bytes(unmask_path(fed.config.exchange_path, plan.key, institution.id)))
        # It reveals seeds of the included in its closed neighbourhood and keys its neighbours hold with the absent.
        assert set(answer.revealed_shares) == set(graph.closed(institution.id)) - absent
        expected = {
            f"{dealer}/{gone}"
            for dealer in graph.closed(institution.id)
            if dealer not in absent
            for gone in absent
            if graph.adjacent(dealer, gone)
        }
        assert set(answer.revealed_pair_shares) == expected
    assert run_aggregate(plan)["status"] == "aggregated"
    assert release(plan, Store(fed.config.store_path)).status == "released"
    released = Store(fed.config.store_path).read("releases")
    assert sum(released.column("count").to_pylist()) == sum(fed.raw[i.id].num_rows for i in present)


def test_a_roster_the_colluders_could_cut_or_that_starves_a_neighbourhood_is_refused(
    make_federation: Callable[..., Federation],
) -> None:
    """Five of one institution's eight neighbours absent leave it 4 of its closed 9, below t = 5: its masks could
    never be removed, so the aggregator closes no such roster and no institution would acknowledge one. And with
    k/2 = 4 consecutive ring positions absent, the 4 included opposite them cut the ring: a roster answered
    only while the coalition (one institution and max_colluding others) has fewer than 4 members."""
    fed = make_federation(noise=False, quorum=7, institutions=TWELVE, entities=1)
    plan = plan_release(fed.config, START, END)
    graph = masking_graph(plan)
    assert (graph.degree, graph.threshold) == (8, 5)
    victim = graph.ring[0]
    absent = {graph.ring[p] for p in (1, 2, 3, 4, -1)}
    included = tuple(sorted(set(graph.ring) - absent))
    roster = Roster(included, tuple(sorted(absent)), plan.key.release_id)
    with pytest.raises(FusionError, match=f"could never be removed: {victim} \\(4\\)"):
        check_roster(plan, included[0], roster)
    run_contributions(plan, [i for i in fed.config.institutions if i.id not in absent])
    with pytest.raises(ReleaseRefused, match=f"could never be removed: {victim} \\(4\\)"):
        run_aggregate(plan)

    cut = tuple(sorted(set(graph.ring) - set(graph.ring[:4])))
    cut_roster = Roster(cut, tuple(sorted(graph.ring[:4])), plan.key.release_id)
    assert graph.colluders_to_split(cut) == 4
    for colluding in (3, 4):  # with c = 3 the coalition is 4 institutions: enough to cut
        assert "cut the masking graph" in (sparse_roster_problem(graph, cut_roster, max_colluding=colluding) or "")
    assert sparse_roster_problem(graph, cut_roster, max_colluding=2) is None

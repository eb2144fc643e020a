"""The masking graph: public, deterministic, k-regular, complete for small federations, and its split check held
to a brute-force reference."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.masking_graph import MaskingGraph, dropout_failure_bound, neighbour_count

IDS = [f"inst-{i:03d}" for i in range(40)]


def test_neighbour_count_grows_logarithmically_and_covers_the_collusion_bound() -> None:
    assert [neighbour_count(n) for n in (5, 9, 12, 20, 100, 500, 1000)] == [4, 8, 8, 10, 14, 18, 20]
    # t = k/2 + 1 = 12 exceeds the coalition: one institution and 10 colluding with it, 11 in all
    assert neighbour_count(100, max_colluding=10) == 22
    assert neighbour_count(12, max_colluding=5) == 11  # 2 (c + 1) >= n - 1: the complete graph


@pytest.mark.parametrize("n", [8, *range(10, 70, 3), 100, 500])
@pytest.mark.parametrize("colluding", range(0, 9))
def test_no_coalition_the_guarantee_names_holds_a_threshold_of_anyone_s_shares(n: int, colluding: int) -> None:
    """The coalition is one institution (which knows its own contribution and noise) and up to max_colluding
    others: c + 1 institutions. Placed around a victim on the ring (its nearest neighbours, the worst case), they
    must hold fewer than `threshold` shares of the victim's secrets, which go to its closed neighbourhood only.
    With k = 2c the threshold was c + 1, and such a coalition rebuilt the victim's seed and mask keys."""
    ids = [f"inst-{i:03d}" for i in range(n)]
    graph = MaskingGraph.build(ids, context=b"r", quorum=colluding + 2, max_colluding=colluding)
    if graph.complete:
        assert graph.threshold == colluding + 2  # the quorum, at least c + 2 (the config's own check)
        return
    assert graph.threshold >= colluding + 2
    victim = graph.ring[0]
    nearest = sorted(graph.neighbours(victim), key=lambda i: min(graph.ring.index(i), n - graph.ring.index(i)))
    coalition = set(nearest[: colluding + 1])
    assert len(coalition & set(graph.closed(victim))) < graph.threshold


def test_a_small_federation_keeps_the_complete_graph_and_the_quorum_as_threshold() -> None:
    graph = MaskingGraph.build(["gamma", "alpha", "beta"], context=b"r", quorum=2)
    assert graph.complete and graph.threshold == 2 and graph.degree == 2
    assert graph.neighbours("beta") == ("alpha", "gamma")
    assert graph.closed("beta") == ("alpha", "beta", "gamma")
    assert graph.colluders_to_split(["alpha", "beta"]) is None


def test_the_graph_is_deterministic_from_the_institutions_and_the_release() -> None:
    one = MaskingGraph.build(IDS, context=b"release-1", quorum=20)
    again = MaskingGraph.build(list(reversed(IDS)), context=b"release-1", quorum=20)
    other = MaskingGraph.build(IDS, context=b"release-2", quorum=20)
    assert one == again
    assert all(one.neighbours(i) == again.neighbours(i) for i in IDS)
    assert one.ring != other.ring  # neighbourhoods change from release to release
    assert (one.degree, one.threshold) == (12, 7)


def test_the_sparse_graph_is_regular_and_symmetric() -> None:
    graph = MaskingGraph.build(IDS, context=b"r", quorum=20, degree=6)
    for i in IDS:
        assert len(graph.neighbours(i)) == 6 and i not in graph.neighbours(i)
        for j in IDS:
            assert graph.adjacent(i, j) == (j in graph.neighbours(i)) == (i in graph.neighbours(j))


def test_a_degree_below_twice_the_coalition_is_refused() -> None:
    for degree in (4, 6):  # 6 = 2c: the threshold 4 = c + 1, within reach of the coalition of c + 1
        with pytest.raises(ValueError, match="2 \\* \\(max_colluding \\+ 1\\) = 8"):
            MaskingGraph.build(IDS, context=b"r", quorum=20, degree=degree, max_colluding=3)
    assert MaskingGraph.build(IDS, context=b"r", quorum=20, degree=8, max_colluding=3).threshold == 5


def _connected(graph: MaskingGraph, nodes: set[str]) -> bool:
    if not nodes:
        return True
    seen, todo = set(), [next(iter(nodes))]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo += [j for j in graph.neighbours(node) if j in nodes and j not in seen]
    return seen == nodes


def _split_reference(graph: MaskingGraph, included: set[str]) -> int | None:
    """The fewest included institutions whose removal disconnects the rest of the included (by brute force)."""
    for size in range(len(included) - 1):
        for removed in itertools.combinations(sorted(included), size):
            rest = included - set(removed)
            if len(rest) >= 2 and not _connected(graph, rest):
                return size
    return None


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=6, max_value=11),
    half=st.integers(min_value=1, max_value=2),
    absent=st.sets(st.integers(min_value=0, max_value=10), max_size=5),
    context=st.binary(min_size=1, max_size=4),
)
def test_colluders_to_split_matches_a_brute_force_search(n: int, half: int, absent: set[int], context: bytes) -> None:
    ids = IDS[:n]
    graph = MaskingGraph.build(ids, context=context, quorum=2, degree=2 * half)
    included = {ids[i] for i in range(n) if i not in absent}
    if graph.complete or len(included) < 2:
        return
    assert graph.colluders_to_split(included) == _split_reference(graph, included)


def test_a_roster_that_starves_a_neighbourhood_is_reported() -> None:
    graph = MaskingGraph.build(IDS[:12], context=b"r", quorum=6, degree=4)  # t = 3 of each closed 5
    victim = graph.ring[5]
    absent = {graph.ring[3], graph.ring[4], graph.ring[6]}  # three of its four neighbours
    included = [i for i in graph.ring if i not in absent]
    assert victim in graph.short_of_shares(included)
    assert graph.short_of_shares(graph.ring) == {}


def test_the_dropout_bound_falls_with_the_answer_rate() -> None:
    graph = MaskingGraph.build(IDS, context=b"r", quorum=20)
    assert dropout_failure_bound(graph, present=0.95) < dropout_failure_bound(graph, present=0.8) < 1
    assert dropout_failure_bound(graph, present=1.0) == 0.0

"""Network files: the shipped case5 and its licence, validation messages that name the field, round trips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mechanisms.network import NetworkError, load_network, network_path, parse_network, shipped_networks

GOOD = {
    "network": {"name": "two"},
    "buses": [{"id": "A", "load_mw": 0.0}, {"id": "B", "region": "north", "scale": 2.0}],
    "lines": [{"from": "A", "to": "B", "reactance": 0.1, "limit_mw": 60.0}],
    "generators": [{"id": "g", "bus": "A", "capacity_mw": 200.0, "cost": 10.0}],
}


def test_case5_ships_with_matpowers_licence_and_its_source() -> None:
    assert "case5" in shipped_networks()
    path = network_path("case5")
    text = path.read_text()
    assert "Li and R. Bo" in text and "MATPOWER" in text and "illustrative" in text
    licence = (path.parent / "LICENSE-MATPOWER.txt").read_text()
    assert "Redistribution and use in source and binary forms" in licence
    assert "Power Systems Engineering Research Center (PSERC)" in licence
    case5 = load_network(path)
    assert [b.id for b in case5.buses] == ["A", "B", "C", "D", "E"]
    assert case5.fixed_loads().tolist() == [0.0, 300.0, 300.0, 400.0, 0.0]
    assert sum(g.capacity_mw for g in case5.generators) == 1530.0


def test_a_network_round_trips_through_its_file_and_maps_regions(tmp_path: Path) -> None:
    case5 = load_network(network_path("case5"))
    mapped = case5.with_regions({"B": ("north", 30.0), "D": ("south", 40.0)})
    assert mapped.regions() == ("north", "south")
    assert mapped.fixed_loads().tolist() == [0.0, 0.0, 300.0, 0.0, 0.0]
    (tmp_path / "n.toml").write_text(mapped.to_toml())
    again = load_network(tmp_path / "n.toml")
    assert again == mapped and again.digest() == mapped.digest() != case5.digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["lines"][0].update({"to": "C"}), "lines[0].to: unknown bus 'C'"),
        (lambda d: d["generators"][0].update({"bus": "Z"}), "generators[0].bus: unknown bus 'Z'"),
        (lambda d: d["buses"][1].pop("scale"), "region and scale go together"),
        (lambda d: d["buses"][0].update({"region": "x", "scale": 1.0}), "give load_mw (a fixed load) or region"),
        (lambda d: d["lines"][0].update({"reactance": 0.0}), "lines[0].reactance: Input should be greater than 0"),
        (lambda d: d["lines"][0].update({"reactance": 1e-320}), "lines[0].reactance: 9.99989e-321 per unit gives line "
         "A-B a susceptance (base_mva / reactance) of inf MW/rad, above the 1e+12 the solver can hold"),
        (lambda d: d["lines"][0].update({"reactance": 1e-13}), "lines[0].reactance: 1e-13 per unit gives line A-B a "
         "susceptance (base_mva / reactance) of 1e+15 MW/rad"),
        (lambda d: d["buses"].append({"id": "C", "load_mw": 1.0}), "buses ['C'] are not connected to bus 'A'"),
        (lambda d: d["buses"].append({"id": "A"}), "buses: ids ['A'] appear more than once"),
        (lambda d: d["generators"][0].update({"min_mw": 300.0}), "min_mw 300.0 is above capacity_mw 200.0"),
        (lambda d: d["network"].update({"reference": "Q"}), "network.reference: 'Q' is neither"),
    ],
)
def test_a_bad_network_is_refused_naming_the_field(change: Callable[[dict[str, Any]], object], message: str) -> None:
    import copy

    doc = copy.deepcopy(GOOD)
    change(doc)
    with pytest.raises(NetworkError) as caught:
        parse_network(doc, where="n.toml")
    assert "invalid network file n.toml" in str(caught.value)
    assert message in str(caught.value)


def test_a_missing_network_or_unknown_shipped_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="network file not found"):
        load_network(tmp_path / "nope.toml")
    with pytest.raises(NetworkError, match="no shipped network of that name"):
        network_path("case9999")
    (tmp_path / "bad.toml").write_text("[network\n")
    with pytest.raises(NetworkError, match="is not valid TOML"):
        load_network(tmp_path / "bad.toml")

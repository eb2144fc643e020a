"""Network files: buses (mapped to the federation's regions), lines with reactance and limit, generators with
capacity, cost and emission rate; validated at load into frozen models, with messages naming the file and field.

A network file is TOML:

    [network]
    name = "case5"
    base_mva = 100.0          # per-unit base of the reactances
    reference = "load"        # LMP energy component: "load" (load-weighted, distributed) or a bus id
    voll = 1000.0             # optional, $/MWh: unserved load allowed at this price; without it load must be met

    [[buses]]
    id = "B"
    load_mw = 300.0           # a fixed load, or: region = "..." and scale = MW per unit of the region's statistic

    [[lines]]
    from = "A"
    to = "B"
    reactance = 0.0281        # per unit on base_mva
    limit_mw = 400.0          # optional: no limit

    [[generators]]
    id = "Alta"
    bus = "A"
    capacity_mw = 40.0
    cost = 14.0               # $/MWh
    co2 = 0.95                # t/MWh
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fusion.errors import FusionError

SHIPPED = Path(__file__).resolve().parent / "networks"
_ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,63}$")]
#: The largest susceptance (base_mva / reactance, MW per radian) a line may have: HiGHS treats matrix values of 1e15
#: and more as infinite (the LP then reads as infeasible, for no stated reason), and no real line comes near (a
#: reactance of 1e-5 per unit on 100 MVA is 1e7).
MAX_SUSCEPTANCE = 1e12


class NetworkError(FusionError):
    """A network file is missing or invalid; the message names the file and the field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


class Bus(_Frozen):
    id: _ID
    load_mw: float | None = Field(default=None, ge=0)
    region: str | None = None
    scale: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _load(self) -> Self:
        if self.region is not None and self.load_mw is not None:
            raise ValueError("give load_mw (a fixed load) or region with scale (a load from the store), not both")
        if (self.region is None) != (self.scale is None):
            raise ValueError("region and scale go together: scale is the bus's MW per unit of the region's statistic")
        return self


class Line(_Frozen):
    id: _ID | None = None
    from_bus: str = Field(alias="from")
    to_bus: str = Field(alias="to")
    reactance: float = Field(gt=0)
    limit_mw: float | None = Field(default=None, gt=0)

    @property
    def name(self) -> str:
        return self.id or f"{self.from_bus}-{self.to_bus}"


class Generator(_Frozen):
    id: _ID
    bus: str
    capacity_mw: float = Field(ge=0)
    min_mw: float = Field(default=0.0, ge=0)
    cost: float  # $/MWh
    co2: float = Field(default=0.0, ge=0)  # t/MWh

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.min_mw > self.capacity_mw:
            raise ValueError(f"min_mw {self.min_mw} is above capacity_mw {self.capacity_mw}")
        return self


class NetworkHeader(_Frozen):
    name: str = Field(min_length=1)
    base_mva: float = Field(default=100.0, gt=0)
    reference: str = "load"
    voll: float | None = Field(default=None, gt=0)
    source: str = ""


class Network(_Frozen):
    """A DC network. Buses, lines and generators keep the file's order (the LP's variable order)."""

    network: NetworkHeader
    buses: tuple[Bus, ...] = Field(min_length=1)
    lines: tuple[Line, ...] = ()
    generators: tuple[Generator, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ids = [b.id for b in self.buses]
        _distinct("buses", ids)
        _distinct("lines", [line.name for line in self.lines])
        _distinct("generators", [g.id for g in self.generators])
        known = set(ids)
        for index, line in enumerate(self.lines):
            for end, bus in (("from", line.from_bus), ("to", line.to_bus)):
                if bus not in known:
                    raise ValueError(f"lines[{index}].{end}: unknown bus '{bus}'")
            if line.from_bus == line.to_bus:
                raise ValueError(f"lines[{index}]: a line from bus '{line.from_bus}' to itself")
            susceptance = self.network.base_mva / line.reactance
            if not susceptance <= MAX_SUSCEPTANCE:  # an overflow to inf too
                raise ValueError(
                    f"lines[{index}].reactance: {line.reactance:g} per unit gives line {line.name} a susceptance "
                    f"(base_mva / reactance) of {susceptance:g} MW/rad, above the {MAX_SUSCEPTANCE:g} the solver can "
                    "hold: give a realistic reactance, or merge the two buses"
                )
        for index, generator in enumerate(self.generators):
            if generator.bus not in known:
                raise ValueError(f"generators[{index}].bus: unknown bus '{generator.bus}'")
        if self.network.reference != "load" and self.network.reference not in known:
            raise ValueError(f"network.reference: '{self.network.reference}' is neither \"load\" nor a bus id")
        islands = _islands(ids, [(line.from_bus, line.to_bus) for line in self.lines])
        if islands:
            raise ValueError(
                f"buses {islands} are not connected to bus '{ids[0]}' by any line; a DC network is one island "
                "(split it into two files, or add the missing lines)"
            )
        return self

    @property
    def name(self) -> str:
        return self.network.name

    def bus_index(self) -> dict[str, int]:
        return {bus.id: i for i, bus in enumerate(self.buses)}

    def regions(self) -> tuple[str, ...]:
        """The federation regions whose data sets this network's loads, in bus order, each once."""
        return tuple(dict.fromkeys(b.region for b in self.buses if b.region is not None))

    def fixed_loads(self) -> np.ndarray:
        """MW per bus from the file alone (a bus mapped to a region reads 0 here)."""
        return np.array([b.load_mw or 0.0 for b in self.buses])

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def digest(self) -> str:
        """SHA-256 of the network's content (not of the file's text): recorded in each recommendation's inputs."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_toml(self) -> str:
        """The network as a network file (the inverse of `load_network`)."""
        doc = self.canonical()
        lines = ["[network]", *(f"{k} = {_toml(v)}" for k, v in doc["network"].items())]
        for section in ("buses", "lines", "generators"):
            for entry in doc.get(section, []):
                lines += ["", f"[[{section}]]", *(f"{k} = {_toml(v)}" for k, v in entry.items())]
        return "\n".join(lines) + "\n"

    def with_regions(self, mapping: dict[str, tuple[str, float]]) -> Network:
        """A copy whose buses in `mapping` (bus -> (region, scale)) take their load from the region's data."""
        unknown = sorted(set(mapping) - {b.id for b in self.buses})
        if unknown:
            raise NetworkError(f"network {self.name}: no buses {unknown}")
        buses = tuple(
            b.model_copy(update={"load_mw": None, "region": mapping[b.id][0], "scale": mapping[b.id][1]})
            if b.id in mapping
            else b
            for b in self.buses
        )
        return self.model_copy(update={"buses": buses})


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a network holds finite numbers only")
    return repr(value)


def _distinct(label: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{label}: ids {repeated} appear more than once")


def _islands(buses: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """Buses not connected to the first one (breadth-first over the lines)."""
    neighbours: dict[str, set[str]] = {b: set() for b in buses}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen, frontier = {buses[0]}, [buses[0]]
    while frontier:
        frontier = [n for b in frontier for n in neighbours[b] if n not in seen]
        seen.update(frontier)
    return [b for b in buses if b not in seen]


def shipped_networks() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def network_path(spec: str, *, base: Path = Path(".")) -> Path:
    """A network file: `spec` ending in .toml is a path (relative to `base`), anything else a shipped network."""
    if spec.endswith(".toml"):
        path = Path(spec)
        return path if path.is_absolute() else base / path
    if spec not in shipped_networks():
        raise NetworkError(
            f"mechanisms.network = '{spec}': no shipped network of that name (shipped: "
            f"{', '.join(shipped_networks())}); a network file's path ends in .toml"
        )
    return SHIPPED / f"{spec}.toml"


def parse_network(doc: dict[str, Any], *, where: str = "network") -> Network:
    try:
        return Network.model_validate(doc)
    except ValidationError as exc:
        lines = [
            f"  {_field(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" if err["loc"]
            else f"  {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise NetworkError(f"invalid network file {where}:\n" + "\n".join(lines)) from None


def load_network(path: str | Path) -> Network:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NetworkError(f"network file not found: {path} (mechanisms.network in the config names it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NetworkError(f"network file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise NetworkError(f"network file {path} is not valid TOML: {exc}") from None
    return parse_network(doc, where=str(path))


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


__all__ = [
    "Bus",
    "Generator",
    "Line",
    "Network",
    "NetworkError",
    "load_network",
    "network_path",
    "parse_network",
    "shipped_networks",
]

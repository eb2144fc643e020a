"""The repository's floors: a module imports modules of its own floor and of those beneath, never one above.

The command line on top, the Python API and what sits beside it (the demo, mechanisms/, dashboard/), the Beam wiring
(pipelines/) and training, forecasting/ (which pipelines refresh after a release, and which reads released series
through fusion.store.access, the read surface that fusion.api re-exports) beside what a model's rounds cost by the
config (training.charging, over training.accounting and training.gradients: an institution's seal checks in
pipelines/ count its training rounds by it), then the store and the keys, one interval's release and the feeds, the
config, and at the bottom Fusion's errors and runtime over privacy/ and schemas/, which import nothing of Fusion.
Function-level imports count, and so do imports under TYPE_CHECKING.
docs/development.md ("Layout and floors") has the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion", "pipelines", "privacy", "schemas", "forecasting", "mechanisms", "dashboard", "training")
#: (floor, groups): a group is a package or module; a module belongs to its longest group.
FLOORS = [
    (8, ["fusion.cli"]),
    (7, ["fusion.api", "fusion.demo", "mechanisms", "dashboard"]),
    (6, ["pipelines", "training"]),
    (5, ["forecasting", "fusion.trust", "training.charging", "training.accounting", "training.gradients"]),
    (4, ["fusion.store", "fusion.keys"]),
    (3, ["fusion.release", "fusion.feeds"]),
    (2, ["fusion.config"]),
    (1, ["fusion", "fusion.errors", "fusion.runtime"]),
    (0, ["privacy", "schemas"]),
]
FLOOR = {group: floor for floor, groups in FLOORS for group in groups}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def group_of(module: str) -> str | None:
    matches = [g for g in FLOOR if module == g or module.startswith(g + ".")]
    return max(matches, key=len) if matches else None


def group(module: str) -> str:
    found = group_of(module)
    assert found is not None, f"{module} is in no group of FLOORS"
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The repository modules `module` imports anywhere in its file (resolved to the longest known module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def edges() -> list[tuple[str, str]]:
    known = modules()
    return sorted((m, t) for m, path in known.items() for t in imports(m, path, known))


def test_every_module_stands_on_a_floor() -> None:
    """A new module of fusion/ goes into a group (a subpackage named for its concept), not beside api and errors."""
    homeless = sorted(m for m in modules() if group_of(m) is None or (group_of(m) == "fusion" and m != "fusion"))
    assert not homeless, f"modules in no group of FLOORS: {homeless}"


def test_no_module_imports_a_higher_floor() -> None:
    upward = [
        f"{m} (floor {FLOOR[group(m)]}) imports {t} (floor {FLOOR[group(t)]})"
        for m, t in edges()
        if FLOOR[group(m)] < FLOOR[group(t)]
    ]
    assert not upward, "\n".join(upward)


def test_the_groups_import_one_another_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for m, t in edges():
        if group(m) != group(t):
            graph.setdefault(group(m), set()).add(group(t))
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "groups import in a cycle: " + " -> ".join([*path[path.index(name) :], name])
        if name not in done:
            for target in sorted(graph.get(name, ())):
                visit(target, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_privacy_and_schemas_import_nothing_of_fusion() -> None:
    assert not [
        (m, t)
        for m, t in edges()
        if m.split(".")[0] in ("privacy", "schemas") and t.split(".")[0] not in ("privacy", "schemas")
    ]


def test_every_package_says_what_it_is_for() -> None:
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc) > 40 and "placeholder" not in doc.lower(), f"{path.relative_to(ROOT)} says nothing"

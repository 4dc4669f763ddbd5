"""The folder tree shows the architecture, and this test keeps it so.

It builds the import graph of kiln's own modules with ``ast`` (every import, top-level or inside a
function) and fails on an import cycle, on an import from a lower layer to a higher one, on
serving importing anything but the ground floor, and on a module over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "cluster", "pipelines", "actors", "serving", "bench")
MAX_LINES = 600

# Layers, lowest first. A module may import modules of its own layer or below, never above.
# The longest matching prefix wins.
GROUND, HELPERS, ACTORS, CONFIG_ROOT, DRIVERS, TOP = range(6)
LAYERS: dict[str, int] = {
    "core": GROUND,  # config base, run directory, JSONL, metrics, chat format
    "cluster": HELPERS,  # where work runs: Ray runtime, its config, dashboard gauges
    "serving": HELPERS,  # the Serve application (and, below, only the ground floor)
    "pipelines.data": HELPERS,  # each stage family's helpers
    "pipelines.train": HELPERS,
    "pipelines.rlhf": HELPERS,
    "pipelines.quickstart": HELPERS,
    "pipelines.eval": HELPERS,
    "actors": ACTORS,  # one file per PPO role, built on the helpers
    "pipelines.config": CONFIG_ROOT,  # the config root imports every section
    # Stage drivers: one per `kiln` subcommand.
    "pipelines.data.stage": DRIVERS,
    "pipelines.train.pretrain": DRIVERS,
    "pipelines.train.sft": DRIVERS,
    "pipelines.train.reward_model": DRIVERS,
    "pipelines.train.dpo": DRIVERS,
    "pipelines.rlhf.ppo": DRIVERS,
    "pipelines.rlhf.preferences": DRIVERS,
    "pipelines.quickstart.generate": DRIVERS,
    "pipelines.eval.stage": DRIVERS,
    # What a user runs: the CLI, the run report, job submission, benchmarks.
    "pipelines": TOP,
    "pipelines.cli": TOP,
    "pipelines.report": TOP,
    "cluster.submit": TOP,
    "bench": TOP,
}
# Packages that may import only these (besides themselves).
ONLY = {"serving": ("core",), "core": ()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            # The longest known module that the name is or lies inside.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) for m, p in modules.items()}


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        assert any(module == p or module.startswith(p + ".") for p in LAYERS), f"{module} has no layer in LAYERS"


def test_no_import_goes_up_a_layer() -> None:
    bad = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(ONLY))
def test_restricted_packages_import_only_what_they_may(package: str) -> None:
    allowed = (package, *ONLY[package])
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if m == package or m.startswith(package + ".")
        for d in sorted(deps)
        if d.split(".")[0] not in allowed
    ]
    assert not bad, f"{package} may import only {allowed}:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_over_600_lines() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_catch_what_they_guard(tmp_path: Path) -> None:
    """The graph sees function-local and relative imports (so a hidden upward import is caught)."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from pipelines.rlhf import ppo\n    from .sibling import thing\n")
    known = {"pipelines.rlhf.ppo", "pkg.sibling", "pkg.x"}
    assert _imports(path, "pkg.x", known) == {"pipelines.rlhf.ppo", "pkg.sibling"}
    assert _layer("pipelines.rlhf.ppo") > _layer("actors.learner") > _layer("pipelines.rlhf.ppo_math")

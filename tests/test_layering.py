"""The package's imports point one way: logits <- store <- data <- {dump, train} <- bench <- cli.

Every ``import`` and ``from ... import`` in kdcache (at module level, inside functions and under
TYPE_CHECKING alike) is parsed and checked against the layer of its target.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"

#: Lower numbers are lower layers; a module may import only modules of a strictly lower layer,
#: or modules of its own layer inside its own subpackage (within-layer cycles are checked apart).
LAYERS: dict[str, int] = {
    "kdcache._version": 0,
    "kdcache.errors": 0,
    "kdcache.choices": 0,
    "kdcache.wording": 0,
    "kdcache.progress": 0,
    "kdcache.logits": 1,
    "kdcache.temporaries": 1,
    "kdcache.store.format": 2,
    "kdcache.store.read": 3,
    "kdcache.store.write": 3,
    "kdcache.store.ranks": 4,
    "kdcache.store.tools": 5,
    "kdcache.store.sequence": 4,
    "kdcache.store.bridges": 6,  # other tools' soft-label files, imported through the tools
    "kdcache.store": 6,  # the package's exports
    "kdcache.models": 7,
    "kdcache.runtime": 7,
    "kdcache.run_folder": 7,
    "kdcache.options": 7,
    "kdcache.augment": 7,
    "kdcache.data": 8,
    "kdcache.plots": 8,
    "kdcache.config": 8,
    "kdcache.store_config": 9,  # the store commands' configs, built on kdcache.config
    "kdcache.distributed": 9,
    "kdcache.checkpoints": 9,
    "kdcache.lm": 9,  # hf models and text data; trained by kdcache.train
    "kdcache.dump": 10,
    "kdcache.train": 10,
    "kdcache.bench": 11,
    "kdcache.integrations": 11,  # stores in other frameworks' training code
    "kdcache.lm.dump": 11,
    "kdcache.bench.lm": 12,  # times kdcache.lm.dump
    "kdcache.cli": 13,
    "kdcache.__main__": 14,
    "kdcache": 15,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_key(name: str) -> str:
    """The entry of :data:`LAYERS` that governs ``name`` (its longest matching prefix)."""
    candidates = [key for key in LAYERS if name == key or name.startswith(key + ".")]
    if not candidates:
        raise AssertionError(f"{name} has no layer: add it to LAYERS in {__file__}")
    return max(candidates, key=len)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # "from kdcache.store import reader" imports the submodule kdcache.store.read.reader
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "kdcache" or name.startswith("kdcache.")}


def existing_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {
    name: {
        target
        for raw in imported_modules(path)
        if (target := existing_module(raw, set(MODULES))) and target != name
    }
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    own = layer_key(name)
    for target in sorted(GRAPH[name]):
        if name != "kdcache" and target == "kdcache":
            raise AssertionError(
                f"{name} imports the package root; import the module that defines the name"
            )
        if name.startswith(target + ".") and target != "kdcache":
            # a module may import its own subpackage's __init__ only if it re-exports; forbid below
            continue
        theirs = layer_key(target)
        same_subpackage = theirs == own
        assert same_subpackage or LAYERS[theirs] < LAYERS[own], (
            f"{name} (layer {LAYERS[own]}, {own}) imports {target} (layer {LAYERS[theirs]}, "
            f"{theirs}): "
            "imports must point to lower layers"
        )


def test_no_module_imports_its_own_subpackage_root() -> None:
    offenders = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if name.startswith(target + ".")
        and (PACKAGE.parent / target.replace(".", "/") / "__init__.py").exists()
    ]
    assert not offenders, f"import the defining module, not the subpackage root: {offenders}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if target.startswith(node + ".") or node.startswith(target + "."):
                continue  # a package and its own submodules
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_layer_table_names_real_modules() -> None:
    assert all(existing_module(key, set(MODULES)) == key for key in LAYERS), (
        "LAYERS names a module that no longer exists"
    )

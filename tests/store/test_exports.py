"""Every store module declares its public names in ``__all__``, and nothing outside a module
imports a name it keeps internal: the rest of kdcache, the tests and the pipelines import only
what a module lists (parsed with ``ast``, imports inside functions included)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "kdcache" / "store"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


STORE_MODULES = {module_name(path): path for path in sorted(STORE.rglob("*.py"))}


def declared_all(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            value = ast.literal_eval(node.value)  # type: ignore[attr-defined]
            return list(value)
    return None


def store_imports() -> list[tuple[str, str, str]]:
    """``(importing file, store module, name)`` for every ``from kdcache.store.X import name``
    in kdcache, tests and pipelines, except a module's imports of its own subpackage's modules."""
    found = []
    for folder in ("kdcache", "tests", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.module in STORE_MODULES):
                    continue
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in STORE_MODULES:
                        continue  # a submodule, not a name
                    found.append((str(path.relative_to(ROOT)), node.module, alias.name))
    return found


@pytest.mark.parametrize("module", sorted(STORE_MODULES))
def test_every_store_module_lists_existing_names(module: str) -> None:
    names = declared_all(STORE_MODULES[module])
    assert names is not None, f"{module} declares no __all__"
    assert len(names) == len(set(names)), f"{module}.__all__ lists a name twice"
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{module}.__all__ names {missing}, which it does not define"


def test_only_listed_names_are_imported_from_store_modules() -> None:
    exported = {module: set(declared_all(path) or ()) for module, path in STORE_MODULES.items()}
    internal = [
        f"{where}: {name} from {module}"
        for where, module, name in store_imports()
        if name not in exported[module]
    ]
    assert not internal, "imports of names outside __all__:\n" + "\n".join(internal)

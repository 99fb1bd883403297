"""The largest modules and the longest functions of a kdcache tree, as Markdown tables.

    python pipelines/code_size.py [--root kdcache] [--top 10] [--commit COMMIT]

Module size is the file's line count; function size is the lines from a ``def`` (its decorators
excluded) to its last line, for every function and method, nested ones included. Run on another
commit's copy (``git archive COMMIT | tar -x -C /tmp/before``, then ``--root
/tmp/before/kdcache --commit COMMIT``, which writes its paths as ``COMMIT:kdcache/...``, git's
name of a file at a commit) for the "before" figures of docs/architecture.md's "Module and function
sizes".
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_sizes(root: Path) -> list[tuple[int, str]]:
    """(lines, path relative to ``root``'s parent) of every module under ``root``, largest
    first."""
    sizes = [
        (len(path.read_text().splitlines()), path.relative_to(root.parent).as_posix())
        for path in root.rglob("*.py")
    ]
    return sorted(sizes, key=lambda size: (-size[0], size[1]))


def function_sizes(root: Path) -> list[tuple[int, str]]:
    """(lines, ``path:qualified.name``) of every function and method under ``root``, longest
    first."""
    sizes: list[tuple[int, str]] = []
    for path in root.rglob("*.py"):
        where = path.relative_to(root.parent).as_posix()
        sizes.extend(
            (lines, f"{where}:{name}") for lines, name in _functions(ast.parse(path.read_text()))
        )
    return sorted(sizes, key=lambda size: (-size[0], size[1]))


def _functions(node: ast.AST, prefix: str = "") -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                assert child.end_lineno is not None  # set by ast.parse
                found.append((child.end_lineno - child.lineno + 1, name))
            found.extend(_functions(child, f"{name}."))
        else:
            found.extend(_functions(child, prefix))
    return found


def table(rows: list[tuple[int, str]], what: str, *, commit: str | None = None) -> str:
    """A Markdown table of ``rows`` under the heading ``what``, each path prefixed by
    ``commit:`` when given."""
    prefix = f"{commit}:" if commit else ""
    lines = [f"| {what} | lines |", "|---|---|"]
    lines.extend(f"| `{prefix}{name}` | {size} |" for size, name in rows)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).parents[1] / "kdcache")
    parser.add_argument("--top", type=int, default=10, help="Rows of each table.")
    parser.add_argument("--commit", help="The commit --root is a copy of, written before paths.")
    args = parser.parse_args()
    modules = module_sizes(args.root)
    print(f"{len(modules)} modules, {sum(size for size, _ in modules)} lines\n")
    print(table(modules[: args.top], "module", commit=args.commit))
    print()
    print(table(function_sizes(args.root)[: args.top], "function", commit=args.commit))


if __name__ == "__main__":
    main()

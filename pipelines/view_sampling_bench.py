"""Views per second of drawing a recipe's parameter table (``Recipe.sample_table``), one core.

Every dump, online run and CE-with-augmentation run draws the table of N x V view records
before its first batch; this measures that cost for ImageNet-sized tables (N = 1.28M, V = 16
by default). ``--baseline REF`` also times the generator of another commit (``git show
REF:kdcache/augment/recipe.py``, e.g. the per-view ``numpy.random.default_rng`` loop that
counter-v1 replaced) on ``--baseline-views`` views::

    PYTHONPATH=. OMP_NUM_THREADS=1 python pipelines/view_sampling_bench.py --baseline 2c877c9

Prints one line per recipe and, with ``--json PATH``, writes the figures there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdcache import parse_recipe

RECIPES = {  # recipe -> input size (H, W) it is drawn for
    "rrc+flip": (224, 224),
    "pad-crop:4+flip": (32, 32),
    "rrc+flip+mixup:0.2": (224, 224),
    "pad-crop:4+flip+cutmix:1": (32, 32),
}


def old_recipe_module(ref: str) -> Any:
    """``kdcache/augment/recipe.py`` as of git ``ref``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{ref}:kdcache/augment/recipe.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_recipe.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_recipe", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def views_per_second(
    parse: Any, spec: str, size: tuple[int, int], n: int, views: int
) -> tuple[float, float]:
    """Views per wall-clock second and per CPU second of this process (one core: numpy draws on
    one thread), the latter unaffected by other processes sharing the core."""
    recipe = parse(spec)
    wall, cpu = time.perf_counter(), time.process_time()
    table = recipe.sample_table(seed=0, num_samples=n, views=views, size=size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert table.shape == (n, views, len(recipe.fields))
    return n * views / wall, n * views / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_281_167, help="N (ImageNet's train set)")
    parser.add_argument("--views", type=int, default=16, help="V per sample")
    parser.add_argument("--baseline", help="git ref whose recipe.py to time as well")
    parser.add_argument("--baseline-views", type=int, default=20_000, help="views it draws")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    old = None if args.baseline is None else old_recipe_module(args.baseline)
    results = []
    for spec, size in RECIPES.items():
        row: dict[str, Any] = {"recipe": spec, "size": list(size)}
        row["views_per_s"], row["views_per_cpu_s"] = views_per_second(
            parse_recipe, spec, size, args.samples, args.views
        )
        line = (
            f"{spec:<26} {args.samples:,} x {args.views}: {row['views_per_s'] / 1e6:6.2f} M "
            f"views/s ({row['views_per_cpu_s'] / 1e6:.2f} M per CPU s)"
        )
        if old is not None:
            n = max(1, args.baseline_views // args.views)
            wall, cpu = views_per_second(old.parse_recipe, spec, size, n, args.views)
            row["baseline_views_per_s"], row["baseline_views_per_cpu_s"] = wall, cpu
            row["speedup_cpu"] = row["views_per_cpu_s"] / cpu
            line += (
                f"  {args.baseline}: {wall / 1e3:5.1f} k views/s ({cpu / 1e3:.1f} k per CPU s,"
                f" {row['speedup_cpu']:.0f}x)"
            )
        print(line, flush=True)
        results.append(row)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"samples": args.samples, "views": args.views, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()

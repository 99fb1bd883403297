"""Bytes per view of each augmentation recipe and preset: stored parameters and whole store.

    PYTHONPATH=. python pipelines/recipe_bytes_bench.py --out /tmp/kdcache-recipe-bytes

For every recipe (the presets of kdcache.augment.catalog, and ``rrc+flip`` followed by each
colour, policy and erasing operation alone) draws the view parameters of N samples x V views
for 224 x 224 inputs with ``Recipe.sample_table`` (timed: views drawn per second, one core),
writes a real store through the public API (``create_store(..., augment=augment_record(...),
view_params=...)``) holding the same ImageNet-like C = 1000 logits for every recipe
(pipelines/view_bytes_bench.py's ``ViewTeacher``, ``--encoding``, topk:5 by default), and
reports the ``view_params`` array on disk and the whole store per view. Only ``view_params``
depends on the recipe; the logits column shows what it adds to. Prints a Markdown table
(docs/benchmarks.md holds a run's output) and writes it, with the raw numbers as JSON, under
--out. Stores are deleted once measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from view_bytes_bench import BLOCK, ViewTeacher, store_split

from kdcache import create_store, open_store, parse_recipe
from kdcache.augment.catalog import PRESETS
from kdcache.augment.views import augment_record

INPUT_SIZE = (224, 224)
#: Each operation of view-parameter layout 2 alone, after the usual crop and flip.
SINGLE_OPERATIONS = (
    "rrc+flip",
    "rrc+flip+jitter:0.4",
    "rrc+flip+jitter:0.4,0.4,0.4,0.1",
    "rrc+flip+gray:0.2",
    "rrc+flip+blur:23,p=0.5",
    "rrc+flip+randaugment:2,9",
    "rrc+flip+trivialaugment",
    "rrc+flip+autoaugment",
    "rrc+flip+erase:0.25",
    "rrc+flip+erase:0.25,value=random",
)


def measure(
    out: Path, teacher: ViewTeacher, specs: list[str], *, views: int, encoding: str
) -> list[dict[str, Any]]:
    """One store per recipe, all holding the same logits; their bytes per view."""
    num_samples = len(teacher.labels)
    writers, paths, drawn = {}, {}, {}
    for number, spec in enumerate(specs):
        recipe = parse_recipe(spec)
        recipe.sample_table(seed=0, num_samples=1, views=1, size=INPUT_SIZE)  # imports, caches
        started = time.perf_counter()
        table = recipe.sample_table(seed=0, num_samples=num_samples, views=views, size=INPUT_SIZE)
        seconds = time.perf_counter() - started
        drawn[spec] = (recipe, table, seconds)
        paths[spec] = out / f"recipe{number}-v{views}.zarr"
        shutil.rmtree(paths[spec], ignore_errors=True)
        writers[spec] = create_store(
            paths[spec],
            num_samples=num_samples,
            num_classes=1000,
            encoding=encoding,
            labels=teacher.labels,
            views=views,
            augment=augment_record(recipe, seed=0, size=INPUT_SIZE),
            view_params=table,
            fsync=False,  # durability does not change the bytes; skip its cost
        )
    for start in range(0, num_samples, BLOCK):
        stop = min(start + BLOCK, num_samples)
        logits = teacher.block(start, stop, views).reshape(-1, 1000)
        rows = np.arange(start * views, stop * views)
        for writer in writers.values():
            writer.write(rows, logits)
    results = []
    for spec, writer in writers.items():
        writer.finalize()
        recipe, table, seconds = drawn[spec]
        reader = open_store(paths[spec])
        np.testing.assert_array_equal(reader.view_params, table)  # kept exactly
        split = store_split(paths[spec], set(reader.encoding.layout(1000)))
        rows_total = num_samples * views
        results.append(
            {
                "recipe": spec,
                "spec": recipe.spec,
                "views": views,
                "encoding": encoding,
                "params_per_view": len(recipe.fields),
                "bytes_per_view": sum(split.values()) / rows_total,
                "split_per_view": {part: n / rows_total for part, n in split.items()},
                "views_drawn_per_s": rows_total / seconds,
            }
        )
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(paths[spec])
    return results


def table(results: list[dict[str, Any]], num_samples: int) -> str:
    first = results[0]
    lines = [
        f"N = {num_samples:,} samples x V = {first['views']} views at 224 x 224, C = 1000 "
        f"`{first['encoding']}` logits; bytes per view on disk.",
        "",
        "| recipe | P floats | raw 4P B | view_params B/view | logits B/view | store B/view "
        "| views drawn/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["split_per_view"]
        lines.append(
            f"| `{r['recipe']}` | {r['params_per_view']} | {4 * r['params_per_view']} | "
            f"**{s['view_params']:.1f}** | {s['logits']:.1f} | {r['bytes_per_view']:.1f} | "
            f"{r['views_drawn_per_s'] / 1e6:.2f} M |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/kdcache-recipe-bytes", help="Folder for results.")
    parser.add_argument("--samples", type=int, default=5_000, help="Samples (images) per store.")
    parser.add_argument("--views", type=int, default=16, help="Views per sample.")
    parser.add_argument("--encoding", default="topk:5", help="Encoding of the logits.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [*SINGLE_OPERATIONS, *PRESETS]
    teacher = ViewTeacher(args.samples, spread=0.5)
    results = measure(out, teacher, specs, views=args.views, encoding=args.encoding)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results, args.samples)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

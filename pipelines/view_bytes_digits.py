"""Bytes per view of real multi-view dumps at C = 10 (digits), split as view_bytes_bench.py does.

    PYTHONPATH=. python pipelines/view_bytes_digits.py --out /tmp/kdcache-view-bytes

Trains an ``mlp:256,128`` teacher on ``digits:16`` with recipe A of docs/results.md
(``rrc:scale=0.35-1,ratio=0.75-1.33``, no flip: a mirrored digit is another glyph) and dumps it
with ``dump_teacher`` for every V and encoding; prints a Markdown table and writes it, with the
raw numbers as JSON, under --out. Stores are deleted once measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from view_bytes_bench import store_split

from kdcache import DumpConfig, TrainConfig, dump_teacher, open_store, parse_recipe, train

DATASET, RECIPE = "digits:16", "rrc:scale=0.35-1,ratio=0.75-1.33"
ENCODINGS = ("float16", "int8", "topk:5")


def run_digits(out: Path, views_list: list[int]) -> list[dict[str, Any]]:
    """Bytes per view of real digits dumps (C = 10) at every V and encoding."""
    folder = out / "digits"
    teacher = train(
        TrainConfig(
            model="mlp:256,128",
            dataset=DATASET,
            out=str(folder / "teacher"),
            epochs=10,
            augment=RECIPE,
            lr=3e-3,
            batch_size=64,
            device="cpu",
            overwrite=True,
        )
    )
    rows = []
    for views in views_list:
        for encoding in ENCODINGS:
            path = folder / f"v{views}-{encoding.replace(':', '')}.zarr"
            dumped = dump_teacher(
                DumpConfig(
                    teacher="mlp:256,128",
                    weights=str(folder / "teacher" / "best.pt"),
                    dataset=DATASET,
                    out=str(path),
                    encoding=encoding,
                    device="cpu",
                    views=views,
                    augment=RECIPE,
                    augment_seed=0,
                    overwrite=True,
                )
            )
            reader = open_store(path)
            split = store_split(path, set(reader.encoding.layout(reader.num_classes)))
            total, num_rows = sum(split.values()), dumped.num_samples * views
            rows.append(
                {
                    "recipe": RECIPE,
                    "views": views,
                    "encoding": encoding,
                    "params_per_view": len(parse_recipe(RECIPE).fields),
                    "num_samples": dumped.num_samples,
                    "bytes": total,
                    "bytes_per_view": total / num_rows,
                    "bytes_per_image": total / dumped.num_samples,
                    "split_per_view": {part: n / num_rows for part, n in split.items()},
                    "teacher_val_acc": teacher.best,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(path)
    return rows


def digits_table(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    parts = [
        f"### Bytes per view at C = 10 (digits:16, N = {first['num_samples']:,}, recipe "
        f"`{first['recipe']}`, {first['params_per_view']} floats per view; teacher mlp:256,128 "
        f"{first['teacher_val_acc']:.1f}% val)",
        "",
        "| encoding | V | B/view | logits | view_params | rest | B/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (ENCODINGS.index(r["encoding"]), r["views"])):
        s = r["split_per_view"]
        parts.append(
            f"| {r['encoding']} | {r['views']} | **{r['bytes_per_view']:.1f}** | "
            f"{s['logits']:.1f} | {s['view_params']:.1f} | {s['rest']:.1f} | "
            f"{r['bytes_per_image']:,.0f} |"
        )
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="/tmp/kdcache-view-bytes", help="Folder for stores and results."
    )
    parser.add_argument("--views", default="1,4,16", help="Comma-separated V values.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_digits(out, sorted(int(v) for v in args.views.split(",")))
    (out / "results-digits.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = digits_table(rows)
    (out / "tables-digits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

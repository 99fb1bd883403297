"""Ensemble distillation on digits: three teachers, one student per store, per merged store and
for the multi-store run, three seeds each.

Every step calls kdcache's public Python API (`train`, `dump_teacher`, `merge_stores`,
`distill`), in one process; each step's command-line equivalent is printed as it runs. Steps
whose output exists are skipped, so an interrupted run continues where it stopped.

1. Train three teachers of different architectures and seeds (cross-entropy, 15 epochs).
2. Dump each one's logits over the training split (float32) and, to score the ensemble itself,
   over the test split.
3. Merge the three stores: the mean of the logits (float32) and the mixture at T = 4.
4. Distill `mlp:32` (20 epochs, lr 3e-3, kd, T = 4, alpha = 0.7: the setting of
   docs/results.md) from each teacher's store, from each merged store and from the three stores
   at once (`distill --cache a --cache b --cache c`, mean), for seeds 0, 1 and 2.
5. Print Markdown tables of the teachers' and students' test accuracies (mean ± std over seeds)
   and write ``summary.json``.

Run from the repository root: ``PYTHONPATH=. python pipelines/ensemble_digits.py --out DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import (
    DistillConfig,
    DumpConfig,
    TrainConfig,
    distill,
    dump_teacher,
    merge_stores,
    open_store,
    train,
)

TEACHERS = {"cnn-s0": ("cnn", 0), "cnn8-s1": ("cnn:8", 1), "mlp256-s2": ("mlp:256", 2)}
STUDENT: dict[str, Any] = dict(
    student="mlp:32", epochs=20, lr=3e-3, loss="kd", temperature=4.0, alpha=0.7
)


def finished(target: Path, epochs: int | None) -> bool:
    """Whether ``target`` exists; for a run folder (``epochs`` given), whether its metrics hold
    every epoch (``last.pt`` is written after each epoch, so it marks no finished run)."""
    if epochs is None:
        return target.exists()
    metrics = target / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= epochs


def once(
    target: Path,
    command: str,
    step: Callable[..., Any],
    *args: Any,
    epochs: int | None = None,
    dry: bool = False,
    **options: Any,
) -> None:
    """Run ``step(*args, **options)`` (whose command line is ``command``) unless ``target``
    already holds its result (a run folder of ``epochs`` epochs, or a store), or ``dry``."""
    if dry or finished(target, epochs):
        return
    started = time.perf_counter()
    step(*args, **options)
    print(f"  {time.perf_counter() - started:6.1f}s {command}", flush=True)


def final_accuracy(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_acc"]


def store_accuracy(store: Path) -> float:
    reader = open_store(store)
    logits = reader.read_dense(np.arange(reader.num_samples))
    labels = reader.labels
    assert labels is not None
    return 100.0 * float((logits.argmax(dim=1).numpy() == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="Run nothing: print the tables of the runs finished so far.",
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="Student seeds (comma-separated) [default: 0,1,2]."
    )
    args = parser.parse_args()
    out: Path = args.out
    run_once = functools.partial(once, dry=args.summarize)
    out.mkdir(parents=True, exist_ok=True)
    for name, (model, seed) in TEACHERS.items():
        run = out / name
        run_once(
            run,
            f"kdcache train --model {model} --epochs 15 --seed {seed} --out {run}",
            train,
            TrainConfig(
                model=model, epochs=15, seed=seed, out=str(run), overwrite=True,
                device=args.device,
            ),
            epochs=15,
        )  # fmt: skip
        for split in ("train", "test"):
            store = out / f"{name}-{split}.zarr"
            run_once(
                store,
                f"kdcache dump-teacher --teacher {model} --weights {run}/best.pt --split {split} "
                f"--encoding float32 --out {store}",
                dump_teacher,
                DumpConfig(
                    teacher=model, weights=str(run / "best.pt"), dataset="digits",
                    split=split, encoding="float32", out=str(store), device=args.device,
                ),
            )  # fmt: skip
    merges: dict[str, dict[str, Any]] = {
        "mean": {"mode": "mean"},
        "mixture-T4": {"mode": "mixture", "temperature": 4.0},
    }
    for split in ("train", "test"):
        stores = [out / f"{name}-{split}.zarr" for name in TEACHERS]
        for merge, options in merges.items():
            target = out / f"ensemble-{merge}-{split}.zarr"
            flags = " ".join(
                f"--{key} {value:g}" if key == "temperature" else f"--{key} {value}"
                for key, value in options.items()
            )
            run_once(
                target,
                f"kdcache merge {' '.join(map(str, stores))} --out {target} {flags}",
                merge_stores,
                stores,
                target,
                **options,
            )
    train_stores = tuple(str(out / f"{name}-train.zarr") for name in TEACHERS)
    conditions: dict[str, str | tuple[str, ...]] = {
        **{f"from {name}": str(out / f"{name}-train.zarr") for name in TEACHERS},
        "from the merged store (mean)": str(out / "ensemble-mean-train.zarr"),
        "from 3 stores at once (mean)": train_stores,
        "from the merged store (mixture, T=4)": str(out / "ensemble-mixture-T4-train.zarr"),
    }
    results: dict[str, list[float]] = {}
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for index, (condition, cache) in enumerate(conditions.items()):
            run = out / f"kd{index}-seed{seed}"
            caches = cache if isinstance(cache, tuple) else (cache,)
            if args.summarize:
                if finished(run, STUDENT["epochs"]):
                    results.setdefault(condition, []).append(final_accuracy(run))
                continue
            run_once(
                run,
                f"kdcache distill {' '.join(f'--cache {c}' for c in caches)} --student mlp:32 "
                f"--epochs 20 --lr 3e-3 --temperature 4 --alpha 0.7 --seed {seed} --out {run}",
                distill,
                DistillConfig(
                    cache=cache, seed=seed, out=str(run), overwrite=True,
                    device=args.device, **STUDENT,
                ),
                epochs=STUDENT["epochs"],
            )  # fmt: skip
            results.setdefault(condition, []).append(final_accuracy(run))
    teachers = {
        name: {
            "val_acc": store_accuracy(out / f"{name}-test.zarr"),
            "train_store_acc": store_accuracy(out / f"{name}-train.zarr"),
        }
        for name in TEACHERS
    }
    for merge in merges:
        teachers[f"ensemble ({merge})"] = {
            "val_acc": store_accuracy(out / f"ensemble-{merge}-test.zarr"),
            "train_store_acc": store_accuracy(out / f"ensemble-{merge}-train.zarr"),
        }
    print("\n| teacher | test acc. (%) | train acc. (%) |\n|---|---|---|")
    for name, accuracy in teachers.items():
        print(f"| {name} | {accuracy['val_acc']:.2f} | {accuracy['train_store_acc']:.2f} |")
    print("\n| student `mlp:32` | final test acc. (%) | seeds 0 / 1 / 2 |\n|---|---|---|")
    for condition, scores in results.items():
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        each = " / ".join(f"{score:.2f}" for score in scores)
        print(f"| {condition} | {statistics.mean(scores):.2f} ± {spread:.2f} | {each} |")
    (out / "summary.json").write_text(
        json.dumps({"teachers": teachers, "students": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

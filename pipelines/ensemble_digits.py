"""Ensemble distillation on digits: three teachers, one student per store, per merge and per
multi-store run, three seeds each.

Every step is a `kdcache` command (run as `python -m kdcache`); only the summary reads the run
folders and stores, through the public API. Steps whose output exists are skipped, so an
interrupted run continues where it stopped.

1. Train three teachers of different architectures and seeds (cross-entropy, 15 epochs).
2. Dump each one's logits over the training split (float32) and, to score the ensemble itself,
   over the test split.
3. Merge the three stores: the mean of the logits (float32) and the mixture at T = 4.
4. Distill `mlp:32` (20 epochs, lr 3e-3, kd, T = 4, alpha = 0.7; the setting of
   docs/results.md) from each teacher's store, from each merged store and from the three
   stores at once (`distill --cache a --cache b --cache c`, mean and mixture), plus the
   cross-entropy-only student, for seeds 0, 1 and 2.
5. Print a Markdown table of final test accuracies (mean ± std over seeds) and write
   ``summary.json``.

Run from the repository root: ``PYTHONPATH=. python pipelines/ensemble_digits.py --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kdcache import open_store

TEACHERS = {"cnn-s0": ("cnn", 0), "cnn16-s1": ("cnn:16", 1), "mlp256-s2": ("mlp:256", 2)}
STUDENT = ("--student", "mlp:32", "--epochs", "20", "--lr", "3e-3", "--loss", "kd")
KD = ("--temperature", "4", "--alpha", "0.7")
SEEDS = (0, 1, 2)


def kdcache(*args: str) -> None:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdcache", "-q", *args], check=True)
    print(f"  {time.perf_counter() - started:6.1f}s kdcache {' '.join(args)}", flush=True)


def once(target: Path, *args: str) -> None:
    """Run the command unless ``target`` (a run's last.pt or a store) already exists."""
    if not target.exists():
        kdcache(*args)


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
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = ("--device", args.device)
    for name, (model, seed) in TEACHERS.items():
        once(
            out / name / "last.pt",
            "train", "--model", model, "--dataset", "digits", "--epochs", "15", "--seed",
            str(seed), "--out", str(out / name), "--overwrite", *device,
        )  # fmt: skip
        for split in ("train", "test"):
            once(
                out / f"{name}-{split}.zarr",
                "dump-teacher", "--teacher", model, "--weights", str(out / name / "best.pt"),
                "--dataset", "digits", "--split", split, "--encoding", "float32",
                "--out", str(out / f"{name}-{split}.zarr"), *device,
            )  # fmt: skip
    merges = {"mean": ("--mode", "mean"), "mixture-T4": ("--mode", "mixture", "--temperature", "4")}
    for split in ("train", "test"):
        stores = [str(out / f"{name}-{split}.zarr") for name in TEACHERS]
        for merge, options in merges.items():
            target = out / f"ensemble-{merge}-{split}.zarr"
            once(target, "merge", *stores, "--out", str(target), *options)
    train_stores = [str(out / f"{name}-train.zarr") for name in TEACHERS]
    caches = [arg for store in train_stores for arg in ("--cache", store)]
    conditions: dict[str, tuple[str, ...]] = {
        **{f"from {name}": ("--cache", str(out / f"{name}-train.zarr")) for name in TEACHERS},
        "from the merged store (mean)": ("--cache", str(out / "ensemble-mean-train.zarr")),
        "from 3 stores at once (mean)": (*caches, "--teacher-mix", "mean"),
        "from the merged store (mixture, T=4)": (
            "--cache",
            str(out / "ensemble-mixture-T4-train.zarr"),
        ),
        "from 3 stores at once (mixture)": (*caches, "--teacher-mix", "mixture"),
    }
    results: dict[str, list[float]] = {}
    for seed in SEEDS:
        run = out / f"ce-seed{seed}"
        once(
            run / "last.pt",
            "train", "--model", "mlp:32", "--dataset", "digits", "--epochs", "20", "--lr",
            "3e-3", "--seed", str(seed), "--out", str(run), "--overwrite", *device,
        )  # fmt: skip
        results.setdefault("cross-entropy only", []).append(final_accuracy(run))
        for index, (condition, source) in enumerate(conditions.items()):
            run = out / f"kd{index}-seed{seed}"
            once(
                run / "last.pt",
                "distill", *source, *STUDENT, *KD, "--seed", str(seed), "--out", str(run),
                "--overwrite", *device,
            )  # fmt: skip
            results.setdefault(condition, []).append(final_accuracy(run))
    teachers = {
        name: {
            "val_acc": final_accuracy(out / name),
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

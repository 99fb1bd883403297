"""The augmentation-consistency measurements of docs/results.md, on digits upscaled to 16 px.

Usage: python pipelines/augment_results.py OUT [--epochs E] [--seeds 0,1,2] [--jobs J]
                                              [--teacher-device cuda] [--dataset SPEC]
                                              [--teacher-dataset SPEC] [--teacher SPEC]
                                              [--student SPEC] [--recipe R] [--lr LR]
                                              [--batch-size B] [--threads N]

Trains an mlp:256,128 teacher with cross-entropy on random-resized crops (by default; --teacher,
--student, --recipe and --dataset choose others), dumps it as float16 stores
of V = 1, 4, 16 and E views plus a clean-input store, then trains an mlp:32 student per seed as:
CE without and with augmentation, online consistent KD (the teacher in the loop on the same
views), distillation from the clean store without augmentation and with student-only
augmentation (Beyer's fixed teacher), and distillation from each multi-view store. Writes
OUT/augment_results.json and OUT/augment_results.md (tables with mean ± std over seeds, store
sizes for float16 and topk:5 at each V, dump throughput per view against the bare teacher, and
how far the teacher's logits on the views are from its logits on the clean inputs).
Runs go through the public Python API, J at a time, one torch thread each; the students train
on the CPU, the teacher (training, dumps, online KD) runs on --teacher-device.

Why digits upscaled to 16 px: on the 8x8 originals a crop of a third of the area keeps about 5x5
pixels of a digit, so resizing it back invents most of the image; at 16 px the same crop keeps
the digit's strokes, and the recipe (random-resized crops of 35-100 % of the area, no flip, since a
mirrored digit is another glyph) is a sensible one for the task. The models are small MLPs (they
pool to 8x8 first) so that the whole study fits two CPU cores; --teacher resnet18
--teacher-device cuda uses a stronger teacher where there is a GPU.

On those centred digits augmentation does not help the students (docs/results.md). The variant
digits:16:200:2 (200 training samples, every image, train and test, moved by up to 2 px) is one
where it does: position is a nuisance the 200 samples do not cover, so a translation
(pad-crop:2) is the sensible prior for an mlp:256 student, which has no translation invariance
(a cnn student, with its global pooling, gains nothing from it); docs/results.md runs the study
there with a cnn:32 teacher, trained on those 200 samples or, with --teacher-dataset
digits:16:1437:2, on the whole jittered training split.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

DATASET = "digits:16"
RECIPE = "rrc:scale=0.35-1,ratio=0.75-1.33"  # no flip: a mirrored digit is another glyph
TEACHER, STUDENT = "mlp:256,128", "mlp:32"
COMMON = {"lr": 3e-3, "batch_size": 64, "device": "cpu"}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from kdcache import DistillConfig, TrainConfig
    from kdcache.train.loop import distill, train

    kind = job.pop("kind")
    name = job.pop("name")
    started = time.perf_counter()
    result = train(TrainConfig(**job)) if kind == "train" else distill(DistillConfig(**job))
    return {
        "name": name,
        "seed": job["seed"],
        "best": result.best,
        "final": result.final,
        "seconds": time.perf_counter() - started,
    }


def _dump(
    out: Path,
    views: int,
    encoding: str,
    *,
    weights: Path,
    device: str,
    teacher: str,
    recipe: str,
    dataset: str,
) -> dict[str, Any]:
    from kdcache import DumpConfig
    from kdcache.dump.teacher import dump_teacher

    augment: dict[str, Any] = (
        {} if views == 0 else {"views": views, "augment": recipe, "augment_seed": 0}
    )
    result = dump_teacher(
        DumpConfig(
            teacher=teacher,
            weights=str(weights),
            dataset=dataset,
            out=str(out),
            encoding=encoding,
            device=device,
            batch_size=512,
            **augment,
        )
    )
    rows = result.num_samples * result.views
    if result.bytes_on_disk is None:  # a dump to a local folder always measures its size
        raise RuntimeError(f"{out}: the dump did not report its size on disk")
    return {
        "store": out.name,
        "views": views,
        "encoding": encoding,
        "bytes": result.bytes_on_disk,
        "bytes_per_sample": result.bytes_per_sample,
        "bytes_per_view": result.bytes_on_disk / rows,
        "loop_s": result.loop_time_s,
        "rows_per_s": rows / result.loop_time_s,
    }


def _bare_forward(
    weights: Path, views: int, *, device: str, spec: str, recipe_spec: str, dataset_spec: str
) -> dict[str, float]:
    """Rows/s of the teacher alone on the same views, built in advance (no augmentation, no
    store), and of building the views alone."""
    import torch

    from kdcache.augment.recipe import parse_recipe
    from kdcache.augment.views import AllViews, ViewSource, input_size
    from kdcache.data.datasets import build_dataset
    from kdcache.models import build_model, load_weights

    dataset = build_dataset(dataset_spec)
    recipe = parse_recipe(recipe_spec)
    params = recipe.sample_table(
        seed=0, num_samples=len(dataset), views=views, size=input_size(dataset)
    )
    views_of = AllViews(ViewSource(dataset, recipe, params))
    started = time.perf_counter()
    inputs = torch.cat([views_of[i][0] for i in range(len(dataset))])
    build_s = time.perf_counter() - started
    teacher = build_model(spec, num_classes=10, in_channels=1)
    load_weights(teacher, weights, spec=spec)
    teacher.to(device).eval()
    inputs = inputs.to(device)
    with torch.inference_mode():
        teacher(inputs[:512])  # warm-up (cuDNN autotuning, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in inputs.split(512):
            teacher(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    forward_s = time.perf_counter() - started
    return {
        "views": views,
        "forward_rows_per_s": inputs.shape[0] / forward_s,
        "build_rows_per_s": inputs.shape[0] / build_s,
    }


def _views_vs_clean(clean: Path, views: Path, temperature: float = 4.0) -> dict[str, float]:
    """How far the teacher's logits on each view are from its logits on the clean input: what
    a fixed teacher (clean cache, student augmented) gets wrong. Mean KL(view || clean) at the
    distillation temperature, and the share of views whose top class is the clean input's."""
    import numpy as np
    import torch

    from kdcache import open_store

    clean_store, views_store = open_store(str(clean)), open_store(str(views))
    samples = np.arange(clean_store.num_samples)
    on_clean = torch.log_softmax(clean_store.read_dense(samples) / temperature, -1)
    logits, _ = views_store.read_views(samples, temperature=temperature)
    on_views = torch.log_softmax(logits / temperature, -1)
    kl = (on_views.exp() * (on_views - on_clean[:, None])).sum(-1)
    same_top = logits.argmax(-1) == on_clean.argmax(-1)[:, None]
    return {
        "views": views_store.views,
        "kl_view_clean": float(kl.mean()),
        "top1_agreement": 100 * float(same_top.float().mean()),
    }


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--view-counts", default="1,4,16", help="V of the caches, plus --epochs")
    parser.add_argument("--teacher-device", default="cpu")
    parser.add_argument("--teacher", default=TEACHER, help="teacher spec (cnn:8 for a smoke test)")
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument(
        "--dataset", default=DATASET, help="dataset spec, e.g. digits:16:200:2 (see the docstring)"
    )
    parser.add_argument(
        "--teacher-dataset",
        help="what the teacher trains on [default: --dataset]; e.g. digits:16:1437:2, the whole "
        "training split of which digits:16:200:2 is a subset (same images, same test split)",
    )
    parser.add_argument("--lr", type=float, default=COMMON["lr"], help="every run's Adam lr")
    parser.add_argument("--batch-size", type=int, default=COMMON["batch_size"])
    parser.add_argument(
        "--threads",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="torch threads for the teacher's training and dumps on the CPU (the student runs "
        "use one each); 1 on a machine shared with other jobs, where several threads wait on "
        "each other",
    )
    args = parser.parse_args()
    dataset = args.dataset
    common = {**COMMON, "lr": args.lr, "batch_size": args.batch_size}
    teacher_spec, student, recipe = args.teacher, args.student, args.recipe
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = args.epochs
    view_counts = sorted({*(int(v) for v in args.view_counts.split(",")), epochs})
    report: dict[str, Any] = {
        "dataset": dataset,
        "teacher_dataset": args.teacher_dataset or dataset,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "recipe": recipe,
        "teacher": teacher_spec,
        "student": student,
        "epochs": epochs,
        "seeds": seeds,
    }

    import torch

    torch.set_num_threads(args.threads)
    from kdcache import TrainConfig
    from kdcache.train.loop import train

    teacher_dir = out / "teacher"
    started = time.perf_counter()
    teacher = train(
        TrainConfig(
            model=teacher_spec,
            dataset=args.teacher_dataset or dataset,
            out=str(teacher_dir),
            epochs=args.teacher_epochs,
            augment=recipe,
            seed=0,
            overwrite=True,
            **{**common, "device": args.teacher_device},
        )
    )
    report["teacher_val_acc"] = teacher.best
    report["teacher_s"] = time.perf_counter() - started
    weights = teacher_dir / "best.pt"
    print(f"teacher {teacher.best:.2f}% in {report['teacher_s']:.0f}s", flush=True)

    device = args.teacher_device
    where = {
        "weights": weights,
        "device": device,
        "teacher": teacher_spec,
        "recipe": recipe,
        "dataset": dataset,
    }
    stores: list[dict[str, Any]] = [_dump(out / "clean.zarr", 0, "float16", **where)]
    for views in view_counts:
        for encoding in ("float16", "topk:5"):
            stores.append(_dump(out / f"v{views}-{encoding[:4]}.zarr", views, encoding, **where))
    report["stores"] = stores
    report["bare"] = _bare_forward(
        weights, 16, device=device, spec=teacher_spec, recipe_spec=recipe, dataset_spec=dataset
    )
    compared = 16 if 16 in view_counts else max(view_counts)
    report["views_vs_clean"] = _views_vs_clean(out / "clean.zarr", out / f"v{compared}-floa.zarr")
    print(json.dumps(stores, indent=1), json.dumps(report["bare"]), flush=True)

    online = {"teacher": teacher_spec, "weights": str(weights), "dataset": dataset}
    jobs = []
    for seed in seeds:
        base = {"seed": seed, "epochs": epochs, "overwrite": True, **common}
        runs = {
            "CE": ("train", {"model": student, "dataset": dataset}),
            "CE + augmentation": (
                "train",
                {"model": student, "dataset": dataset, "augment": recipe},
            ),
            "online consistent KD": (
                "distill",
                {"student": student, "augment": recipe, **online, "device": device},
            ),
            "clean cache, no augmentation": (
                "distill",
                {"student": student, "cache": str(out / "clean.zarr")},
            ),
            "clean cache + student augmentation (fixed teacher)": (
                "distill",
                {"student": student, "cache": str(out / "clean.zarr"), "student_augment": recipe},
            ),
        }
        for views in view_counts:
            runs[f"cache V={views}"] = (
                "distill",
                {"student": student, "cache": str(out / f"v{views}-floa.zarr")},
            )
        for name, (kind, options) in runs.items():
            folder = out / "runs" / f"{name.split(' (')[0].replace(' ', '_')}-seed{seed}"
            jobs.append({"kind": kind, "name": name, "out": str(folder), **base, **options})
    # The online runs (the longest, and on the teacher's device) start first.
    jobs.sort(key=lambda job: job["name"] != "online consistent KD")
    started = time.perf_counter()
    # Spawned, not forked: the parent's torch thread pool is not fork-safe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        results = list(pool.map(_run, jobs))
    report["runs"] = results
    report["runs_s"] = time.perf_counter() - started
    (out / "augment_results.json").write_text(json.dumps(report, indent=1) + "\n")

    lines = [
        f"dataset {dataset}; Adam lr {args.lr}, batch {args.batch_size}",
        f"teacher {teacher_spec} (CE on {args.teacher_dataset or dataset} with {recipe}, "
        f"{args.teacher_epochs} epochs): "
        f"{teacher.best:.2f}% best val",
        "",
        f"| student {student}, {epochs} epochs | best val acc % | final val acc % | s per run |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["name"] for r in results):
        mine = [r for r in results if r["name"] == name]
        lines.append(
            f"| {name} | {_mean_std([r['best'] for r in mine])} | "
            f"{_mean_std([r['final'] for r in mine])} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} |"
        )
    lines += [
        "",
        "| store | V | encoding | B/sample | B/view | dump rows/s |",
        "|---|---|---|---|---|---|",
    ]
    for s in stores:
        lines.append(
            f"| {s['store']} | {s['views'] or 1} | {s['encoding']} | {s['bytes_per_sample']:.0f} | "
            f"{s['bytes_per_view']:.1f} | {s['rows_per_s']:.0f} |"
        )
    bare = report["bare"]
    lines += [
        "",
        f"bare teacher forward on the V=16 views: {bare['forward_rows_per_s']:.0f} rows/s; "
        f"building the views alone: {bare['build_rows_per_s']:.0f} rows/s",
    ]
    gap = report["views_vs_clean"]
    lines.append(
        f"teacher on the V={gap['views']} views against on the clean inputs: mean KL(view || "
        f"clean) at T=4 {gap['kl_view_clean']:.4f}, same top class on "
        f"{gap['top1_agreement']:.1f}% of the views"
    )
    (out / "augment_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

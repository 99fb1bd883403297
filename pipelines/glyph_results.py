"""Results at 1,000 classes (docs/results.md): a small ResNet teacher and a much smaller student on
``glyphs:1000``: CE against KD from the cache in every encoding, the temperature sweep, and
augmented views (clean-view cache, V = 1, 4, 16, online consistent KD, with and without mixup).

Usage: python pipelines/glyph_results.py OUT [--dataset glyphs:1000:16:20]
           [--teacher-dataset glyphs:1000:16:100] [--teacher resnet:16] [--teacher-epochs 4]
           [--teacher-weights PATH] [--student resnet:8] [--epochs 6] [--seeds 0,1,2] [--jobs 2]
           [--parts encodings,sweep,views] [--device cpu]

The defaults are the setting of docs/results.md, sized for 2 CPU cores and an hour: a teacher
trained on 100 images per class, students (16x fewer multiply-adds) on the first 20 of them, so
that the students are data-starved and the teacher's soft targets have something to add.

Everything goes through kdcache's public Python API: ``train`` (the teacher, with
cross-entropy, unless ``--teacher-weights`` names one already trained), ``dump_teacher`` (a
clean-input store per encoding and a float16 store per recipe and V), then one student run per
setting and seed with ``train`` (CE) or ``distill`` (KD from a store, or from the live teacher for
the online baseline), J runs at a time in spawned processes with one torch thread each. After a
run its last checkpoint is scored on the test split: accuracy and the expected calibration error
(ECE, 15 equal-width confidence bins, Guo et al., ICML 2017).

Parts (``--parts``):

* ``encodings``: CE, and KD (T = ``--temperature``, alpha 0.7) from float16, int8 and topk:K
  (K = 1, 5, 10, 20) stores of the clean inputs, every seed.
* ``sweep``: KD from the float16 store at T = 1, 2, 4, 8, 16, every seed.
* ``views``: for the recipe ``--recipe`` and the same recipe with mixup: CE with augmentation,
  online consistent KD (the teacher in the loop on the student's views), the clean-input cache
  with the student alone augmented (Beyer's fixed teacher; not with mixup, which a student-only
  augmentation cannot hold), and caches of V = 1, 4, 16 views; without the ``encodings`` part
  also CE and KD from the clean float16 store, both unaugmented, as references.

Writes OUT/glyph_results.json and OUT/glyph_results.md (mean ± std over seeds, store sizes, wall
times, the load average at each stage). ``pipelines/glyph_results_gpu.sh`` is the larger
setting for a GPU machine.
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

#: The students' training set (the stores are dumped on it) and the teacher's, a superset.
DATASET, TEACHER_DATASET = "glyphs:1000:16:20", "glyphs:1000:16:100"
TEACHER, STUDENT = "resnet:16", "resnet:8"
#: Random-resized crops of half the area or more and horizontal flips (issue 21's rrc+flip). A
#: mirrored glyph is often another class's glyph (b and d, p and q): CE with this recipe learns
#: a wrong label for those views, a teacher run on the view does not.
RECIPE = "rrc:scale=0.5-1,ratio=0.8-1.25+flip"
MIXUP = "mixup:0.2"
ENCODINGS = ("float16", "int8", "topk:1", "topk:5", "topk:10", "topk:20")
SWEEP_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0)
VIEW_COUNTS = (1, 4, 16)
PARTS = ("encodings", "sweep", "views")
ECE_BINS = 15


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE in percent: the mean over equal-width confidence bins of |accuracy - confidence|,
    weighted by the share of samples in each bin (Guo et al., ICML 2017)."""
    import torch

    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    which = torch.bucketize(confidence, edges[1:-1])
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = correct[members].mean() - confidence[members].double().mean()
            total += float(members.double().mean() * gap.abs())
    return 100 * total


def _score(checkpoint: Path, dataset_spec: str, spec: str) -> dict[str, float]:
    """Accuracy and ECE (%) of a checkpoint on the test split."""
    import torch

    from kdcache.data.datasets import build_dataset
    from kdcache.models import build_model, load_weights

    test = build_dataset(dataset_spec, split="test")
    model = build_model(spec, num_classes=test.num_classes, in_channels=test.in_channels)
    load_weights(model, checkpoint, spec=spec)
    model.eval()
    inputs = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.from_numpy(test.labels)
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(model(x), dim=1) for x in inputs.split(1024)])
    return {
        "test_acc": 100 * float((probs.argmax(1) == labels).double().mean()),
        "ece": expected_calibration_error(probs, labels),
    }


def _run(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from kdcache import DistillConfig, TrainConfig, distill, train

    kind, name, part = job.pop("kind"), job.pop("name"), job.pop("part")
    scored_on, spec = job.pop("scored_on"), job.pop("spec")
    started = time.perf_counter()
    result = train(TrainConfig(**job)) if kind == "train" else distill(DistillConfig(**job))
    return {
        "part": part,
        "name": name,
        "seed": job["seed"],
        "best": result.best,
        "final": result.final,
        **_score(Path(job["out"]) / "last.pt", scored_on, spec),
        "seconds": time.perf_counter() - started,
    }


def _dump(out: Path, encoding: str, *, views: int = 0, recipe: str | None = None, **where: Any):
    from kdcache import DumpConfig, dump_teacher

    augment: dict[str, Any] = {} if views == 0 else {"views": views, "augment": recipe}
    started = time.perf_counter()
    result = dump_teacher(
        DumpConfig(
            out=str(out), encoding=encoding, batch_size=1024, overwrite=True, **where, **augment
        )
    )
    rows = result.num_samples * result.views
    return {
        "store": out.name,
        "encoding": encoding,
        "recipe": recipe,
        "views": views,
        "bytes_per_sample": result.bytes_per_sample,
        "bytes_per_view": (result.bytes_on_disk or 0) / rows,
        "seconds": time.perf_counter() - started,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _jobs(args: argparse.Namespace, out: Path, weights: Path) -> list[dict[str, Any]]:
    student, dataset = args.student, args.dataset
    common = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "device": args.device,
        "overwrite": True,
    }
    kd = {"student": student, "temperature": args.temperature, "alpha": args.alpha}
    online = {"teacher": args.teacher, "weights": str(weights), "dataset": dataset}
    mixed = f"{args.recipe}+{MIXUP}"
    runs: list[tuple[str, str, str, dict[str, Any]]] = []
    if "encodings" in args.parts:
        runs.append(("encodings", "CE", "train", {"model": student, "dataset": dataset}))
        runs += [
            ("encodings", f"KD {e}", "distill", {**kd, "cache": str(out / f"clean-{e}.zarr")})
            for e in ENCODINGS
        ]
    if "sweep" in args.parts:
        runs += [
            (
                "sweep",
                f"KD float16 T={t:g}",
                "distill",
                {**kd, "temperature": t, "cache": str(out / "clean-float16.zarr")},
            )
            for t in SWEEP_TEMPERATURES
            if not ("encodings" in args.parts and t == args.temperature)
        ]
    if "views" in args.parts:
        if "encodings" not in args.parts:
            # The references without augmentation, which the encodings part runs otherwise.
            runs.append(("views", "CE", "train", {"model": student, "dataset": dataset}))
            runs.append(
                ("views", "KD float16", "distill", {**kd, "cache": str(out / "clean-float16.zarr")})
            )
        for recipe in (args.recipe, mixed):
            tag = "mixup" if recipe == mixed else "rrc"
            runs.append(
                (
                    "views",
                    f"{tag}: CE + augmentation",
                    "train",
                    {"model": student, "dataset": dataset, "augment": recipe},
                )
            )
            runs.append(
                (
                    "views",
                    f"{tag}: online consistent KD",
                    "distill",
                    {**kd, **online, "augment": recipe},
                )
            )
            if recipe == args.recipe:
                runs.append(
                    (
                        "views",
                        f"{tag}: clean cache + student augmentation (fixed teacher)",
                        "distill",
                        {**kd, "cache": str(out / "clean-float16.zarr"), "student_augment": recipe},
                    )
                )
            runs += [
                (
                    "views",
                    f"{tag}: cache V={v}",
                    "distill",
                    {**kd, "cache": str(out / f"{tag}-v{v}.zarr")},
                )
                for v in VIEW_COUNTS
            ]
    jobs = []
    for seed in args.seeds:
        for part, name, kind, options in runs:
            folder = out / "runs" / f"{name.replace(' ', '_').replace(':', '')}-seed{seed}"
            spec = options.get("model") or options["student"]
            jobs.append(
                {
                    "part": part,
                    "name": name,
                    "kind": kind,
                    "scored_on": dataset,
                    "spec": spec,
                    "seed": seed,
                    "out": str(folder),
                    **common,
                    **options,
                }
            )
    # One seed's every run before the next seed's, so that a run cut short still has whole
    # seeds; within a seed the slowest runs (online KD) first.
    jobs.sort(key=lambda job: (job["seed"], "online" not in job["name"]))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default=DATASET, help="glyphs:CLASSES:SIZE:PER_CLASS")
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument(
        "--teacher-dataset", default=TEACHER_DATASET, help="what the teacher trains on"
    )
    parser.add_argument(
        "--teacher-weights", type=Path, help="a trained teacher's best.pt: skip training one"
    )
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--epochs", type=int, default=6, help="student epochs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="student runs at a time")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="every run's device (cpu, cuda)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the teacher's training and dumps"
    )
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose among {', '.join(PARTS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipeline_started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    from kdcache import TrainConfig, train

    report: dict[str, Any] = {key: value for key, value in vars(args).items() if key != "out"}
    # The 1, 5 and 15-minute load averages as each stage ends: on a shared machine they say how
    # much of the cores the wall times had.
    report["load"] = {"start": os.getloadavg()}
    report["teacher_weights"] = str(args.teacher_weights) if args.teacher_weights else None
    if args.teacher_weights is None:
        started = time.perf_counter()
        teacher = train(
            TrainConfig(
                model=args.teacher,
                dataset=args.teacher_dataset,
                out=str(out / "teacher"),
                epochs=args.teacher_epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                device=args.device,
                seed=0,
                overwrite=True,
            )
        )
        weights = out / "teacher" / "best.pt"
        report["teacher_s"] = time.perf_counter() - started
        report["load"]["teacher"] = os.getloadavg()
        print(f"teacher {teacher.best:.2f}% in {report['teacher_s']:.0f}s", flush=True)
    else:
        weights = args.teacher_weights
    report["teacher_test"] = _score(weights, args.dataset, args.teacher)
    print("teacher on the test split:", report["teacher_test"], flush=True)

    where = {
        "teacher": args.teacher,
        "weights": str(weights),
        "dataset": args.dataset,
        "device": args.device,
    }
    stores = []
    started = time.perf_counter()
    clean = ENCODINGS if "encodings" in args.parts else ("float16",)
    for encoding in clean:
        stores.append(_dump(out / f"clean-{encoding}.zarr", encoding, **where))
        print(json.dumps(stores[-1]), flush=True)
    if "views" in args.parts:
        for tag, recipe in (("rrc", args.recipe), ("mixup", f"{args.recipe}+{MIXUP}")):
            for views in VIEW_COUNTS:
                stores.append(
                    _dump(
                        out / f"{tag}-v{views}.zarr", "float16", views=views, recipe=recipe, **where
                    )
                )
                print(json.dumps(stores[-1]), flush=True)
    report["stores"] = stores
    report["dumps_s"] = time.perf_counter() - started
    report["load"]["dumps"] = os.getloadavg()

    jobs = _jobs(args, out, weights)
    started = time.perf_counter()
    # Spawned, not forked: the parent's torch thread pool is not fork-safe.
    context = multiprocessing.get_context("spawn")
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        for result in pool.map(_run, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)
    report["runs"] = results
    report["runs_s"] = time.perf_counter() - started
    report["load"]["runs"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - pipeline_started
    (out / "glyph_results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = tables(report)
    (out / "glyph_results.md").write_text(text)
    print(text)


def tables(report: dict[str, Any]) -> str:
    teacher = report["teacher_test"]
    lines = [
        f"dataset {report['dataset']}; teacher {report['teacher']} on "
        f"{report.get('teacher_dataset') or report['dataset']}, {report['teacher_epochs']} epochs"
        + (f": {teacher['test_acc']:.2f}% test, ECE {teacher['ece']:.2f}%" if teacher else "")
        + f"; student {report['student']}, {report['epochs']} epochs, Adam lr {report['lr']}, "
        f"batch {report['batch_size']}, KD T = {report['temperature']:g}, alpha = "
        f"{report['alpha']:g}; seeds {report['seeds']}; wall {report['wall_s'] / 60:.1f} min "
        f"(dumps {report['dumps_s']:.0f} s, student runs {report['runs_s']:.0f} s"
        + (f", teacher {report['teacher_s']:.0f} s" if "teacher_s" in report else "")
        + ")",
        "",
        "load average (1, 5, 15 min) as each stage ended: "
        + "; ".join(
            f"{stage} {', '.join(f'{x:.1f}' for x in values)}"
            for stage, values in report.get("load", {}).items()
        ),
        "",
        "| part | student run | test acc % (final) | best val acc % | ECE % | s per run |",
        "|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["name"] for r in runs))}
    parts_order = {p: i for i, p in enumerate(PARTS)}
    names = sorted(
        order,
        key=lambda n: (parts_order[next(r["part"] for r in runs if r["name"] == n)], order[n]),
    )
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        lines.append(
            f"| {mine[0]['part']} | {name} | {_mean_std([r['test_acc'] for r in mine])} | "
            f"{_mean_std([r['best'] for r in mine])} | {_mean_std([r['ece'] for r in mine])} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} |"
        )
    lines += [
        "",
        "| store | encoding | V | B/sample | B/view | dump s |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["stores"]:
        lines.append(
            f"| {s['store']} | {s['encoding']} | {s['views'] or 'clean'} | "
            f"{s['bytes_per_sample']:.0f} | {s['bytes_per_view']:.1f} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Results at 1,000 classes (docs/results.md): a small ResNet teacher and a much smaller student on
``glyphs:1000``: CE against KD from the cache in every encoding, the temperature sweep, and
augmented views (clean-view cache, V = 1, 4, 16, online consistent KD, with and without mixup).

Usage: python pipelines/glyph_results.py OUT [--dataset glyphs:1000:16:20]
           [--teacher-dataset glyphs:1000:16:100] [--teacher resnet:16] [--teacher-epochs 4]
           [--teacher-weights PATH] [--student resnet:8] [--epochs 6] [--seeds 0,1,2] [--jobs 2]
           [--threads 1] [--parts encodings,sweep,views] [--device cpu] [--smoke]

The defaults are the setting of docs/results.md, sized for 2 CPU cores and an hour: a teacher
trained on 100 images per class, students (16x fewer multiply-adds) on the first 20 of them, so
that the students are data-starved and the teacher's soft targets have something to add. Every
run (the teacher's too) follows a cosine learning-rate schedule from ``--lr`` to 0.
``--smoke`` runs every part and task at a tiny size (minutes), to check the pipeline end to end.

Everything goes through kdcache's public Python API: ``train`` (the teacher, with
cross-entropy, unless ``--teacher-weights`` names one already trained), ``dump_teacher`` (a
clean-input store per encoding and a float16 store per recipe and V), then one student run per
setting and seed with ``train`` (CE) or ``distill`` (KD from a store, or from the live teacher for
the online baseline). These are tasks of one plan, run ``--jobs`` at a time in spawned processes
with ``--threads`` torch threads each; a task starts as soon as what it reads exists, so the CE
runs (which need no teacher) train beside the teacher and the stores are dumped beside the first
KD runs. One thread per process by default: on 2 cores, two one-thread tasks keep both busy
without the thread pools' synchronisation, which collapses when the cores are shared
(docs/results.md has the timings). After a run its last
checkpoint is scored on the test split: accuracy and the expected calibration error (ECE,
15 equal-width confidence bins, Guo et al., ICML 2017).

Parts (``--parts``):

* ``encodings``: CE, and KD (T = ``--temperature``, alpha 0.7) from float16, int8 and topk:K
  (K = 1, 5, 10, 20) stores of the clean inputs, every seed.
* ``sweep``: KD from the float16 store at T = 1, 2, 4, 8, 16, every seed.
* ``views``: for the recipe ``--recipe`` and the same recipe with mixup: CE with augmentation,
  online consistent KD (the teacher in the loop on the student's views), the clean-input cache
  with the student alone augmented (Beyer's fixed teacher; not with mixup, which a student-only
  augmentation cannot hold), and caches of V = 1, 4, 16 views; without the ``encodings`` part
  also CE and KD from the clean float16 store, both unaugmented, as references.

Writes OUT/glyph_results.json and OUT/glyph_results.md (mean ± std over seeds, store sizes, each
task's wall and CPU seconds, the load average at the start, the end and as each task ended).
``pipelines/glyph_results_gpu.sh`` is the larger setting for a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
#: The clean-input float16 store: KD's reference, the sweep's and the fixed teacher's.
CLEAN = "clean-float16.zarr"
#: The learning-rate schedule of every run, the teacher's and the students': cosine from --lr
#: to 0 over the run, per step, so that the last epoch's model (the one scored) has settled
#: instead of moving with a constant lr's last steps (several points from seed to seed).
SCHEDULE: dict[str, Any] = {"lr_schedule": "cosine"}
#: ``--smoke``: every part and task of the study at a size that runs in a few minutes (options
#: given after ``--smoke`` still win).
SMOKE = (
    "--dataset=glyphs:40:16:4",
    "--teacher-dataset=glyphs:40:16:8",
    "--teacher-epochs=1",
    "--epochs=1",
    "--seeds=0",
)
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


def _cpu_seconds() -> float:
    """CPU seconds this process has used, all its threads: on a shared machine the part of a
    job's wall time that is its own work (a one-thread job's wall time on a free core)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _work(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task of the plan in a worker process: train the teacher, dump a store or train a
    student; with its wall and CPU seconds and the load average as it ended."""
    import torch

    torch.set_num_threads(task["threads"])
    started, cpu = time.perf_counter(), _cpu_seconds()
    began = time.time() - task["t0"]
    if task["stage"] == "teacher":
        result = _teacher(**task["options"])
    elif task["stage"] == "store":
        result = _dump(**task["options"])
    else:
        result = _student(**task["options"])
    return {
        **result,
        "seconds": time.perf_counter() - started,
        "cpu_s": _cpu_seconds() - cpu,
        "began_s": began,
        "load": os.getloadavg(),
    }


def _teacher(*, train: dict[str, Any] | None, weights: str, dataset: str, spec: str) -> dict:
    """Train the teacher (unless ``train`` is None: ``weights`` are given) and score it."""
    from kdcache import TrainConfig
    from kdcache import train as train_model

    best = None if train is None else train_model(TrainConfig(**train)).best
    return {"best": best, **_score(Path(weights), dataset, spec)}


def _student(
    *, kind: str, part: str, name: str, scored_on: str, spec: str, config: dict[str, Any]
) -> dict[str, Any]:
    from kdcache import DistillConfig, TrainConfig, distill, train

    result = train(TrainConfig(**config)) if kind == "train" else distill(DistillConfig(**config))
    return {
        "part": part,
        "name": name,
        "seed": config["seed"],
        "best": result.best,
        "final": result.final,
        **_score(Path(config["out"]) / "last.pt", scored_on, spec),
    }


def _dump(*, out: str, encoding: str, views: int, recipe: str | None, **where: Any) -> dict:
    from kdcache import DumpConfig, dump_teacher

    augment: dict[str, Any] = {} if views == 0 else {"views": views, "augment": recipe}
    result = dump_teacher(
        DumpConfig(out=out, encoding=encoding, batch_size=1024, overwrite=True, **where, **augment)
    )
    rows = result.num_samples * result.views
    return {
        "store": Path(out).name,
        "encoding": encoding,
        "recipe": recipe,
        "views": views,
        "bytes_per_sample": result.bytes_per_sample,
        "bytes_per_view": (result.bytes_on_disk or 0) / rows,
    }


def run_plan(tasks: list[dict[str, Any]], *, workers: int) -> Iterator[tuple[dict, dict]]:
    """Run ``tasks`` (in priority order, each naming the ``key`` of the tasks it ``needs``)
    ``workers`` at a time, each free worker taking the first task whose needs are done; yield
    each task with its result as it finishes."""
    # Spawned, not forked: the parent's torch thread pool is not fork-safe.
    context = multiprocessing.get_context("spawn")
    pending, done = list(tasks), set[str]()
    running: dict[Future[dict[str, Any]], dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while pending or running:
            for task in [t for t in pending if set(t["needs"]) <= done][: workers - len(running)]:
                pending.remove(task)
                running[pool.submit(_work, task)] = task
            if not running:
                raise RuntimeError(f"tasks that wait for none that is planned: {pending}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                done.add(task["key"])
                yield task, future.result()


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _student_tasks(args: argparse.Namespace, out: Path, weights: Path) -> list[dict[str, Any]]:
    """One task per student run and seed, each needing the store it reads (or the teacher, for
    online KD); seed after seed, so that a run cut short still has whole seeds, and within a
    seed the slowest runs (online KD) first."""
    student, dataset = args.student, args.dataset
    common = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "device": args.device,
        "overwrite": True,
        **SCHEDULE,
    }
    kd = {"student": student, "temperature": args.temperature, "alpha": args.alpha}
    online = {"teacher": args.teacher, "weights": str(weights), "dataset": dataset}
    mixed = f"{args.recipe}+{MIXUP}"

    def cached(store: str, **options: Any) -> dict[str, Any]:
        return {**kd, "cache": str(out / store), **options}

    runs: list[tuple[str, str, str, dict[str, Any]]] = []
    if "encodings" in args.parts:
        runs.append(("encodings", "CE", "train", {"model": student, "dataset": dataset}))
        runs += [("encodings", f"KD {e}", "distill", cached(f"clean-{e}.zarr")) for e in ENCODINGS]
    if "sweep" in args.parts:
        runs += [
            ("sweep", f"KD float16 T={t:g}", "distill", cached(CLEAN, temperature=t))
            for t in SWEEP_TEMPERATURES
            if not ("encodings" in args.parts and t == args.temperature)
        ]
    if "views" in args.parts:
        if "encodings" not in args.parts:
            # The references without augmentation, which the encodings part runs otherwise.
            runs.append(("views", "CE", "train", {"model": student, "dataset": dataset}))
            runs.append(("views", "KD float16", "distill", cached(CLEAN)))
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
                        cached(CLEAN, student_augment=recipe),
                    )
                )
            runs += [
                ("views", f"{tag}: cache V={v}", "distill", cached(f"{tag}-v{v}.zarr"))
                for v in VIEW_COUNTS
            ]
    tasks = []
    for seed in args.seeds:
        for part, name, kind, options in sorted(runs, key=lambda run: "online" not in run[1]):
            folder = out / "runs" / f"{name.replace(' ', '_').replace(':', '')}-seed{seed}"
            needs = [Path(options["cache"]).name] if "cache" in options else []
            if "teacher" in options:
                needs.append("teacher")
            config = {"seed": seed, "out": str(folder), **common, **options}
            student_run = {
                "kind": kind,
                "part": part,
                "name": name,
                "scored_on": dataset,
                "spec": options.get("model") or options["student"],
                "config": config,
            }
            tasks.append(
                {"key": folder.name, "stage": "run", "needs": needs, "options": student_run}
            )
    return tasks


def _store_tasks(args: argparse.Namespace, out: Path, weights: Path) -> list[dict[str, Any]]:
    """One task per store, all needing the teacher; the clean float16 store first (most runs
    read it), then the longest (most views) first, so that none is left to finish alone."""
    where = {
        "teacher": args.teacher,
        "weights": str(weights),
        "dataset": args.dataset,
        "device": args.device,
    }
    encodings = ENCODINGS[1:] if "encodings" in args.parts else ()
    stores: list[tuple[str, str, int, str | None]] = [(CLEAN, "float16", 0, None)]
    stores += [(f"clean-{e}.zarr", e, 0, None) for e in encodings]
    if "views" in args.parts:
        recipes = (("rrc", args.recipe), ("mixup", f"{args.recipe}+{MIXUP}"))
        stores[1:1] = sorted(
            (
                (f"{tag}-v{v}.zarr", "float16", v, recipe)
                for tag, recipe in recipes
                for v in VIEW_COUNTS
            ),
            key=lambda store: -store[2],
        )
    return [
        {
            "key": name,
            "stage": "store",
            "needs": ["teacher"],
            "options": {
                "out": str(out / name),
                "encoding": encoding,
                "views": views,
                "recipe": recipe,
                **where,
            },
        }
        for name, encoding, views, recipe in stores
    ]


def _teacher_task(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Path]:
    """The task that trains the teacher (unless ``--teacher-weights``) and scores it, and the
    weights the stores and online runs use."""
    train = None
    weights = args.teacher_weights
    if weights is None:
        weights = out / "teacher" / "best.pt"
        train = {
            "model": args.teacher,
            "dataset": args.teacher_dataset,
            "out": str(out / "teacher"),
            "epochs": args.teacher_epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "device": args.device,
            "seed": 0,
            "overwrite": True,
            **SCHEDULE,
        }
    options = {
        "train": train,
        "weights": str(weights),
        "dataset": args.dataset,
        "spec": args.teacher,
    }
    return {"key": "teacher", "stage": "teacher", "needs": [], "options": options}, weights


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
    parser.add_argument("--jobs", type=int, default=2, help="tasks (processes) at a time")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="every run's device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each task")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a check that every part runs, in minutes: {' '.join(SMOKE)}",
    )
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args([*SMOKE, *sys.argv[1:]])
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose among {', '.join(PARTS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipeline_started = time.perf_counter()

    report: dict[str, Any] = {key: value for key, value in vars(args).items() if key != "out"}
    report["schedule"] = SCHEDULE
    report["teacher_weights"] = str(args.teacher_weights) if args.teacher_weights else None
    # The 1, 5 and 15-minute load averages at the start, as each task ends and at the end: on a
    # shared machine they say how much of the cores the wall times had.
    report["load"] = {"start": os.getloadavg()}
    teacher, weights = _teacher_task(args, out)
    tasks = [teacher, *_store_tasks(args, out, weights), *_student_tasks(args, out, weights)]
    report["stores"], report["runs"], report["tasks"] = [], [], []
    t0 = time.time()
    for task, result in run_plan(
        [{**task, "threads": args.threads, "t0": t0} for task in tasks], workers=args.jobs
    ):
        timing = {key: result.pop(key) for key in ("seconds", "cpu_s", "began_s", "load")}
        report["tasks"].append({"key": task["key"], "stage": task["stage"], **timing})
        if task["stage"] == "teacher":
            report["teacher_test"] = {k: result[k] for k in ("test_acc", "ece")}
            report["teacher_s"] = timing["seconds"]
        else:
            report["stores" if task["stage"] == "store" else "runs"].append({**result, **timing})
        print(json.dumps({"key": task["key"], **result, **timing}), flush=True)
    report["load"]["end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - pipeline_started
    (out / "glyph_results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = tables(report)
    (out / "glyph_results.md").write_text(text)
    print(text)


def tables(report: dict[str, Any]) -> str:
    """The report as markdown: the setting, the time each stage took, the student runs (mean
    ± std over seeds) and the stores."""
    teacher = report["teacher_test"]
    schedule = ", ".join(f"{k} {v}" for k, v in report["schedule"].items()) or "constant lr"
    load = report["load"]
    lines = [
        f"dataset {report['dataset']}; teacher {report['teacher']} on "
        f"{report.get('teacher_dataset') or report['dataset']}, {report['teacher_epochs']} epochs: "
        f"{teacher['test_acc']:.2f}% test, ECE {teacher['ece']:.2f}%; student "
        f"{report['student']}, {report['epochs']} epochs, Adam lr {report['lr']} ({schedule}), "
        f"batch {report['batch_size']}, KD T = {report['temperature']:g}, alpha = "
        f"{report['alpha']:g}; seeds {report['seeds']}; {report['jobs']} tasks at a time, "
        f"{report['threads']} torch thread(s) each; wall {report['wall_s'] / 60:.1f} min; load "
        f"average (1, 5, 15 min) {', '.join(f'{x:.1f}' for x in load['start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in load['end'])} at the end",
        "",
        "| stage | tasks | wall s (sum over tasks) | CPU s (sum over tasks) |",
        "|---|---|---|---|",
    ]
    for stage in ("teacher", "store", "run"):
        mine = [t for t in report["tasks"] if t["stage"] == stage]
        lines.append(
            f"| {stage} | {len(mine)} | {sum(t['seconds'] for t in mine):.0f} | "
            f"{sum(t['cpu_s'] for t in mine):.0f} |"
        )
    lines += [
        "",
        "| part | student run | test acc % (final) | best val acc % | ECE % | s per run | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["name"] for r in runs))}
    parts_order = {p: i for i, p in enumerate(PARTS)}
    names = sorted(
        order,
        key=lambda n: (parts_order[next(r["part"] for r in runs if r["name"] == n)], order[n]),
    )
    for name in names:
        mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        lines.append(
            f"| {mine[0]['part']} | {name} | {_mean_std([r['test_acc'] for r in mine])} | "
            f"{_mean_std([r['best'] for r in mine])} | {_mean_std([r['ece'] for r in mine])} | "
            f"{statistics.mean(r['seconds'] for r in mine):.0f} | "
            f"{statistics.mean(r['cpu_s'] for r in mine):.0f} |"
        )
    lines += [
        "",
        "| store | encoding | V | B/sample | B/view | dump s | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["stores"]:
        lines.append(
            f"| {s['store']} | {s['encoding']} | {s['views'] or 'clean'} | "
            f"{s['bytes_per_sample']:.0f} | {s['bytes_per_view']:.1f} | {s['seconds']:.0f} | "
            f"{s['cpu_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

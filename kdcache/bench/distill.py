"""``kdcache bench distill``: distillation from the cache, step by step.

Each function returns one JSON-ready dict. Timings that are compared are measured side by side
in one run, interleaved over ``repeats`` rounds, and reported as medians, because a shared
machine's noise is larger than the differences that matter. Torch's intra-op threads are set
explicitly (``threads``): oversubscribed threads on a small machine cost more than the work.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdcache.bench.feed import paired_ratio, round_floats, set_threads
from kdcache.bench.inputs import input_pass_s, timed
from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.data.datasets import LabeledDataset, build_dataset
from kdcache.data.device_input import resolve_inputs
from kdcache.dump.teacher import dump_teacher
from kdcache.models import build_model
from kdcache.runtime import autocast, prepare_model, resolve_device
from kdcache.train.loop import distill, train

__all__ = ["bench_distill"]


def epoch_time(out: Path) -> float:
    """The last epoch's training time: earlier epochs pay worker start-up and autotuning."""
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["train_time_s"]


def _compute_only_saving(
    teacher: str,
    student: str,
    dataset: LabeledDataset,
    *,
    batch_size: int,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
    compile: bool,
    steps: int = 5,
) -> tuple[float, float]:
    """Median seconds of one teacher forward and of one CE student step on the same batch."""
    inputs = torch.stack([dataset.float_input(i % len(dataset)) for i in range(batch_size)]).to(
        device
    )
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, dataset.num_classes, (batch_size,), device=device)
    shape = dict(num_classes=dataset.num_classes, in_channels=dataset.in_channels)
    _, teacher_model = prepare_model(
        build_model(teacher, **shape).eval(),
        device=device,
        channels_last=channels_last,
        compile=compile,
    )
    student_module, student_model = prepare_model(
        build_model(student, **shape), device=device, channels_last=channels_last, compile=compile
    )
    optimizer = torch.optim.Adam(student_module.parameters())

    def forward() -> None:
        with torch.inference_mode(), autocast(device, amp):
            teacher_model(inputs)

    def step() -> None:
        with autocast(device, amp):
            logits = student_model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, cuDNN autotuning, compilation
        forward()
        step()
    teacher_s = statistics.median(timed(forward, device) for _ in range(steps))
    student_s = statistics.median(timed(step, device) for _ in range(steps))
    return teacher_s, student_s


def bench_distill(
    *,
    student: str = "resnet18",
    teacher: str = "resnet50",
    dataset: str = "fake:2048:32:100",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | None = None,
    repeats: int = 3,
    cache_memory: int | str | None = None,
    threads: int | None = None,
    epochs: int = 2,
    inputs: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Runs of CE-only training, distillation from the cache and online KD, interleaved.

    Each run is the real ``train``/``distill`` (same student, data, loader and seed) for
    ``epochs`` epochs; the time compared is the last epoch's ``train_time_s`` (evaluation and
    start-up excluded). Ratios are medians of the
    per-round ratios. The compute-only saving is
    (teacher forward + student step) / student step, timed on one batch without a loader.
    Every run, the dump and the compute-only timing take the same ``inputs``, ``amp``,
    ``channels_last`` and ``compile``; the loader-only figure is the input path alone
    (:func:`kdcache.bench.inputs.input_pass_s`).
    """
    threads = set_threads(threads)
    torch_device = resolve_device(device)
    data = build_dataset(dataset)
    form = resolve_inputs(inputs, data, torch_device)
    speed: dict[str, Any] = dict(amp=amp, channels_last=channels_last, compile=compile)
    teacher_s, student_s = _compute_only_saving(
        teacher, student, data, batch_size=batch_size, device=torch_device, **speed
    )
    times: dict[str, list[float]] = {"ce": [], "cache": [], "online": []}
    loader_s = input_pass_s(
        data.with_inputs(form),
        batch_size=batch_size,
        num_workers=num_workers,
        device=torch_device,
        channels_last=channels_last,
    )
    common: dict[str, Any] = dict(
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        device=str(torch_device),
        overwrite=True,
        resumable=False,  # a throwaway run need not write its state every epoch
        inputs=form,
        **speed,
    )
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as scratch:
        root = Path(scratch)
        store = str(root / "teacher.zarr")
        dump_teacher(
            DumpConfig(
                teacher=teacher,
                dataset=dataset,
                out=store,
                batch_size=batch_size,
                num_workers=num_workers,
                device=str(torch_device),
                overwrite=True,
                inputs=form,
                **speed,
            )
        )
        runs: dict[str, Callable[[Path], Any]] = {
            "ce": lambda out: train(
                TrainConfig(model=student, dataset=dataset, out=str(out), **common)
            ),
            "cache": lambda out: distill(
                DistillConfig(
                    student=student, cache=store, cache_memory=cache_memory, out=str(out), **common
                )
            ),
            "online": lambda out: distill(
                DistillConfig(
                    student=student, teacher=teacher, dataset=dataset, out=str(out), **common
                )
            ),
        }
        names = list(runs)
        for round_index in range(max(1, repeats)):
            # Rotate the order so no kind always runs first (warm caches) or last.
            for name in names[round_index % 3 :] + names[: round_index % 3]:
                out = root / f"{name}{round_index}"
                runs[name](out)
                times[name].append(epoch_time(out))
    ce, cache, online = (statistics.median(times[name]) for name in ("ce", "cache", "online"))
    saving = (teacher_s + student_s) / student_s
    return round_floats(
        {
            "benchmark": "distill",
            "student": student,
            "teacher": teacher,
            "dataset": dataset,
            "num_samples": len(data),
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(torch_device),
            "threads": threads,
            "inputs": form,
            "amp": amp,
            "channels_last": channels_last,
            "compile": compile,
            "repeats": len(times["ce"]),
            "ce_epoch_s": ce,
            "cache_epoch_s": cache,
            "online_epoch_s": online,
            "cache_over_ce": paired_ratio(times["cache"], times["ce"]),
            "online_over_cache": paired_ratio(times["online"], times["cache"]),
            "teacher_forward_batch_s": teacher_s,
            "student_step_batch_s": student_s,
            "compute_only_saving": saving,
            "saving_fraction": paired_ratio(times["online"], times["cache"]) / saving,
            # The stricter reading: the share of the teacher's time that the cache removes.
            "saved_time_fraction": (paired_ratio(times["online"], times["cache"]) - 1)
            / (saving - 1),
            "ce_samples_per_s": len(data) / ce,
            "cache_samples_per_s": len(data) / cache,
            "online_samples_per_s": len(data) / online,
            "loader_only_samples_per_s": len(data) / loader_s,
            "epochs_per_run": epochs,
            "all_epoch_s": times,
        }
    )

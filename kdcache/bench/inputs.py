"""Benchmarks of the input path alone: how fast each input form reaches the device as float images.

Used by ``kdcache bench inputs`` and, for the loader-only figure, by ``kdcache bench distill``.
A pass runs the real DataLoader (workers, pinned memory), the copy to the device and the
device-side decoding and normalisation of :class:`kdcache.data.device_input.InputPipeline`, with no
model, and waits for the device at the end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kdcache.choices import INPUT_FORMS
from kdcache.data.datasets import LabeledDataset, build_dataset
from kdcache.data.device_input import InputPipeline
from kdcache.errors import ConfigError
from kdcache.runtime import resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``function`` takes, the device's queued work included."""
    sync(device)
    started = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - started


def input_pass_s(
    dataset: LabeledDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    channels_last: bool = False,
) -> float:
    """Seconds for one timed pass over ``dataset`` (in its input form), after one start-up pass."""
    pipeline = InputPipeline(dataset, device=device, channels_last=channels_last)
    loader = pipeline.loader(batch_size=batch_size, num_workers=num_workers, shuffle=True)
    for _ in pipeline.batches(loader):  # start-up pass: workers, page cache, decoder handles
        pass
    sync(device)
    started = time.perf_counter()
    for _ in pipeline.batches(loader):
        pass
    sync(device)
    return time.perf_counter() - started


def bytes_per_sample(dataset: LabeledDataset, *, probe: int = 64) -> float:
    """Mean bytes of one item's input as it crosses to the device (files: their mean size)."""
    n = min(probe, len(dataset))
    step = max(1, len(dataset) // n)
    items = [dataset[i][0] for i in range(0, step * n, step)]
    return statistics.fmean(x.numel() * x.element_size() for x in items)


def bench_inputs(
    *,
    dataset: str = "synthetic:4096:224:1000",
    forms: tuple[str, ...] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    repeats: int = 3,
    channels_last: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Samples/s and bytes per batch of each input form of ``dataset``, interleaved over rounds.

    ``forms`` defaults to every form the dataset has (:attr:`LabeledDataset.input_forms`); ratios
    are against float32, as medians of the per-round ratios. ``threads``: torch's intra-op
    threads in this process [default: all cores].
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    data = build_dataset(dataset)
    forms = tuple(forms or data.input_forms)
    unknown = [form for form in forms if form not in INPUT_FORMS]
    if unknown:
        raise ConfigError(
            f"unknown input form(s) {', '.join(unknown)}; valid forms: {', '.join(INPUT_FORMS)}"
        )
    views = {form: data.with_inputs(form) for form in forms}
    times: dict[str, list[float]] = {form: [] for form in forms}
    for round_index in range(max(1, repeats)):
        # Rotate the order so no form always meets the machine warmer or busier.
        shift = round_index % len(forms)
        for form in forms[shift:] + forms[:shift]:
            times[form].append(
                input_pass_s(
                    views[form],
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=torch_device,
                    channels_last=channels_last,
                )
            )
    report: dict[str, Any] = {}
    for form in forms:
        per_sample = bytes_per_sample(views[form])
        seconds = statistics.median(times[form])
        report[form] = {
            "samples_per_s": round(len(data) / seconds, 1),
            "bytes_per_sample": round(per_sample, 1),
            "bytes_per_batch": round(per_sample * batch_size),
            "pass_s": round(seconds, 4),
            "all_pass_s": [round(t, 4) for t in times[form]],
        }
        if form != "float32" and "float32" in times:
            ratios = [f / t for f, t in zip(times["float32"], times[form], strict=True)]
            report[form]["speed_over_float32"] = round(statistics.median(ratios), 3)
    return {
        "benchmark": "inputs",
        "dataset": dataset,
        "num_samples": len(data),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": str(torch_device),
        "channels_last": channels_last,
        "repeats": max(1, repeats),
        "forms": report,
    }

"""``kdcache bench dump``: the dump against the bare teacher forward over the same loader.

The store writer alone (``--writer-only``) is :mod:`kdcache.bench.writer`.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdcache.augment.recipe import parse_recipe
from kdcache.augment.views import AllViews, ViewSource
from kdcache.bench.feed import make_bench_folder, paired_ratio, round_floats, set_threads
from kdcache.bench.inputs import timed
from kdcache.config import DumpConfig
from kdcache.data.datasets import LabeledDataset, build_dataset
from kdcache.data.device_input import InputPipeline, resolve_inputs
from kdcache.dump.teacher import dump_teacher
from kdcache.models import build_model
from kdcache.runtime import autocast, prepare_model, resolve_device
from kdcache.store.write.background import default_writer_workers

__all__ = ["bench_dump"]


def _bare_forward(
    teacher: torch.nn.Module,
    dataset: LabeledDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
    source: ViewSource | None = None,
) -> None:
    """The teacher over ``dataset`` with its logits copied to the host, as fast as that goes.

    With ``source`` the teacher runs on every view of every sample, cut as the dump cuts them
    (one decode per sample, ``batch_size`` counting views). The copies go to pinned memory
    without blocking (as the dump's do), so the host keeps queueing forward passes; the caller
    waits for the device at the end.
    """
    pipeline = InputPipeline(dataset, device=device, channels_last=channels_last)
    if source is None:
        loader = pipeline.loader(batch_size=batch_size, num_workers=num_workers, shuffle=False)
    else:
        loader = DataLoader(
            AllViews(source),
            batch_size=max(1, batch_size // source.views),
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
    with torch.inference_mode():
        for batch in pipeline.batches(loader):
            inputs = batch.inputs
            if source is not None:  # (B, V, C, H, W): every view of B samples
                inputs = inputs.flatten(0, 1)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = teacher(inputs).float()
            # Pinned blocks are not reused before their copy lands (torch records it), so the
            # host buffer may be dropped at once.
            host = torch.empty(logits.shape, pin_memory=device.type == "cuda")
            host.copy_(logits, non_blocking=True)


def bench_dump(
    *,
    teacher: str = "resnet50",
    dataset: str = "fake:2048:32:1000",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    repeats: int = 3,
    encoding: str = "float16",
    threads: int | None = None,
    inputs: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    path: str | None = None,
    writer_workers: int | None = None,
    views: int = 1,
    augment: str | None = None,
    augment_seed: int = 0,
) -> dict[str, Any]:
    """``dump_teacher`` against the bare teacher forward over the same loader, interleaved.

    With ``views`` and ``augment`` both run the teacher on V augmented views of every sample
    (the dump storing each view's logits); the rates are then per view. ``writer_workers``
    is the dump's writer threads (default: the dump's default).

    Both take the same input path (``inputs``), autocast (``amp``), memory format and
    compilation. The bare loop also moves the logits to the host, as any consumer of a forward
    pass must. ``dump_loop_s`` excludes the dump's setup (dataset labels and fingerprint, store
    creation); ratios are medians of the per-round ratios. Each round also dumps with
    ``fsync=False``: ``fsync_cost`` is the dump loop's time with fsync over its time without.
    ``path`` is the folder to dump into (the disk whose fsync is measured; default a temporary
    folder).
    """
    threads = set_threads(threads)
    torch_device = resolve_device(device)
    data = build_dataset(dataset)
    form = resolve_inputs(inputs, data, torch_device, views=augment is not None)
    source = None
    if augment is not None:
        source = ViewSource.drawn(
            data.with_inputs(form), parse_recipe(augment), seed=augment_seed, views=views
        )
    _, model = prepare_model(
        build_model(teacher, num_classes=data.num_classes, in_channels=data.in_channels).eval(),
        device=torch_device,
        channels_last=channels_last,
        compile=compile,
    )
    bare, loop, wall, unsynced = [], [], [], []
    make_bench_folder(path)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-", dir=path) as scratch:
        config = DumpConfig(
            teacher=teacher,
            dataset=dataset,
            out=str(Path(scratch) / "t.zarr"),
            encoding=encoding,
            batch_size=batch_size,
            num_workers=num_workers,
            device=str(torch_device),
            overwrite=True,
            inputs=form,
            amp=amp,
            channels_last=channels_last,
            compile=compile,
            writer_workers=writer_workers,
            views=views,
            augment=augment,
            augment_seed=augment_seed,
        )
        for round_index in range(max(1, repeats)):
            # Alternate which runs first, so neither always meets the machine warmer or busier.
            kinds = ("bare", "dump", "no-fsync")
            for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                if kind == "bare":
                    bare.append(
                        timed(
                            lambda: _bare_forward(
                                model,
                                data.with_inputs(form),
                                batch_size=batch_size,
                                num_workers=num_workers,
                                device=torch_device,
                                amp=amp,
                                channels_last=channels_last,
                                source=source,
                            ),
                            torch_device,
                        )
                    )
                elif kind == "no-fsync":
                    unsynced.append(dump_teacher(replace(config, fsync=False)).loop_time_s)
                else:
                    result = dump_teacher(config)
                    loop.append(result.loop_time_s)
                    wall.append(result.wall_time_s)
    bare_s, loop_s, wall_s = (
        statistics.median(bare),
        statistics.median(loop),
        statistics.median(wall),
    )
    return round_floats(
        {
            "benchmark": "dump",
            "teacher": teacher,
            "dataset": dataset,
            "num_samples": len(data),
            "num_classes": data.num_classes,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(torch_device),
            "threads": threads,
            "encoding": encoding,
            "inputs": form,
            "amp": amp,
            "channels_last": channels_last,
            "compile": compile,
            "writer_workers": writer_workers or default_writer_workers(),
            "views": views,
            "augment": augment,
            "repeats": len(bare),
            "bare_forward_s": bare_s,
            "dump_loop_s": loop_s,
            "dump_wall_s": wall_s,
            "dump_loop_over_bare": paired_ratio(loop, bare),
            "dump_wall_over_bare": paired_ratio(wall, bare),
            "bare_forward_samples_per_s": len(data) / bare_s,
            "dump_loop_samples_per_s": len(data) / loop_s,
            "bare_forward_views_per_s": len(data) * views / bare_s,
            "dump_loop_views_per_s": len(data) * views / loop_s,
            "dump_no_fsync_loop_s": statistics.median(unsynced),
            "fsync_cost": paired_ratio(loop, unsynced),
            "all_bare_forward_s": bare,
            "all_dump_loop_s": loop,
            "all_dump_no_fsync_loop_s": unsynced,
        }
    )

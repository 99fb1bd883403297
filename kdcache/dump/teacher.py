"""Stage one: run the teacher once over a dataset and store its raw logits.

With ``views`` and an ``augment`` recipe the teacher runs on V augmented views of every sample
(each sample decoded once, all its views cut from it) and the store keeps every view's logits
and parameters (kdcache.augment).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcache.augment.recipe import parse_recipe
from kdcache.augment.views import AllViews, ViewSource, augment_record
from kdcache.checkpoints import load_checkpoint, resolve_specs
from kdcache.config import DumpConfig
from kdcache.data.datasets import build_dataset, canonical_dataset_spec, dataset_fingerprint
from kdcache.data.device_input import InputPipeline, resolve_inputs
from kdcache.data.loaders import IndexedDataset
from kdcache.data.pixels import collate_files
from kdcache.distributed import RankSession, rank_session
from kdcache.dump.ranks import finalize_ranks, open_rank_writer
from kdcache.errors import ConfigError, KdcacheError, StoreWriteError
from kdcache.logits.fidelity import Fidelity
from kdcache.models import (
    build_model,
    canonical_model_spec,
    check_input_fits,
    weights_sha256,
)
from kdcache.options import IMAGE, refuse_foreign_options
from kdcache.progress import progress
from kdcache.runtime import autocast, prepare_model
from kdcache.store.format.layout import store_nbytes
from kdcache.store.write.background import BackgroundWriter
from kdcache.store.write.writer import StoreWriter, create_store

log = logging.getLogger("kdcache")


@dataclass(frozen=True)
class DumpResult:
    """Summary of a finished dump."""

    out: str
    num_samples: int
    num_classes: int
    encoding: str
    rows_computed: int
    bytes_on_disk: int | None
    wall_time_s: float
    #: Seconds of the teacher-and-write loop alone (wall time less dataset, model and store setup).
    loop_time_s: float = 0.0
    #: The encoding's fidelity over the rows this run computed (kdcache.logits.fidelity), if any.
    fidelity: Fidelity | None = None
    #: Views per sample; ``rows_computed`` counts views.
    views: int = 1

    @property
    def bytes_per_sample(self) -> float | None:
        return None if self.bytes_on_disk is None else self.bytes_on_disk / self.num_samples

    @property
    def bytes_per_view(self) -> float | None:
        rows = self.num_samples * self.views
        return None if self.bytes_on_disk is None else self.bytes_on_disk / rows


@contextmanager
def _resumable_on_os_error(action: str) -> Iterator[None]:
    """Turn a failed store write (full disk, lost mount) into one line that says how to go on."""
    try:
        yield
    except OSError as error:
        if isinstance(error, KdcacheError):
            raise
        raise StoreWriteError(
            f"{action} failed: {error.strerror or error}; the chunks written so far are kept: "
            "free space (or fix the cause) and rerun with --resume"
        ) from None


def _fill(
    writer: StoreWriter,
    teacher: torch.nn.Module,
    loader: DataLoader,
    *,
    pipeline: InputPipeline,
    amp: str | None,
    total: int,
    where: str,
    views: int | None,
    writer_workers: int | None,
) -> None:
    """Run the teacher over ``loader`` into ``writer``; a write failure leaves the store resumable.

    Encoding, compression and writing run in ``writer_workers`` background threads while the
    teacher computes the next batch; a failure there surfaces at the next batch (or at the end)
    as the same one line.
    """
    with (
        _resumable_on_os_error(f"writing {where}"),
        torch.inference_mode(),
        BackgroundWriter(writer, workers=writer_workers) as background,
        progress(total=total, unit="sample" if views is None else "view", desc="dump") as bar,
    ):
        for batch in pipeline.batches(loader):
            inputs, rows = batch.inputs, batch.indices
            if views is not None:  # inputs (B, V, C, H, W): all views of B samples
                rows = (rows[:, None] * views + torch.arange(views)).reshape(-1)
                inputs = inputs.flatten(0, 1)
                if pipeline.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(pipeline.device, amp):
                logits = teacher(inputs)
            background.write(rows, logits.float())
            bar.update(len(rows))


def dump_teacher(config: DumpConfig) -> DumpResult:
    """Run ``config.teacher`` in eval mode without gradients and write its logits to ``config.out``.

    Under torchrun every rank runs this with the same config and writes its own chunks
    (kdcache.distributed); rank 0 creates and finalizes the store.
    """
    refuse_foreign_options(config, IMAGE)
    teacher, dataset = resolve_specs(
        config.weights,
        model=config.teacher,
        dataset=config.dataset,
        model_option="--teacher",
        default_dataset="digits",
    )
    config = dataclasses.replace(config, teacher=teacher, dataset=dataset)
    with rank_session(config.device) as session:
        return _dump_teacher(config, session)


def _dump_teacher(config: DumpConfig, session: RankSession) -> DumpResult:
    started = time.perf_counter()
    assert config.teacher is not None
    assert config.dataset is not None
    device = session.device
    dataset = build_dataset(config.dataset, split=config.split)
    inputs = resolve_inputs(config.inputs, dataset, device, views=config.augment is not None)
    teacher = build_model(
        config.teacher, num_classes=dataset.num_classes, in_channels=dataset.in_channels
    )
    if config.weights is not None:
        load_checkpoint(teacher, config.weights, spec=config.teacher, dataset=dataset)
    teacher.eval().requires_grad_(False)
    teacher, forward = prepare_model(
        teacher, device=device, channels_last=config.channels_last, compile=config.compile
    )
    check_input_fits(teacher, tuple(dataset[0][0].shape), spec=config.teacher)
    views = config.views
    source, augment, params = None, None, None
    if config.augment is not None:
        recipe = parse_recipe(config.augment)
        source = ViewSource.drawn(dataset, recipe, seed=config.augment_seed, views=views)
        params = source.params
        augment = augment_record(recipe, seed=config.augment_seed, size=source.size)

    with open_rank_writer(
        session,
        create_store,
        config.out,
        num_samples=len(dataset),
        num_classes=dataset.num_classes,
        encoding=config.encoding,
        # an unlabeled pool (unlabeled:SPEC) stores no labels rather than a column of -1
        labels=None if (dataset.labels < 0).all() else dataset.labels,
        chunk_rows=config.chunk_rows,
        teacher={
            "spec": canonical_model_spec(config.teacher),
            "weights_sha256": weights_sha256(config.weights) if config.weights else None,
            # Autocast logits differ from float32 ones by about the dtype's rounding; absent
            # means float32 (as in stores written before --amp existed).
            **({"amp": config.amp} if config.amp else {}),
            # A row's logits depend on its batch in the last bits (kdcache.store.ranks.partition):
            # --resume must run the batches the dump started with to stay bit-identical.
            "batch_size": config.batch_size,
        },
        dataset={
            "spec": canonical_dataset_spec(dataset.spec),
            "split": dataset.split,
            "transform": dataset.transform_description,
            "fingerprint": dataset_fingerprint(dataset),
            **({"class_names": list(dataset.class_names)} if dataset.class_names else {}),
            # Files decoded by torchvision (nvJPEG on CUDA) match PIL's pixels only within rounding.
            **({"inputs": inputs} if inputs == "jpeg" else {}),
        },
        overwrite=config.overwrite,
        resume=config.resume,
        views=views,
        augment=augment,
        view_params=params,
        fsync=config.fsync,
    ) as writer:
        pending = writer.pending_indices()
        chunk_rows = writer.metadata.chunk_rows
        if views > 1 and chunk_rows % views and session.is_distributed:
            raise ConfigError(
                f"--chunk-rows {chunk_rows} is not a multiple of --views {views}: ranks would "
                "share chunks; pass a multiple of V (or leave --chunk-rows unset)"
            )
        # The plan counts samples; with V views, --batch-size counts teacher inputs (views).
        batches = session.dump_batches(
            np.unique(pending // views),
            num_samples=len(dataset),
            chunk_rows=max(1, chunk_rows // views),
            batch_size=max(1, config.batch_size // views),
        )
        pipeline = InputPipeline(
            dataset.with_inputs(inputs), device=device, channels_last=config.channels_last
        )
        loader = DataLoader(
            IndexedDataset(pipeline.dataset) if source is None else AllViews(source),
            batch_sampler=batches,
            num_workers=config.num_workers,
            collate_fn=collate_files if inputs == "jpeg" else None,
            pin_memory=device.type == "cuda",
        )
        loop_started = time.perf_counter()
        _fill(
            writer,
            forward,
            loader,
            pipeline=pipeline,
            amp=config.amp,
            total=sum(map(len, batches)) * views,
            where=config.out,
            views=None if source is None else views,
            writer_workers=config.writer_workers,
        )
        loop_time_s = time.perf_counter() - loop_started
        with _resumable_on_os_error(f"marking {config.out} complete"):
            finalize_ranks(session, writer)
    return DumpResult(
        out=config.out,
        num_samples=len(dataset),
        num_classes=dataset.num_classes,
        encoding=config.encoding,
        rows_computed=len(pending),
        bytes_on_disk=store_nbytes(config.out),
        wall_time_s=time.perf_counter() - started,
        loop_time_s=loop_time_s,
        fidelity=writer.fidelity.result(),
        views=views,
    )

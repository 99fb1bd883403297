"""Stage one: run the teacher once over a dataset and store its raw logits."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache.config import DumpConfig
from kdcache.datasets import build_dataset, dataset_fingerprint
from kdcache.distributed import RankSession, finalize_ranks, open_rank_writer, rank_session
from kdcache.errors import KdcacheError, StoreWriteError
from kdcache.logits.fidelity import Fidelity
from kdcache.models import build_model, load_weights, weights_sha256
from kdcache.runtime import IndexedDataset
from kdcache.store.background import BackgroundWriter
from kdcache.store.layout import store_nbytes
from kdcache.store.writer import StoreWriter, create_store

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

    @property
    def bytes_per_sample(self) -> float | None:
        return None if self.bytes_on_disk is None else self.bytes_on_disk / self.num_samples


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
    device: torch.device,
    total: int,
    where: str,
) -> None:
    """Run the teacher over ``loader`` into ``writer``; a write failure leaves the store resumable.

    Encoding, compression and writing run in a background thread while the teacher computes the
    next batch; a failure there surfaces at the next batch (or at the end) as the same one line.
    """
    with (
        _resumable_on_os_error(f"writing {where}"),
        torch.inference_mode(),
        BackgroundWriter(writer) as background,
        tqdm(total=total, unit="sample", desc="dump", disable=None) as bar,
    ):
        for inputs, _, indices in loader:
            logits = teacher(inputs.to(device, non_blocking=True))
            background.write(indices, logits)
            bar.update(len(indices))


def dump_teacher(config: DumpConfig) -> DumpResult:
    """Run ``config.teacher`` in eval mode without gradients and write its logits to ``config.out``.

    Under torchrun every rank runs this with the same config and writes its own chunks
    (kdcache.distributed); rank 0 creates and finalizes the store.
    """
    with rank_session(config.device) as session:
        return _dump_teacher(config, session)


def _dump_teacher(config: DumpConfig, session: RankSession) -> DumpResult:
    started = time.perf_counter()
    device = session.device
    dataset = build_dataset(config.dataset, split=config.split)
    teacher = build_model(
        config.teacher, num_classes=dataset.num_classes, in_channels=dataset.in_channels
    )
    if config.weights is not None:
        load_weights(teacher, config.weights, spec=config.teacher)
    teacher.to(device).eval().requires_grad_(False)

    with open_rank_writer(
        session,
        create_store,
        config.out,
        num_samples=len(dataset),
        num_classes=dataset.num_classes,
        encoding=config.encoding,
        labels=dataset.labels,
        chunk_rows=config.chunk_rows,
        teacher={
            "spec": config.teacher,
            "weights_sha256": weights_sha256(config.weights) if config.weights else None,
        },
        dataset={
            "spec": dataset.spec,
            "split": dataset.split,
            "transform": dataset.transform_description,
            "fingerprint": dataset_fingerprint(dataset),
        },
        overwrite=config.overwrite,
        resume=config.resume,
        fsync=config.fsync,
    ) as writer:
        pending = writer.pending_indices()
        batches = session.dump_batches(
            pending,
            num_samples=len(dataset),
            chunk_rows=writer.metadata.chunk_rows,
            batch_size=config.batch_size,
        )
        loader = DataLoader(
            IndexedDataset(dataset),
            batch_sampler=batches,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
        )
        loop_started = time.perf_counter()
        _fill(
            writer, teacher, loader, device=device, total=sum(map(len, batches)), where=config.out
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
    )

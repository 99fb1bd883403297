"""Stage one: run the teacher once over a dataset and store its raw logits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from kdcache.config import DumpConfig
from kdcache.datasets import build_dataset, dataset_fingerprint
from kdcache.fidelity import Fidelity
from kdcache.models import build_model, load_weights, weights_sha256
from kdcache.runtime import make_loader, resolve_device
from kdcache.store import create_store, store_nbytes

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
    #: The encoding's fidelity over the rows this run computed (kdcache.fidelity), if any.
    fidelity: Fidelity | None = None

    @property
    def bytes_per_sample(self) -> float | None:
        return None if self.bytes_on_disk is None else self.bytes_on_disk / self.num_samples


def dump_teacher(config: DumpConfig) -> DumpResult:
    """Run ``config.teacher`` in eval mode without gradients and write its logits to ``config.out``."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    dataset = build_dataset(config.dataset, split=config.split)
    teacher = build_model(config.teacher, num_classes=dataset.num_classes, in_channels=dataset.in_channels)
    if config.weights is not None:
        load_weights(teacher, config.weights, spec=config.teacher)
    teacher.to(device).eval().requires_grad_(False)

    writer = create_store(
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
    )
    pending = writer.pending_indices()
    loader = make_loader(
        Subset(dataset, pending.tolist()), batch_size=config.batch_size,
        num_workers=config.num_workers, device=device, shuffle=False,
    )
    with torch.inference_mode(), tqdm(total=len(pending), unit="sample", desc="dump", disable=None) as bar:
        for inputs, _, positions in loader:
            logits = teacher(inputs.to(device, non_blocking=True))
            writer.write(pending[positions.numpy()], logits)
            bar.update(len(positions))
    writer.finalize()
    return DumpResult(
        out=config.out,
        num_samples=len(dataset),
        num_classes=dataset.num_classes,
        encoding=config.encoding,
        rows_computed=len(pending),
        bytes_on_disk=store_nbytes(config.out),
        wall_time_s=time.perf_counter() - started,
        fidelity=writer.fidelity.result(),
    )


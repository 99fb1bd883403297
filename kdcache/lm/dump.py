"""Run a causal LM once over local text and store its next-token logits in a sequence store.

Under ``torchrun`` every rank runs :func:`dump_lm` with the same config: rank 0 creates (or
resumes) the store and holds its lock, each rank fills the whole chunks that
:func:`kdcache.store.ranks.partition.sequence_plan` gives it, and rank 0 finalizes the store.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache.config import DumpConfig
from kdcache.distributed import RankSession, rank_session
from kdcache.dump.ranks import finalize_ranks, open_rank_writer
from kdcache.dump.teacher import DumpResult, _resumable_on_os_error
from kdcache.errors import ConfigError, KdcacheError
from kdcache.lm.fingerprint import lm_fingerprint
from kdcache.lm.models import CausalLM, check_dataset_fits, load_causal_lm, pad_id
from kdcache.lm.text import TokenBatch, TokenDataset, build_text_dataset, collate
from kdcache.logits.encodings import Encoding
from kdcache.logits.reduced import reduce_rows, reduces
from kdcache.runtime import autocast, prepare_model
from kdcache.store.format.layout import store_nbytes
from kdcache.store.format.location import parse_location
from kdcache.store.format.metadata import StoreMetadata
from kdcache.store.ranks.partition import SequencePlan
from kdcache.store.read.reader import open_store
from kdcache.store.sequence import SequenceWriter, create_sequence_store, sequence_offsets
from kdcache.store.write.background import BackgroundWriter
from kdcache.store.write.swap import staging_location
from kdcache.store.write.writer import StoreWriter


@dataclass(frozen=True)
class LMDumpResult(DumpResult):
    """A dump's summary; ``num_samples`` counts sequences, ``num_tokens`` the rows stored."""

    num_tokens: int = 0
    #: CPU seconds of the whole process (every thread) during the dump loop.
    loop_cpu_s: float = 0.0

    @property
    def bytes_per_token(self) -> float | None:
        return None if self.bytes_on_disk is None else self.bytes_on_disk / self.num_tokens

    @property
    def tokens_per_s(self) -> float:
        """Teacher tokens computed per second of the dump loop."""
        return self.rows_computed / self.loop_time_s if self.loop_time_s > 0 else 0.0


def _refuse_image_options(config: DumpConfig) -> None:
    """Refuse, in one line naming it, each dump option that means nothing for a language model."""
    refused = (
        ("--weights", config.weights is not None, "an hf:PATH teacher loads the weights in PATH"),
        ("--views", config.views != 1, "augmented views are for image datasets"),
        ("--augment", config.augment is not None, "augmentation recipes are for images"),
        ("--augment-seed", config.augment_seed != 0, "it seeds image augmentation"),
        ("--channels-last", config.channels_last, "a language model's inputs are token ids"),
        ("--inputs", config.inputs != "auto", "token ids always reach the device as int64"),
    )
    for name, given, why in refused:
        if given:
            raise ConfigError(
                f"{name} does not apply to a language-model dump ({why}); drop {name}"
            )


class _SampleIds(Dataset[int]):
    """Sample i is its index: the loader's workers look the tokens up when padding a batch."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


def _collate_samples(
    dataset: TokenDataset, pad: int, samples: list[int]
) -> tuple[list[int], TokenBatch]:
    return samples, collate(dataset, samples, pad_id=pad)


def _fill(
    writer: SequenceWriter,
    teacher: CausalLM,
    loader: DataLoader,
    plan: SequencePlan,
    *,
    device: torch.device,
    amp: str | None,
    total: int,
    where: str,
    writer_workers: int | None,
) -> None:
    """The teacher over the plan's batches into ``writer``, encoding and writing in background
    threads; only this rank's units of each batch are written (see :class:`SequencePlan`).

    Only the rows of real positions with a next token leave the device: (n, V), never (B, L, V);
    on an accelerator a ``topk:K`` or ``sampled:S`` store's rows are reduced there first
    (:func:`reduces_on`).
    """
    encoding = writer.writer.encoding
    reduce_here = reduces_on(device, encoding)
    with (
        _resumable_on_os_error(f"writing {where}"),
        torch.inference_mode(),
        BackgroundWriter(writer.writer, workers=writer_workers) as background,
        tqdm(total=total, unit="tok", unit_scale=True, desc="dump", disable=None) as bar,
    ):
        for samples, batch in loader:
            batch = batch.to(device)
            with autocast(device, amp):
                rows = teacher.rows(batch.input_ids, batch.attention_mask, batch.mask)
            token_rows = writer.token_rows(samples)
            # One write per unit, however many ranks: on the host sampled:S seeds its draws from
            # each write's rows, so a store's bytes must not depend on how the units were grouped.
            for block in plan.blocks(token_rows):
                unit = _picked(rows, block)
                if reduce_here:
                    measured = token_rows[block] % writer.writer.fidelity.sample_every == 0
                    reduced = reduce_rows(unit, encoding, measured=measured, rows=token_rows[block])
                    background.write_reduced(token_rows[block], reduced)
                else:
                    # The rows are this batch's own (computed above, never reused): no copy.
                    background.write(token_rows[block], unit, copy=False)
            bar.update(rows.shape[0])


def _picked(rows: torch.Tensor, block: np.ndarray) -> torch.Tensor:
    """The rows at positions ``block``: a view when they are consecutive (a rank's unit of a
    batch always is), else a copy."""
    start, stop = int(block[0]), int(block[-1]) + 1
    if stop - start == len(block):
        return rows[start:stop]
    return rows[torch.from_numpy(block).to(rows.device)]


def reduces_on(device: torch.device, encoding: Encoding) -> bool:
    """Whether a dump on ``device`` reduces each batch's rows there to what ``encoding`` keeps
    (:mod:`kdcache.logits.reduced`): on an accelerator, where the host would otherwise copy and
    encode every V-wide row; on the CPU the writer threads encode the rows as they are."""
    return device.type != "cpu" and reduces(encoding)


def dump_lm(config: DumpConfig) -> LMDumpResult:
    """Run ``config.teacher`` (``hf:PATH`` or ``module:function``) over ``config.dataset``
    (``text:FILE``) and write its logits, one row per token, to ``config.out``.

    Batches are padded on the right to the dataset's max length; the teacher runs in its
    weights' own dtype (and under ``--amp`` autocasts), and each batch's logits are upcast to
    float32 over the full vocabulary (a padded head's extra columns dropped) before any encoding
    (top-k, sampling) works from them, so its tail statistics and draws see every token.
    ``--resume`` recomputes only the batches that hold an unwritten chunk, with any number of
    ranks.
    """
    _refuse_image_options(config)
    if config.dataset is None:
        raise ConfigError("a language-model dump needs --dataset text:FILE[:MAX_LEN]")
    with rank_session(config.device) as session:
        return _dump_lm(config, session)


def _interrupted(out: str) -> list[StoreMetadata]:
    """The records of the unfinished stores a ``--resume`` of ``out`` may continue: the store
    at ``out`` and the replacement an interrupted ``--overwrite`` was building beside it."""
    location = parse_location(out).resolved()
    candidates = [location]
    if location.folder is not None:
        candidates.append(staging_location(location))
    found = []
    for candidate in candidates:
        try:
            metadata = open_store(candidate, allow_incomplete=True).metadata
        except KdcacheError:
            continue  # nothing to resume there; create_store says so if it matters
        if not metadata.complete:
            found.append(metadata)
    return found


def _as_recorded(record: dict[str, Any], out: str) -> dict[str, Any]:
    """The dataset record of the interrupted dump at ``out`` (or of its interrupted replacement)
    when it holds the same text as ``record`` under another spelling of the path: a resume
    matches the text by its content fingerprint, and stores that recorded the path as typed
    (relative) resume from any folder."""
    same = {key: value for key, value in record.items() if key != "spec"}
    for metadata in _interrupted(out):
        earlier = metadata.dataset or {}
        if {k: v for k, v in earlier.items() if k != "spec"} == same:
            return earlier
    return record


def _resumed_in_float32(out: str) -> bool:
    """Whether the dump to resume at ``out`` ran its teacher in float32 without recording a
    dtype (stores of earlier releases cast every teacher to float32): its missing rows must be
    computed the same way."""
    teachers = [metadata.teacher for metadata in _interrupted(out)]
    return any(isinstance(teacher, dict) and "dtype" not in teacher for teacher in teachers)


def _dump_lm(config: DumpConfig, session: RankSession) -> LMDumpResult:
    # DumpConfig needs --teacher when --weights is not given, and dump_lm refused a missing dataset
    assert config.teacher is not None
    assert config.dataset is not None
    started = time.perf_counter()
    device = session.device
    teacher = load_causal_lm(config.teacher, device=device, device_map=config.device_map)
    legacy_float32 = config.resume and _resumed_in_float32(config.out)
    if legacy_float32:
        teacher = dataclasses.replace(teacher, model=teacher.model.float())
    teacher.model.eval().requires_grad_(False)
    if config.device_map is None:
        _, forward = prepare_model(
            teacher.model, device=device, channels_last=False, compile=config.compile
        )
    else:  # Transformers placed the layers; moving the model would undo it
        compiled = torch.compile(teacher.model) if config.compile else teacher.model
        forward = compiled  # type: ignore[assignment]
    dataset = build_text_dataset(
        config.dataset,
        split=config.split,
        tokenizer=teacher.tokenizer,
        train_on=config.train_on,
        pack=config.pack,
    )
    check_dataset_fits(teacher, dataset)
    offsets = sequence_offsets(
        [len(tokens) for tokens in dataset.sequences], counted=dataset.counted
    )
    record = {
        "spec": dataset.spec,
        "split": dataset.split,
        "transform": "tokenized by the teacher's tokenizer, right-padded to max length",
        "fingerprint": lm_fingerprint(teacher.tokenizer, dataset),
    }
    if config.resume:
        record = _as_recorded(record, config.out)

    def create(path: str, **options: Any) -> StoreWriter:
        return create_sequence_store(path, **options).writer

    with open_rank_writer(
        session,
        create,
        config.out,
        sequences=dataset.sequences,
        counted=dataset.counted,
        vocab_size=teacher.vocab_size,
        encoding=config.encoding,
        chunk_rows=config.chunk_rows,
        teacher={
            "spec": config.teacher,
            "weights_sha256": teacher.weights_sha256,
            # Batches are padded to their longest sequence: another batch size changes the
            # kernels' shapes and the rows' last bits, so a resume must keep it.
            "batch_size": config.batch_size,
            # As for images: autocast logits differ from float32 ones by about bf16/fp16 rounding.
            **({"amp": config.amp} if config.amp else {}),
            # The weights' own dtype (bf16 rows differ from float32 ones likewise); absent from
            # stores of releases that ran every teacher in float32.
            **({} if legacy_float32 else {"dtype": teacher.dtype}),
            # Where the rows came from when the head is padded beyond the tokenizer.
            **({"head_size": teacher.head_size} if teacher.head_size != teacher.vocab_size else {}),
        },
        dataset=record,
        overwrite=config.overwrite,
        resume=config.resume,
        fsync=config.fsync,
    ) as store_writer:
        writer = SequenceWriter(store_writer, offsets)
        plan = session.sequence_plan(
            store_writer.pending_indices(),
            offsets=offsets,
            chunk_rows=store_writer.metadata.chunk_rows,
            batch_size=config.batch_size,
        )
        # The token ids are in memory: workers only pad batches, beside the teacher's forward.
        loader: DataLoader[int] = DataLoader(
            _SampleIds(len(dataset)),
            batch_sampler=plan.batches,
            num_workers=config.num_workers,
            collate_fn=functools.partial(_collate_samples, dataset, pad_id(teacher)),
        )
        total = int(sum(offsets[batch[-1] + 1] - offsets[batch[0]] for batch in plan.batches))
        loop_started, loop_cpu_started = time.perf_counter(), time.process_time()
        _fill(
            writer,
            dataclasses.replace(teacher, model=forward),
            loader,
            plan,
            device=device,
            amp=config.amp,
            total=total,
            where=config.out,
            writer_workers=config.writer_workers,
        )
        loop_time_s = time.perf_counter() - loop_started
        loop_cpu_s = time.process_time() - loop_cpu_started
        (computed,) = session.all_sum(total)
        with _resumable_on_os_error(f"marking {config.out} complete"):
            finalize_ranks(session, store_writer)
    return LMDumpResult(
        out=config.out,
        num_samples=len(dataset),
        num_classes=teacher.vocab_size,
        encoding=config.encoding,
        rows_computed=int(computed),
        bytes_on_disk=store_nbytes(config.out),
        wall_time_s=time.perf_counter() - started,
        loop_time_s=loop_time_s,
        fidelity=store_writer.fidelity.result(),
        num_tokens=dataset.num_tokens,
        loop_cpu_s=loop_cpu_s,
    )

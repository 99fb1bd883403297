"""Run a causal LM once over local text and store its next-token logits in a sequence store."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from kdcache.config import DumpConfig
from kdcache.dump.teacher import DumpResult, _resumable_on_os_error
from kdcache.errors import ConfigError
from kdcache.lm.fingerprint import lm_fingerprint
from kdcache.lm.loop import pad_id
from kdcache.lm.models import CausalLM, load_causal_lm
from kdcache.lm.text import TokenDataset, build_text_dataset, collate
from kdcache.runtime import resolve_device
from kdcache.store.format.layout import store_nbytes
from kdcache.store.sequence import SequenceWriter, create_sequence_store
from kdcache.store.write.background import BackgroundWriter


@dataclass(frozen=True)
class LMDumpResult(DumpResult):
    """A dump's summary; ``num_samples`` counts sequences, ``num_tokens`` the rows stored."""

    num_tokens: int = 0

    @property
    def bytes_per_token(self) -> float | None:
        return None if self.bytes_on_disk is None else self.bytes_on_disk / self.num_tokens

    @property
    def tokens_per_s(self) -> float:
        """Teacher tokens computed per second of the dump loop."""
        return self.rows_computed / self.loop_time_s if self.loop_time_s > 0 else 0.0


def _pending_batches(pending: np.ndarray, *, num_samples: int, batch_size: int) -> list[list[int]]:
    """The batches of the grid ``[0, B)``, ``[B, 2B)``, ... that hold a pending sample: a resumed
    dump recomputes exactly the batches an uninterrupted one ran (bit-identical on CPU)."""
    starts = np.unique(np.asarray(pending) // batch_size) * batch_size
    return [list(range(int(start), min(int(start) + batch_size, num_samples))) for start in starts]


def _fill(
    writer: SequenceWriter,
    teacher: CausalLM,
    dataset: TokenDataset,
    batches: list[list[int]],
    *,
    device: torch.device,
    where: str,
) -> None:
    """The teacher over ``batches`` into ``writer``, encoding and writing in a background thread.

    Only the rows of real positions with a next token leave the device: (n, V), never (B, L, V).
    """
    total = sum(len(dataset.sequences[i]) - 1 for batch in batches for i in batch)
    with (
        _resumable_on_os_error(f"writing {where}"),
        torch.inference_mode(),
        BackgroundWriter(writer.writer) as background,
        tqdm(total=total, unit="tok", unit_scale=True, desc="dump", disable=None) as bar,
    ):
        for samples in batches:
            batch = collate(dataset, samples, pad_id=pad_id(teacher)).to(device)
            rows = teacher.logits(batch.input_ids, batch.attention_mask)[batch.mask]
            background.write(writer.token_rows(samples), rows)
            bar.update(rows.shape[0])


def dump_lm(config: DumpConfig) -> LMDumpResult:
    """Run ``config.teacher`` (``hf:PATH`` or ``module:function``) over ``config.dataset``
    (``text:FILE``) and write its logits, one row per token, to ``config.out``.

    Batches are padded on the right to the dataset's max length; logits are taken in float32
    from the model's output over the full vocabulary, and any encoding (top-k, sampling) works
    from those, so its tail statistics and draws see every token. ``--resume`` recomputes only
    the batches that hold an unwritten chunk.
    """
    if config.weights is not None:
        raise ConfigError(
            "--weights applies to image teachers; an hf:PATH teacher loads the weights in PATH"
        )
    started = time.perf_counter()
    device = resolve_device(config.device)
    teacher = load_causal_lm(config.teacher, device=device)
    teacher.model.eval().requires_grad_(False)
    dataset = build_text_dataset(config.dataset, split=config.split, tokenizer=teacher.tokenizer)
    with create_sequence_store(
        config.out,
        sequences=dataset.sequences,
        vocab_size=teacher.vocab_size,
        encoding=config.encoding,
        chunk_rows=config.chunk_rows,
        teacher={"spec": config.teacher, "weights_sha256": teacher.weights_sha256},
        dataset={
            "spec": dataset.spec,
            "split": dataset.split,
            "transform": "tokenized by the teacher's tokenizer, right-padded to max length",
            "fingerprint": lm_fingerprint(teacher.tokenizer, dataset),
        },
        overwrite=config.overwrite,
        resume=config.resume,
    ) as writer:
        pending = writer.pending_samples()
        batches = _pending_batches(pending, num_samples=len(dataset), batch_size=config.batch_size)
        computed = int(sum(len(dataset.sequences[i]) - 1 for batch in batches for i in batch))
        loop_started = time.perf_counter()
        _fill(writer, teacher, dataset, batches, device=device, where=config.out)
        loop_time_s = time.perf_counter() - loop_started
        with _resumable_on_os_error(f"marking {config.out} complete"):
            writer.finalize()
    return LMDumpResult(
        out=config.out,
        num_samples=len(dataset),
        num_classes=teacher.vocab_size,
        encoding=config.encoding,
        rows_computed=computed,
        bytes_on_disk=store_nbytes(config.out),
        wall_time_s=time.perf_counter() - started,
        loop_time_s=loop_time_s,
        fidelity=writer.writer.fidelity.result(),
        num_tokens=dataset.num_tokens,
    )

"""Train a causal LM with next-token cross-entropy, or distill one from a sequence store or a
live teacher.

Both share :func:`fit_lm`: seeded initialisation and shuffling, Adam, held-out perplexity after
every epoch, and the run folder of the image runs with perplexity in place of accuracy:
``best/`` and ``last/`` (``save_pretrained`` folders, usable as ``hf:RUN/best``),
``metrics.jsonl``, ``config.json`` and ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdcache._version import __version__
from kdcache.config import LoopConfig, TrainConfig
from kdcache.errors import StoreMismatchError
from kdcache.lm.config import LMDistillConfig
from kdcache.lm.fingerprint import (
    compare_lm_fingerprints,
    compare_tokenizers,
    lm_fingerprint,
    tokenizer_fingerprint,
)
from kdcache.lm.models import CausalLM, load_causal_lm, save_causal_lm
from kdcache.lm.plots import plot_lm_curves
from kdcache.lm.text import TokenBatch, TokenDataset, build_text_dataset, collate
from kdcache.logits.sequence_losses import TokenDistillationLoss, TokenTeacher
from kdcache.run_folder import prepare_output_dir
from kdcache.runtime import resolve_device
from kdcache.store.sequence import SequenceReader, open_sequence_store

log = logging.getLogger("kdcache")

#: The loss of one batch from (student logits (B, L, V), the batch, its sample indices).
BatchLoss = Callable[[torch.Tensor, TokenBatch, np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class LMRunResult:
    """What a finished run reports: held-out perplexities, wall time in seconds."""

    out: str
    best_val_ppl: float
    final_val_ppl: float
    best_epoch: int
    epochs: int
    wall_time_s: float
    train_tokens: int


def held_out_split(split: str) -> str:
    return "test" if split == "train" else "train"


def pad_id(lm: CausalLM) -> int:
    """Any id works (padding is masked); the tokenizer's own keeps saved batches readable."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(lm.tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


@torch.no_grad()
def evaluate_lm(
    lm: CausalLM, dataset: TokenDataset, *, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats per token) over every token of ``dataset``, and its
    perplexity exp(CE)."""
    lm.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        samples = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate(dataset, samples, pad_id=pad_id(lm)).to(device)
        logits = lm.logits(batch.input_ids, batch.attention_mask)
        total += F.cross_entropy(
            logits[batch.mask], batch.targets[batch.mask], reduction="sum"
        ).item()
        count += int(batch.mask.sum())
    loss = total / count
    return loss, math.exp(min(loss, 700.0))


def fit_lm(
    *,
    student: CausalLM,
    train_set: TokenDataset,
    val_set: TokenDataset,
    config: LoopConfig,
    batch_loss: BatchLoss,
    out: Path,
    device: torch.device,
) -> LMRunResult:
    """The loop shared by :func:`train_lm` and :func:`distill_lm` (the student is built already)."""
    started = time.perf_counter()
    model = student.model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    best_ppl, best_epoch, val_ppl = math.inf, 0, math.inf
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(train_set), generator=order).numpy()
        loss_sum, tokens = 0.0, 0
        batches = range(0, len(train_set), config.batch_size)
        for start in tqdm(
            batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None
        ):
            samples = permutation[start : start + config.batch_size]
            batch = collate(train_set, samples, pad_id=pad_id(student)).to(device)
            logits = student.logits(batch.input_ids, batch.attention_mask)
            loss = batch_loss(logits, batch, samples)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count = int(batch.mask.sum())
            loss_sum += loss.item() * count
            tokens += count
        train_time = time.perf_counter() - epoch_started
        val_loss, val_ppl = evaluate_lm(
            student, val_set, batch_size=config.batch_size, device=device
        )
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / tokens,
            "val_loss": val_loss,
            "val_ppl": val_ppl,
            "train_time_s": round(train_time, 4),
            "train_tokens_per_s": round(tokens / train_time, 1),
        }
        with metrics_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d/%d  train_loss %.4f  val_ppl %.3f  (%.1fs, %.0f tokens/s)",
            epoch,
            config.epochs,
            record["train_loss"],
            val_ppl,
            train_time,
            record["train_tokens_per_s"],
        )
        if val_ppl < best_ppl:
            best_ppl, best_epoch = val_ppl, epoch
            save_causal_lm(student, out / "best")
        save_causal_lm(student, out / "last")
    plot_lm_curves(metrics_path, out / "curves.png", title=f"{student.spec}: {out.resolve().name}")
    return LMRunResult(
        out=str(out),
        best_val_ppl=best_ppl,
        final_val_ppl=val_ppl,
        best_epoch=best_epoch,
        epochs=config.epochs,
        wall_time_s=time.perf_counter() - started,
        train_tokens=train_set.num_tokens,
    )


def train_lm(config: TrainConfig) -> LMRunResult:
    """Next-token cross-entropy training (a teacher, or the CE-only student baseline)."""
    device = resolve_device(config.device)
    student = load_causal_lm(config.model, seed=config.seed)
    train_set = build_text_dataset(config.dataset, split=config.split, tokenizer=student.tokenizer)
    val_set = build_text_dataset(
        config.dataset, split=held_out_split(config.split), tokenizer=student.tokenizer
    )
    out = prepare_output_dir(config.out, overwrite=config.overwrite, marker="last")
    config.save(
        out / "config.json", command="train", device=str(device), kdcache_version=__version__
    )

    def cross_entropy(logits: torch.Tensor, batch: TokenBatch, samples: np.ndarray) -> torch.Tensor:
        return F.cross_entropy(logits[batch.mask], batch.targets[batch.mask])

    return fit_lm(
        student=student,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=cross_entropy,
        out=out,
        device=device,
    )


def check_lm_store(store: SequenceReader, student: CausalLM, dataset: TokenDataset) -> None:
    """Refuse a store whose tokenizer, text or vocabulary differ from the student's and dataset's,
    naming the part that differs."""
    recorded = (store.metadata.dataset or {}).get("fingerprint") or {}
    actual = lm_fingerprint(student.tokenizer, dataset)
    tokenizer = compare_tokenizers(recorded.get("tokenizer", {}), actual["tokenizer"])
    if tokenizer:
        raise StoreMismatchError(
            f"{store.where} was dumped with another tokenizer than student {student.spec}'s: "
            + "; ".join(tokenizer)
            + "; give the student the teacher's tokenizer"
        )
    if student.vocab_size != store.vocab_size:
        raise StoreMismatchError(
            f"student {student.spec} predicts {student.vocab_size} tokens but {store.where} holds "
            f"{store.vocab_size}; size the student's output (vocab_size) to the teacher's"
        )
    differences = compare_lm_fingerprints(recorded, actual)
    if differences:
        raise StoreMismatchError(
            f"{store.where} was not dumped from dataset {dataset.spec!r} ({dataset.split}): "
            + "; ".join(differences)
            + "; use the text, max length and split the store was dumped from"
        )


def distill_lm(config: LMDistillConfig, *, store: SequenceReader | None = None) -> LMRunResult:
    """Train ``config.student`` on the token-level loss against a store (or a live teacher).

    ``store`` is ``config.cache`` already opened, to share one decoded store across runs.
    """
    device = resolve_device(config.device)
    student = load_causal_lm(config.student, seed=config.seed)
    loss_fn = TokenDistillationLoss(
        divergence=config.loss, temperature=config.temperature, alpha=config.alpha, skew=config.skew
    )
    resolved: dict = {"command": "distill", "device": str(device), "kdcache_version": __version__}
    teacher_rows: Callable[[TokenBatch, np.ndarray], TokenTeacher]
    if config.cache is not None:
        store = store or open_sequence_store(config.cache, memory_budget=config.cache_memory)
        recorded = store.metadata.dataset or {}
        spec = config.dataset or recorded.get("spec")
        split = config.split or recorded.get("split") or "train"
        if spec is None:
            raise StoreMismatchError(
                f"{store.where} records no dataset; pass --dataset text:FILE (and --split)"
            )
        train_set = build_text_dataset(spec, split=split, tokenizer=student.tokenizer)
        check_lm_store(store, student, train_set)
        store.store.load()
        resolved.update(dataset=spec, split=split, store=store.metadata.to_dict())
        cached = store

        def teacher_rows(batch: TokenBatch, samples: np.ndarray) -> TokenTeacher:
            return cached.read(samples, temperature=config.temperature).to(device)
    else:
        assert config.teacher is not None and config.dataset is not None
        teacher = load_causal_lm(config.teacher, device=device)
        teacher.model.eval().requires_grad_(False)
        differences = compare_tokenizers(
            tokenizer_fingerprint(teacher.tokenizer), tokenizer_fingerprint(student.tokenizer)
        )
        if differences:
            raise StoreMismatchError(
                f"teacher {teacher.spec} and student {student.spec} tokenize differently: "
                + "; ".join(differences)
                + "; give the student the teacher's tokenizer"
            )
        train_set = build_text_dataset(
            config.dataset, split=config.split or "train", tokenizer=teacher.tokenizer
        )
        resolved.update(
            dataset=train_set.spec,
            split=train_set.split,
            teacher_weights_sha256=teacher.weights_sha256,
        )

        @torch.no_grad()
        def teacher_rows(batch: TokenBatch, samples: np.ndarray) -> TokenTeacher:
            return teacher.logits(batch.input_ids, batch.attention_mask)[batch.mask]

    val_set = build_text_dataset(
        train_set.spec, split=held_out_split(train_set.split), tokenizer=student.tokenizer
    )
    out = prepare_output_dir(config.out, overwrite=config.overwrite, marker="last")
    config.save(out / "config.json", **resolved)

    def kd_loss(logits: torch.Tensor, batch: TokenBatch, samples: np.ndarray) -> torch.Tensor:
        rows = teacher_rows(batch, samples)
        return loss_fn(logits, rows, batch.targets, batch.mask)["total"]

    return fit_lm(
        student=student,
        train_set=train_set,
        val_set=val_set,
        config=config,
        batch_loss=kd_loss,
        out=out,
        device=device,
    )

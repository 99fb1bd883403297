"""Distill a causal LM with the Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``) from a store.

A token store (``kdcache dump-teacher --teacher hf:PATH --dataset text:FILE``) holds the teacher's
next-token distribution at every position of every sample, by sample index, and the token ids
themselves. Three pieces put it into a Trainer:

- :class:`TokenStoreDataset`: the store's sequences as features ``{"input_ids", "sample_index"}``,
  plus ``labels`` with -100 outside the assistant's tokens for a store dumped with ``--train-on
  assistant``; any other dataset works if each item carries the ``sample_index`` of its sequence
  in the store and exactly the token ids that were dumped
  (``datasets.Dataset.add_column("sample_index", ...)``).
- :class:`TeacherRowsCollator`: pads a batch on the right and attaches the teacher's rows of its
  samples' counted positions (every position, or those whose label is not -100), read from the
  store in one gather, in whatever encoding it holds (dense float, int8, ``topk:K``,
  ``sampled:S``).
- :class:`TokenDistillationMixin`: a ``compute_loss`` that applies a
  :class:`~kdcache.logits.sequence_losses.TokenDistillationLoss` (divergence, temperature, alpha)
  to the student's logits and those rows. ``DistillationTrainer`` is the mixin on
  ``transformers.Trainer``; put it before ``trl.SFTTrainer`` the same way for TRL.

Under ``accelerate launch`` or ``torchrun`` each process collates its own batches, so each reads
only its own rows. The loss is each batch's mean over its counted tokens, as in ``kdcache distill``.
transformers (the ``[llm]`` extra) is imported only when ``DistillationTrainer`` is first used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.lm._hf import require_transformers
from kdcache.lm.fingerprint import (
    compare_lm_fingerprints,
    compare_tokenizers,
    lm_fingerprint,
    tokenizer_fingerprint,
)
from kdcache.lm.text import TokenDataset, build_text_dataset
from kdcache.logits.sequence_losses import IGNORE_INDEX, TOKEN_LOSSES, TokenDistillationLoss
from kdcache.store.format.layout import StoreLike
from kdcache.store.sequence import SequenceReader, open_sequence_store

#: The feature that names a sequence's sample in the store.
SAMPLE_INDEX = "sample_index"
#: The batch entry holding the teacher's rows (one per counted position, row-major).
TEACHER = "teacher"
#: The feature (and batch entry) of the next-token labels: the ids, -100 where no loss counts.
LABELS = "labels"


def _opened(store: StoreLike | SequenceReader) -> SequenceReader:
    return store if isinstance(store, SequenceReader) else open_sequence_store(store)


def check_tokenizer(store: SequenceReader, tokenizer: Any) -> None:
    """Refuse a tokenizer other than the one ``store`` was dumped with, naming what differs (a
    store that records none, written by a user's own code, is not checked)."""
    recorded = ((store.metadata.dataset or {}).get("fingerprint") or {}).get("tokenizer")
    if not recorded:
        return
    differences = compare_tokenizers(recorded, tokenizer_fingerprint(tokenizer))
    if differences:
        raise StoreMismatchError(
            f"{store.where} was dumped with another tokenizer than the one given: "
            + "; ".join(differences)
            + "; give the student the teacher's tokenizer"
        )


class TokenStoreDataset(Dataset):
    """The sequences a token store holds, as Trainer features.

    Item ``i`` is ``{"input_ids": (L,) int64 tensor, "sample_index": s}`` for sample
    ``s = indices[i]`` (``i`` when ``indices`` is None), its token ids read back from the store
    itself. ``tokenizer`` (optional) is checked against the one the store records.

    A store dumped with ``--train-on assistant`` holds rows only where the assistant's tokens are
    predicted, and not every token id: its sequences are rebuilt from the chat data it records
    (or ``dataset``, the same data where it is now) with ``tokenizer`` (then required), checked
    against the store's fingerprint, and each item also carries ``labels``: the ids, with -100
    at every token the loss does not count, as ``kdcache distill`` masks them.
    """

    def __init__(
        self,
        store: StoreLike | SequenceReader,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        tokenizer: Any = None,
        dataset: str | None = None,
    ) -> None:
        self.store = _opened(store)
        if tokenizer is not None:
            check_tokenizer(self.store, tokenizer)
        self.rebuilt = (
            None if self.store.every_position else _rebuilt(self.store, tokenizer, dataset)
        )
        count = self.store.num_sequences
        samples = np.arange(count) if indices is None else np.asarray(indices)
        if samples.ndim != 1 or not (samples.size == 0 or np.issubdtype(samples.dtype, np.integer)):
            raise ConfigError(f"indices must be a 1-D sequence of integers, got {indices!r}")
        if samples.size and (samples.min() < 0 or samples.max() >= count):
            raise ConfigError(
                f"indices must lie in [0, {count}) for {self.store.where}, got {samples.min()} to "
                f"{samples.max()}"
            )
        self.indices = samples.astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = int(self.indices[position])
        if self.rebuilt is None:
            return {"input_ids": torch.from_numpy(self.store.tokens(sample)), SAMPLE_INDEX: sample}
        assert self.rebuilt.counted is not None  # rebuilt with train_on="assistant"
        ids = torch.from_numpy(self.rebuilt.sequences[sample]).long()
        labels = ids.clone()
        labels[0] = IGNORE_INDEX  # no position predicts the first token
        labels[1:].masked_fill_(~torch.from_numpy(self.rebuilt.counted[sample]), IGNORE_INDEX)
        return {"input_ids": ids, LABELS: labels, SAMPLE_INDEX: sample}


def _rebuilt(store: SequenceReader, tokenizer: Any, dataset: str | None) -> TokenDataset:
    """The assistant-only sequences ``store`` was dumped from, re-rendered with ``tokenizer``;
    refused in one line when they are not the store's (another template, text or packing)."""
    record = store.metadata.dataset or {}
    fingerprint = record.get("fingerprint") or {}
    if tokenizer is None:
        raise ConfigError(
            f"{store.where} holds rows only at the assistant's tokens (dumped with --train-on "
            "assistant), so its token ids are not all stored; pass tokenizer= (the teacher's) so "
            "that the chat data it records is rendered again"
        )
    spec = dataset or record.get("spec")
    if spec is None:
        raise StoreMismatchError(
            f"{store.where} records no dataset; pass dataset= naming the chat data it was "
            "dumped from"
        )
    rebuilt = build_text_dataset(
        spec,
        split=record.get("split", "train"),
        tokenizer=tokenizer,
        train_on="assistant",
        pack=bool((fingerprint.get("data") or {}).get("packed")),
    )
    differences = compare_lm_fingerprints(fingerprint, lm_fingerprint(tokenizer, rebuilt))
    if differences:
        raise StoreMismatchError(
            f"{store.where} was not dumped from {spec!r} as rendered now: "
            + "; ".join(differences)
            + "; pass dataset= naming the data the store was dumped from"
        )
    return rebuilt


class TeacherRowsCollator:
    """``data_collator`` for features ``{"input_ids", "sample_index"}`` and optionally
    ``labels``.

    Pads ``input_ids`` on the right with ``pad_token_id`` and returns ``input_ids``,
    ``attention_mask`` and ``labels`` (the features' labels, else the ids; -100 on padding) as a
    causal LM takes them, plus ``sample_index`` (B,) and ``teacher``: the store's rows of the
    positions that count, read in one gather (a dense float32 tensor, or the store's sparse or
    sampled rows), in row-major order. A position counts when it has a next token whose label is
    not -100, so labels masked outside the assistant's replies read only those rows, from a store
    with every position or from one dumped with ``--train-on assistant`` (which needs such labels:
    :class:`TokenStoreDataset` gives them). ``temperature`` is the one the loss softens at (the
    dense reconstruction of some encodings depends on it).

    Features without ``sample_index`` (a held-out text set) are padded alone: such a batch has no
    teacher rows, and :class:`TokenDistillationMixin` scores it with the model's own
    cross-entropy, outside training only.
    """

    def __init__(
        self, store: StoreLike | SequenceReader, *, temperature: float, pad_token_id: int = 0
    ) -> None:
        self.store = _opened(store)
        self.temperature = temperature
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        sequences = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(tokens) for tokens in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, tokens in enumerate(sequences):
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labelled = _all_or_none(features, LABELS)
        if labelled:
            for row, feature in enumerate(features):
                given = torch.as_tensor(feature[LABELS], dtype=torch.long)
                if given.shape != sequences[row].shape:
                    raise ConfigError(
                        f"feature {row} has {len(given)} labels for {len(sequences[row])} "
                        "input_ids; give one label per token (-100 where the loss does not count)"
                    )
                labels[row, : len(given)] = given
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            LABELS: labels,
        }
        if not _all_or_none(features, SAMPLE_INDEX):
            return batch
        samples = np.array([int(f[SAMPLE_INDEX]) for f in features], dtype=np.int64)
        # Position j counts when token j + 1 is a label: the causal shift compute_loss applies.
        counted = labels[:, 1:] != IGNORE_INDEX
        self._check_samples(samples, [len(tokens) for tokens in sequences], counted, labelled)
        batch[SAMPLE_INDEX] = torch.from_numpy(samples)
        if self.store.every_position and labelled:
            sequence, position = counted.nonzero(as_tuple=True)
            rows = self.store.offsets[samples[sequence.numpy()]] + position.numpy()
            batch[TEACHER] = self.store.read_rows(rows, temperature=self.temperature)
        else:
            batch[TEACHER] = self.store.read(samples, temperature=self.temperature)
        return batch

    def _check_samples(
        self, samples: np.ndarray, lengths: list[int], counted: torch.Tensor, labelled: bool
    ) -> None:
        count = self.store.num_sequences
        outside = samples[(samples < 0) | (samples >= count)]
        if outside.size:
            raise StoreMismatchError(
                f"{SAMPLE_INDEX} {outside[0]} is not a sample of {self.store.where}, which holds "
                f"{count}; the dataset does not belong to this store"
            )
        if self.store.every_position:
            stored, given, what = self.store.lengths[samples], np.asarray(lengths), "tokens"
        elif not labelled:
            raise ConfigError(
                f"{self.store.where} holds rows only at the assistant's tokens (dumped with "
                "--train-on assistant), so each feature needs labels with -100 at every other "
                "token; TokenStoreDataset(store, tokenizer=...) gives them"
            )
        else:
            stored, given, what = (
                np.diff(self.store.offsets)[samples],
                counted.sum(1).numpy(),
                ("counted positions (labels other than -100 after the first token)"),
            )
        differ = np.flatnonzero(stored != given)
        if differ.size:
            first = differ[0]
            raise StoreMismatchError(
                f"sample {samples[first]} has {given[first]} {what} but {self.store.where} holds "
                f"{stored[first]} for it; feed the token ids (and labels) that were dumped "
                "(TokenStoreDataset reads them from the store)"
            )


def _all_or_none(features: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every feature has ``key``; a batch where only some do is refused."""
    present = [key in feature for feature in features]
    if any(present) and not all(present):
        raise ConfigError(
            f"a batch mixes features with and without {key!r}; give every item of a "
            f"distillation dataset its {key!r} or none"
        )
    return all(present)


class TokenDistillationMixin:
    """A Trainer whose training loss is ``distillation_loss`` against a token store's rows.

    Put it first among the bases: ``class DistillSFT(TokenDistillationMixin, trl.SFTTrainer)``.
    ``store`` is a path, URL or :class:`~kdcache.store.sequence.SequenceReader`;
    ``distillation_loss`` a :class:`~kdcache.logits.sequence_losses.TokenDistillationLoss`
    (default: ``kd`` at its default temperature and alpha), the one owner of the temperature and
    alpha. ``train_dataset`` defaults to the store's own sequences and ``data_collator`` to a
    :class:`TeacherRowsCollator` at the loss's temperature; with ``processing_class`` (the
    tokenizer) given, it is checked against the store's and pads with its pad (or eos) token.
    ``sample_index`` survives the Trainer's ``remove_unused_columns``.
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        store: StoreLike | SequenceReader,
        distillation_loss: TokenDistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        if distillation_loss is None:
            distillation_loss = TokenDistillationLoss()
        if not isinstance(distillation_loss, TokenDistillationLoss):
            raise ConfigError(
                f"distillation_loss must be a TokenDistillationLoss, got "
                f"{type(distillation_loss).__name__}; build one with "
                f"kdcache.logits.sequence_losses.TOKEN_LOSSES[name](temperature=..., alpha=...), "
                f"name one of {', '.join(TOKEN_LOSSES)}"
            )
        self.teacher_store = _opened(store)
        self.distillation_loss = distillation_loss
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("train_dataset") is None:
            kwargs["train_dataset"] = TokenStoreDataset(self.teacher_store, tokenizer=tokenizer)
        elif tokenizer is not None:
            check_tokenizer(self.teacher_store, tokenizer)
        collator = kwargs.get("data_collator")
        if collator is None:
            kwargs["data_collator"] = TeacherRowsCollator(
                self.teacher_store,
                temperature=distillation_loss.temperature,
                pad_token_id=_pad_token_id(tokenizer),
            )
        elif (
            isinstance(collator, TeacherRowsCollator)
            and collator.temperature != distillation_loss.temperature
        ):
            raise ConfigError(
                f"the collator reads rows at temperature {collator.temperature} but the loss "
                f"softens at {distillation_loss.temperature}; leave data_collator out (it then "
                "takes the loss's) or give both the same temperature"
            )
        super().__init__(model, args, **kwargs)  # type: ignore[call-arg]
        # The model's own loss arguments (num_items_in_batch) are not used: see below.
        cast(Any, self).model_accepts_loss_kwargs = False

    #: The loss is a per-batch mean: the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops features its model's forward does not name (remove_unused_columns);
        # the sample index is for the collator. transformers' only private name used here: if it
        # goes, training stops with compute_loss's error below instead of distilling nothing.
        trainer = cast(Any, super())
        trainer._set_signature_columns_if_needed()
        columns = cast(Any, self)._signature_columns
        if SAMPLE_INDEX not in columns:
            columns.append(SAMPLE_INDEX)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``distillation_loss`` of the batch's student logits against its teacher rows; a batch
        without rows (a held-out text set) gets the model's own loss, outside training only."""
        if TEACHER not in inputs:
            if model.training:
                raise ConfigError(
                    f"a training batch came without the teacher's rows: its features have no "
                    f"{SAMPLE_INDEX!r}; use TokenStoreDataset (or add the column) and a "
                    "TeacherRowsCollator"
                )
            # the batch's own mean, like the distillation loss (not a sum over num_items_in_batch)
            return cast(Any, super()).compute_loss(model, inputs, return_outputs=return_outputs)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        # Position j is scored against token j + 1: the causal shift the store's rows follow.
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        terms = self.distillation_loss(
            logits.float(), inputs[TEACHER].to(logits.device), targets, targets != IGNORE_INDEX
        )
        loss = terms["total"]
        return (loss, outputs) if return_outputs else loss


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad (or eos) id; any id works, padding is masked."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _distillation_trainer() -> type:
    trainer: Any = require_transformers().Trainer

    class DistillationTrainer(TokenDistillationMixin, trainer):
        """``transformers.Trainer`` distilling from a token store: see
        :class:`TokenDistillationMixin` for the arguments it adds."""

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


def __getattr__(name: str) -> Any:
    # The Trainer subclass is made on first use, so that importing this module needs no
    # transformers.
    if name == "DistillationTrainer":
        trainer = _distillation_trainer()
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Local text as token sequences: the ``text:FILE[:MAX_LENGTH]`` dataset spec.

FILE is JSON Lines (``.jsonl``: one document per line, an object with a ``"text"`` field or a
string) or plain text (any other suffix: documents separated by blank lines). Each document is
tokenized with the model's own tokenizer (its special tokens, e.g. a BOS, included), ends with the
EOS token when the tokenizer has one, and is cut into consecutive pieces of at most MAX_LENGTH
tokens (default 128); pieces shorter than 2 tokens are dropped. Every tenth document (index 9, 19,
...) forms the ``test`` split, the others ``train``: a document's pieces never straddle splits.

A dataset's ``spec`` is the canonical ``text:/absolute/FILE:MAX_LENGTH``, so a store or run that
records it means the same file from any working directory; which text a store was made from is
decided by its content fingerprint (:mod:`kdcache.lm.fingerprint`), never by the path's spelling.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import DatasetNotFoundError, SpecError

DEFAULT_MAX_LENGTH = 128
#: MAX_LENGTH beyond any model's positions: refused before a batch of that width is allocated.
MAX_LENGTH_LIMIT = 1 << 20
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: Every HELD_OUT_EVERY-th document is held out for validation.
HELD_OUT_EVERY = 10
SPLITS = ("train", "test")


def is_text_spec(spec: str | None) -> bool:
    return spec is not None and spec.startswith("text:")


def parse_text_spec(spec: str) -> tuple[Path, int]:
    """FILE and MAX_LENGTH of ``text:FILE[:MAX_LENGTH]``; a last part that is an integer is the
    MAX_LENGTH, checked to lie in [2, :data:`MAX_LENGTH_LIMIT`]."""
    kind, _, rest = spec.partition(":")
    head, sep, tail = rest.rpartition(":")
    if sep and _INTEGER.fullmatch(tail):
        path, max_length = head, _max_length(spec, tail)
    else:
        path, max_length = rest, DEFAULT_MAX_LENGTH
    if kind != "text" or not path:
        raise SpecError(f"malformed dataset {spec!r}; expected text:FILE[:MAX_LENGTH]")
    return Path(path), max_length


def _max_length(spec: str, text: str) -> int:
    # Sized as text first: int() of thousands of digits is slow, then refused by Python.
    fits = len(text) <= 12 and not text.startswith("-")
    if not (fits and 2 <= int(text) <= MAX_LENGTH_LIMIT):
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
        named = spec if len(spec) <= 80 else f"{spec[:60]}..."
        raise SpecError(
            f"{named}: MAX_LENGTH must be from 2 to {MAX_LENGTH_LIMIT:,} tokens, got {shown}; "
            "give at most the model's positions (its max_position_embeddings)"
        )
    return int(text)


def canonical_text_spec(path: Path, max_length: int) -> str:
    """``text:/absolute/FILE:MAX_LENGTH``: the same file from any working directory."""
    return f"text:{path.resolve()}:{max_length}"


def read_documents(path: Path) -> list[str]:
    """The documents of a UTF-8 text file; a binary or undecodable file is refused in one line."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"no text file at {path}; pass text:FILE with a local .jsonl or plain-text file"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetNotFoundError(
            f"cannot read {path} ({error.strerror or error}); pass a readable text file"
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(
            f"{path} holds a NUL byte at offset {nul}, so it is binary, not text; pass a UTF-8 "
            ".jsonl or plain-text file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it to UTF-8 (e.g. iconv -t UTF-8) and pass it again"
        ) from None
    if path.suffix != ".jsonl":
        return [part.strip() for part in text.split("\n\n") if part.strip()]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpecError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        except (ValueError, RecursionError) as error:  # a number of 4300+ digits, deep nesting
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:60]
            raise SpecError(f"{path}:{number} is JSON kdcache cannot read ({reason})") from None
        value = record.get("text") if isinstance(record, dict) else record
        if not isinstance(value, str):
            raise SpecError(
                f"{path}:{number} has no text; each line must be a string or an object with a "
                '"text" string field'
            )
        documents.append(value)
    return documents


@dataclass
class TokenDataset:
    """Token id sequences of one split, with the spec and limits they were made with."""

    spec: str
    split: str
    sequences: list[np.ndarray]
    max_length: int

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        """Rows a sequence store of this dataset holds: tokens that have a next token."""
        return sum(len(tokens) - 1 for tokens in self.sequences)


def build_text_dataset(spec: str, *, split: str, tokenizer: Any) -> TokenDataset:
    """Tokenize ``text:FILE[:MAX_LENGTH]`` with ``tokenizer`` (see the module docstring)."""
    if split not in SPLITS:
        raise SpecError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path, max_length = parse_text_spec(spec)
    documents = read_documents(path)
    held_out = split == "test"
    chosen = [
        doc
        for i, doc in enumerate(documents)
        if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out
    ]
    eos = getattr(tokenizer, "eos_token_id", None)
    sequences = []
    for document in chosen:
        ids = list(tokenizer(document)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            if len(piece) >= 2:
                sequences.append(np.asarray(piece, dtype=np.int64))
    if not sequences and chosen:
        raise SpecError(
            f"{spec} ({split}): each of its {len(chosen)} documents is shorter than 2 tokens, so "
            "no token has a next one to learn; give documents of at least 2 tokens"
        )
    if not sequences:
        raise SpecError(
            f"{spec} has no {split} document among its {len(documents)}; the test split is every "
            f"{HELD_OUT_EVERY}th document, so give at least {HELD_OUT_EVERY}"
        )
    return TokenDataset(
        spec=canonical_text_spec(path, max_length),
        split=split,
        sequences=sequences,
        max_length=max_length,
    )


@dataclass(frozen=True)
class TokenBatch:
    """Sequences padded on the right to the dataset's max length.

    ``mask`` marks the positions that have a next token; ``targets`` holds that next token there
    (and -100 elsewhere). Padding to one fixed length makes each sequence's logits independent of
    the batch it lands in (bit for bit on CPU), so a store and a live teacher agree exactly.
    ``indices`` (the sample indices, where a store's rows are looked up) stay on the host.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device) -> TokenBatch:
        moved = (
            t.to(device, non_blocking=True)
            for t in (self.input_ids, self.attention_mask, self.targets, self.mask)
        )
        input_ids, attention_mask, targets, mask = moved
        return TokenBatch(input_ids, attention_mask, targets, mask, self.indices)


def collate(
    dataset: TokenDataset, samples: list[int] | np.ndarray, *, pad_id: int = 0
) -> TokenBatch:
    length = dataset.max_length
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    targets = torch.full((len(samples), length), -100, dtype=torch.long)
    for row, sample in enumerate(samples):
        tokens = torch.from_numpy(dataset.sequences[int(sample)])
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        targets[row, : len(tokens) - 1] = tokens[1:]
    indices = torch.as_tensor(np.asarray(samples, dtype=np.int64))
    return TokenBatch(ids, attention, targets, targets != -100, indices)

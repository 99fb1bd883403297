"""Local text as token sequences: the ``text:``, ``jsonl:``, ``parquet:`` and ``hfdisk:`` specs.

``text:FILE[:MAX_LENGTH]``: FILE is JSON Lines (``.jsonl``: one document per line, an object with
a ``"text"`` field or a string) or plain text (any other suffix: documents separated by blank
lines). ``jsonl:FILE``, ``parquet:FILE`` and ``hfdisk:FOLDER`` (a ``save_to_disk`` folder), each
``[:COLUMN][:MAX_LENGTH]``, read one column of a table (:mod:`kdcache.lm.sources`): documents, or
conversations rendered with the tokenizer's chat template (:mod:`kdcache.lm.chat`).

Each document is tokenized with the model's own tokenizer (its special tokens, e.g. a BOS,
included; a rendered conversation gets only the template's), ends with the EOS token when the
tokenizer has one, and is cut into consecutive pieces of at most MAX_LENGTH tokens (default 128);
with ``pack`` the documents are joined end to end (EOS between them) before the cut, so only the
last piece is short. Pieces shorter than 2 tokens are dropped. Every tenth document (row 9, 19,
...) forms the ``test`` split, the others ``train``: a document's tokens never straddle splits.

``train_on="assistant"`` (chat data only) counts only the positions whose next token the
assistant wrote, and drops the pieces that hold none; each kept piece remembers its index among
all pieces (``pieces``), where a store dumped with every position holds its rows.

A dataset's ``spec`` is canonical (``text:/absolute/FILE:MAX_LENGTH``,
``KIND:/absolute/PATH:COLUMN:MAX_LENGTH``), so a store or run that records it means the same file
from any working directory; which text a store was made from is decided by its content
fingerprint (:mod:`kdcache.lm.fingerprint`), never by the path's spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.choices import SPLITS, TRAIN_ON
from kdcache.errors import SpecError
from kdcache.lm.chat import check_conversation, render_conversation
from kdcache.lm.sources import READERS, json_lines, kind_of, read_column, read_utf8

DEFAULT_MAX_LENGTH = 128
#: MAX_LENGTH beyond any model's positions: refused before a batch of that width is allocated.
MAX_LENGTH_LIMIT = 1 << 20
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: Every HELD_OUT_EVERY-th document is held out for validation.
HELD_OUT_EVERY = 10


#: Dataset kinds whose rows are one column of a table: those :mod:`kdcache.lm.sources` reads.
TABLE_KINDS = tuple(READERS)
#: Every language-model dataset kind.
TEXT_KINDS = ("text", *TABLE_KINDS)
SPEC_FORMS = (
    "text:FILE[:MAX_LENGTH], or "
    + ", ".join(f"{kind}:PATH" for kind in TABLE_KINDS)
    + ", each [:COLUMN][:MAX_LENGTH]"
)


def is_text_spec(spec: str | None) -> bool:
    """Whether ``spec`` names a language-model dataset (any of :data:`TEXT_KINDS`)."""
    return spec is not None and spec.partition(":")[0] in TEXT_KINDS and ":" in spec


@dataclass(frozen=True)
class TextSpec:
    """A parsed dataset spec; ``column`` is a table's (None: the default one, or text files)."""

    kind: str
    path: Path
    max_length: int
    column: str | None = None


def parse_dataset_spec(spec: str) -> TextSpec:
    """``text:FILE[:MAX_LENGTH]`` or ``KIND:PATH[:COLUMN][:MAX_LENGTH]`` for a table kind. A last
    part that is an integer is the MAX_LENGTH, checked to lie in [2, :data:`MAX_LENGTH_LIMIT`];
    of a table, the part before it (after the path's last colon) is the COLUMN."""
    kind, _, rest = spec.partition(":")
    head, sep, tail = rest.rpartition(":")
    if sep and _INTEGER.fullmatch(tail):
        path, max_length = head, _max_length(spec, tail)
    else:
        path, max_length = rest, DEFAULT_MAX_LENGTH
    column = None
    if kind in TABLE_KINDS and ":" in path:
        path, _, column = path.rpartition(":")
    if kind not in TEXT_KINDS or not path or column == "":
        raise SpecError(f"malformed dataset {spec!r}; expected {SPEC_FORMS}")
    return TextSpec(kind, Path(path), max_length, column)


def parse_text_spec(spec: str) -> tuple[Path, int]:
    """FILE (or FOLDER) and MAX_LENGTH of a language-model dataset spec (see
    :func:`parse_dataset_spec`)."""
    parsed = parse_dataset_spec(spec)
    return parsed.path, parsed.max_length


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
    text = read_utf8(path)
    if path.suffix != ".jsonl":
        return [part.strip() for part in text.split("\n\n") if part.strip()]
    documents = []
    for number, record in json_lines(path, text):
        value = record.get("text") if isinstance(record, dict) else record
        if not isinstance(value, str):
            raise SpecError(
                f"{path}:{number} has no text; each line must be a string or an object with a "
                '"text" string field (other columns, e.g. messages: jsonl:FILE[:COLUMN])'
            )
        documents.append(value)
    return documents


@dataclass
class TokenDataset:
    """Token id sequences of one split, with the spec and limits they were made with.

    ``chat`` says the rows were conversations, ``packed`` that documents were joined before the
    cut. ``counted`` (with ``train_on="assistant"``) holds, per sequence, which of its L - 1
    positions count (the next token is the assistant's), and ``pieces`` each sequence's index
    among all the pieces of the split; both are None when every position counts.
    """

    spec: str
    split: str
    sequences: list[np.ndarray]
    max_length: int
    chat: bool = False
    packed: bool = False
    counted: list[np.ndarray] | None = None
    pieces: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def train_on(self) -> str:
        return "all" if self.counted is None else "assistant"

    @property
    def num_tokens(self) -> int:
        """Rows a sequence store of this dataset holds: the positions that count."""
        if self.counted is not None:
            return int(sum(int(mask.sum()) for mask in self.counted))
        return sum(len(tokens) - 1 for tokens in self.sequences)


def _rows(spec: TextSpec) -> tuple[str | None, list[Any], bool]:
    """The column read (None for a text file), its rows, and whether they are conversations."""
    if spec.kind == "text":
        return None, list(read_documents(spec.path)), False
    column = read_column(spec.kind, spec.path, spec.column)
    return column.name, column.values, kind_of(column, spec.path) == "chat"


def _cut(
    documents: list[tuple[np.ndarray, np.ndarray | None]], max_length: int, *, pack: bool
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Pieces of at most ``max_length`` tokens (and their assistant masks), each document cut
    on its own or, with ``pack``, all of them joined first; pieces under 2 tokens dropped."""
    if pack and documents:
        joined = np.concatenate([ids for ids, _ in documents])
        masks = [mask for _, mask in documents if mask is not None]
        documents = [(joined, np.concatenate(masks) if masks else None)]
    pieces = []
    for ids, mask in documents:
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            if len(piece) >= 2:
                pieces.append((piece, None if mask is None else mask[start : start + max_length]))
    return pieces


def build_text_dataset(
    spec: str, *, split: str, tokenizer: Any, train_on: str = "all", pack: bool = False
) -> TokenDataset:
    """Tokenize a language-model dataset spec with ``tokenizer`` (see the module docstring)."""
    if split not in SPLITS:
        raise SpecError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if train_on not in TRAIN_ON:
        raise SpecError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    parsed = parse_dataset_spec(spec)
    column, rows, chat = _rows(parsed)
    if train_on == "assistant" and not chat:
        raise SpecError(
            f"--train-on assistant needs chat data (a column of role/content conversations, e.g. "
            f"messages), but {spec} holds documents; use --train-on all"
        )
    held_out = split == "test"
    chosen = [
        (number, row)
        for number, row in enumerate(rows)
        if (number % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out
    ]
    eos = getattr(tokenizer, "eos_token_id", None)
    documents = []
    for number, row in chosen:
        mask: np.ndarray | None = None
        if chat:
            where = f"{parsed.path} row {number}"
            ids, mask = render_conversation(
                tokenizer,
                check_conversation(row, where),
                where,
                locate_assistant=train_on == "assistant",
            )
        else:
            ids = np.asarray(tokenizer(row)["input_ids"], dtype=np.int64)
        if eos is not None and (len(ids) == 0 or ids[-1] != eos):
            ids = np.append(ids, np.int64(eos))
            mask = None if mask is None else np.append(mask, False)
        documents.append((ids.astype(np.int64), mask))
    pieces = _cut(documents, parsed.max_length, pack=pack)
    if not pieces and chosen:
        raise SpecError(
            f"{spec} ({split}): each of its {len(chosen)} documents is shorter than 2 tokens, so "
            "no token has a next one to learn; give documents of at least 2 tokens"
        )
    if not pieces:
        raise SpecError(
            f"{spec} has no {split} document among its {len(rows)}; the test split is every "
            f"{HELD_OUT_EVERY}th document, so give at least {HELD_OUT_EVERY}"
        )
    counted, kept = None, None
    if train_on == "assistant":
        counted_all = [mask[1:] for _, mask in pieces]  # type: ignore[index]
        kept = np.flatnonzero([bool(mask.any()) for mask in counted_all])
        if kept.size == 0:
            raise SpecError(
                f"{spec} ({split}): no assistant message in its {len(chosen)} conversations, so "
                "--train-on assistant has nothing to learn; use --train-on all"
            )
        pieces = [pieces[i] for i in kept]
        counted = [counted_all[i] for i in kept]
    return TokenDataset(
        spec=_canonical(parsed, column),
        split=split,
        sequences=[ids for ids, _ in pieces],
        max_length=parsed.max_length,
        chat=chat,
        packed=pack,
        counted=counted,
        pieces=kept,
    )


def _canonical(spec: TextSpec, column: str | None) -> str:
    if spec.kind == "text":
        return canonical_text_spec(spec.path, spec.max_length)
    return f"{spec.kind}:{spec.path.resolve()}:{column}:{spec.max_length}"


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
        following = tokens[1:]
        if dataset.counted is not None:
            counted = torch.from_numpy(dataset.counted[int(sample)])
            following = following.masked_fill(~counted, -100)
        targets[row, : len(tokens) - 1] = following
    indices = torch.as_tensor(np.asarray(samples, dtype=np.int64))
    return TokenBatch(ids, attention, targets, targets != -100, indices)

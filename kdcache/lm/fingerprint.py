"""What ties a token-level store to its tokenizer and its text, and how a mismatch is named.

A sequence store's dataset record holds::

    {"tokenizer": {"vocab_size", "vocab_sha256", "special_tokens", "chat_template_sha256"},
     "tokens": {"num_samples", "num_tokens", "token_ids_sha256"},
     "max_length": M,
     "data": {"format": "chat", "packed": true, "train_on": "assistant", "loss_mask_sha256"}}

``data`` says how the rows became sequences, and holds only what differs from plain documents
each padded on its own with every position counted (so records written before it existed, and
plain text now, agree): conversations rendered with the chat template (whose hash is the
tokenizer's), documents packed to the max length, and the loss on assistant tokens only (with
the hash of which positions count).

The vocabulary hash covers every (token, id) pair, added tokens included; the token-id hash
covers every sample's ids and its length, so a different tokenizer (other merges, other
normalisation) or different text is caught even when the vocabularies agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from kdcache.lm.text import TokenDataset


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    pairs = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    special = {
        name: str(value)
        for name, value in sorted(getattr(tokenizer, "special_tokens_map", {}).items())
    }
    template = getattr(tokenizer, "chat_template", None)
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256(json.dumps(pairs, ensure_ascii=False)),
        "special_tokens": special,
        "chat_template_sha256": None if not template else _sha256(json.dumps(template)),
    }


def tokens_fingerprint(dataset: TokenDataset) -> dict[str, Any]:
    digest = hashlib.sha256()
    for tokens in dataset.sequences:
        digest.update(np.int64(len(tokens)).tobytes())
        digest.update(np.ascontiguousarray(tokens, dtype="<i8").tobytes())
    return {
        "num_samples": len(dataset),
        "num_tokens": dataset.num_tokens,
        "token_ids_sha256": digest.hexdigest(),
    }


def data_fingerprint(dataset: TokenDataset) -> dict[str, Any]:
    """How ``dataset``'s sequences were made, as far as it differs from the plain default."""
    record: dict[str, Any] = {}
    if dataset.chat:
        record["format"] = "chat"
    if dataset.packed:
        record["packed"] = True
    if dataset.counted is not None:
        digest = hashlib.sha256()
        for mask in dataset.counted:
            digest.update(np.int64(len(mask)).tobytes())
            digest.update(np.packbits(mask).tobytes())
        record["train_on"] = "assistant"
        record["loss_mask_sha256"] = digest.hexdigest()
    return record


def lm_fingerprint(tokenizer: Any, dataset: TokenDataset) -> dict[str, Any]:
    fingerprint = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokens": tokens_fingerprint(dataset),
        "max_length": dataset.max_length,
    }
    data = data_fingerprint(dataset)
    return {**fingerprint, "data": data} if data else fingerprint


def describe_format(data: dict[str, Any]) -> str:
    return "conversations" if data.get("format") == "chat" else "documents"


def describe_packing(data: dict[str, Any]) -> str:
    return "packed (--pack)" if data.get("packed") else "one document per sequence (no --pack)"


def describe_train_on(data: dict[str, Any]) -> str:
    return "assistant tokens" if data.get("train_on") == "assistant" else "all tokens"


def compare_data(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The parts of two ``data`` records that differ, each named (empty when they agree)."""
    differences = []
    for name, describe in (
        ("data", describe_format),
        ("packing", describe_packing),
        ("loss on", describe_train_on),
    ):
        if describe(expected) != describe(actual):
            differences.append(f"{name}: {describe(expected)} vs {describe(actual)}")
    return differences


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else repr(value)


def compare_tokenizers(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The parts of two tokenizer fingerprints that differ, each named (empty when they agree)."""
    differences = []
    if expected.get("vocab_size") != actual.get("vocab_size"):
        differences.append(
            f"vocabulary size {expected.get('vocab_size')} vs {actual.get('vocab_size')}"
        )
    elif expected.get("vocab_sha256") != actual.get("vocab_sha256"):
        differences.append(
            f"vocabulary (sha256 {_short(expected.get('vocab_sha256'))} vs "
            f"{_short(actual.get('vocab_sha256'))})"
        )
    old, new = expected.get("special_tokens", {}), actual.get("special_tokens", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            differences.append(f"special token {name} {old.get(name)!r} vs {new.get(name)!r}")
    if expected.get("chat_template_sha256") != actual.get("chat_template_sha256"):
        differences.append(
            f"chat template (sha256 {_short(expected.get('chat_template_sha256'))} vs "
            f"{_short(actual.get('chat_template_sha256'))})"
        )
    return differences


def compare_lm_fingerprints(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every differing part of a store's fingerprint (expected) and a dataset's (actual)."""
    differences = [
        f"tokenizer {part}"
        for part in compare_tokenizers(expected.get("tokenizer", {}), actual.get("tokenizer", {}))
    ]
    if expected.get("max_length") != actual.get("max_length"):
        differences.append(f"max length {expected.get('max_length')} vs {actual.get('max_length')}")
    differences.extend(compare_data(expected.get("data", {}), actual.get("data", {})))
    old, new = expected.get("tokens", {}), actual.get("tokens", {})
    for key in ("num_samples", "num_tokens"):
        if old.get(key) != new.get(key):
            differences.append(f"{key.replace('_', ' ')} {old.get(key)} vs {new.get(key)}")
    if not differences and old.get("token_ids_sha256") != new.get("token_ids_sha256"):
        differences.append(
            f"token ids (sha256 {_short(old.get('token_ids_sha256'))} vs "
            f"{_short(new.get('token_ids_sha256'))})"
        )
    old_mask = expected.get("data", {}).get("loss_mask_sha256")
    new_mask = actual.get("data", {}).get("loss_mask_sha256")
    if not differences and old_mask != new_mask:
        differences.append(
            f"assistant tokens (loss mask sha256 {_short(old_mask)} vs {_short(new_mask)})"
        )
    return differences

"""Tiny language models for the tests: a BPE tokenizer trained here, random GPT-2s.

Each test module imports `lm_files_fixture` from here; this is not a conftest.py, so that
`from conftest import run_cli` keeps meaning tests/conftest.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the [llm] extra is not installed")

_BUILT: dict = {}
WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "a",
    "mat",
    "log",
    "big",
    "small",
    "red",
    "blue",
    "and",
    "then",
    "away",
    "home",
]


def write_corpus(path: Path, *, documents: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as stream:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            stream.write(json.dumps({"text": text}) + "\n")
    return path


def train_tokenizer(texts: list[str], *, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def write_model(folder: Path, tokenizer, *, layers: int, width: int, weights: bool, seed: int = 0):
    """A save_pretrained folder; without ``weights`` only the config (random at load time)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if weights:
        GPT2LMHeadModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", name="lm_files")
def lm_files_fixture(tmp_path_factory):
    """corpus.jsonl, teacher/ (random weights), student/ (config only) and other_tok/ (a student
    with a different tokenizer). Built once per session: every module that imports the fixture
    gets its own copy of it, hence the cache."""
    if _BUILT:
        return _BUILT
    root = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(root / "corpus.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = train_tokenizer(texts)
    other = train_tokenizer(texts[:10], vocab_size=280)
    _BUILT.update(
        {
            "root": root,
            "corpus": corpus,
            "teacher": write_model(root / "teacher", tokenizer, layers=2, width=32, weights=True),
            "student": write_model(root / "student", tokenizer, layers=1, width=16, weights=False),
            "other_tok": write_model(root / "other_tok", other, layers=1, width=16, weights=False),
        }
    )
    return _BUILT

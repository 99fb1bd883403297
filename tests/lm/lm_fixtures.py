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


#: A chat template in the usual shape: each turn rendered in order, the reply after the
#: generation prompt and before the end-of-turn marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CHAT: dict = {}


def chat_rows(*, conversations: int = 30, seed: int = 1) -> list[dict]:
    """Rows with a ``messages`` column: a system turn now and then, one or two exchanges."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = []
    for number in range(conversations):
        messages = [{"role": "system", "content": words(2, 4)}] if number % 3 == 0 else []
        for _ in range(1 + number % 2):
            messages.append({"role": "user", "content": words(2, 8)})
            messages.append({"role": "assistant", "content": words(1, 8)})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="session", name="chat_files")
def chat_files_fixture(lm_files):
    """chat.jsonl (a messages column), and teacher/ and student/ whose tokenizer (lm_files') has
    CHAT_TEMPLATE; other_template/ is a student whose template differs."""
    if _CHAT:
        return _CHAT
    from transformers import AutoTokenizer

    root = lm_files["root"] / "chat"
    root.mkdir()
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(row) + "\n" for row in chat_rows()))
    tokenizer = AutoTokenizer.from_pretrained(lm_files["teacher"])
    tokenizer.chat_template = CHAT_TEMPLATE
    other = AutoTokenizer.from_pretrained(lm_files["teacher"])
    other.chat_template = CHAT_TEMPLATE.replace("<|end|>", "<|stop|>")
    _CHAT.update(
        {
            "root": root,
            "chat": chat,
            "tokenizer": tokenizer,
            "teacher": write_model(root / "teacher", tokenizer, layers=2, width=32, weights=True),
            "student": write_model(root / "student", tokenizer, layers=1, width=16, weights=False),
            "other_template": write_model(
                root / "other_template", other, layers=1, width=16, weights=False
            ),
        }
    )
    return _CHAT

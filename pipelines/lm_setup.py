"""Everything the language-model example needs, built locally from what ships with Python.

Writes into OUT:
- ``topics.jsonl``: the standard library's ``pydoc_data.topics`` (the ~460 KB of English behind
  ``help("TOPIC")``), as documents of whole paragraphs of about DOC_CHARS characters each (never
  across two topics), one per line, so that the held-out tenth is spread over many topics;
- ``tokenizer/``: a byte-level BPE tokenizer of VOCAB tokens trained on that text with
  ``tokenizers``;
- ``teacher-init/`` and ``student-init/``: GPT-2 configs (no weights, so each run draws its own
  under its seed) with the tokenizer beside them, usable as ``hf:OUT/teacher-init``.

    python pipelines/lm_setup.py OUT [--vocab 2048] [--teacher 4x128] [--student 2x64] [--every 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from pydoc_data.topics import topics


def documents(doc_chars: int) -> list[str]:
    """Each topic's paragraphs, packed in order into documents of at least ``doc_chars``."""
    out = []
    for name in sorted(topics):
        current: list[str] = []
        for paragraph in topics[name].split("\n\n"):
            current.append(paragraph)
            if sum(map(len, current)) >= doc_chars:
                out.append("\n\n".join(current))
                current = []
        if current:
            out.append("\n\n".join(current))
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
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


def write_config(folder: Path, tokenizer, shape: str, max_length: int) -> None:
    from transformers import GPT2Config

    layers, width = (int(x) for x in shape.split("x"))
    GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 32),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--teacher", default="4x128", help="teacher LAYERSxWIDTH")
    parser.add_argument("--student", default="2x64", help="student LAYERSxWIDTH")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--doc-chars", type=int, default=1500, help="characters per document")
    parser.add_argument(
        "--every", type=int, default=1, help="keep every EVERY-th document (a smaller corpus)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = documents(args.doc_chars)[:: args.every]
    with (args.out / "topics.jsonl").open("w") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer(texts, args.vocab)
    tokenizer.save_pretrained(args.out / "tokenizer")
    write_config(args.out / "teacher-init", tokenizer, args.teacher, args.max_length)
    write_config(args.out / "student-init", tokenizer, args.student, args.max_length)
    print(f"{len(texts)} documents, vocabulary {len(tokenizer)} -> {args.out}")


if __name__ == "__main__":
    main()

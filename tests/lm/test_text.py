"""text:FILE datasets, LM specs and the fingerprint that names what differs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache.errors import DatasetNotFoundError, SpecError
from kdcache.lm.fingerprint import compare_lm_fingerprints, lm_fingerprint
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset, collate, parse_text_spec


def test_spec_parsing_and_errors(tmp_path):
    assert parse_text_spec("text:a/b.jsonl") == (tmp_path.__class__("a/b.jsonl"), 128)
    assert parse_text_spec("text:a:b.txt:32")[1] == 32
    with pytest.raises(SpecError, match="MAX_LENGTH must be >= 2"):
        parse_text_spec("text:x.txt:1")
    teacher = None
    with pytest.raises(DatasetNotFoundError, match="no text file"):
        build_text_dataset(f"text:{tmp_path / 'missing.txt'}", split="train", tokenizer=teacher)


def test_documents_split_into_pieces_and_splits(lm_files):
    lm = load_causal_lm(f"hf:{lm_files['teacher']}")
    spec = f"text:{lm_files['corpus']}:8"
    train = build_text_dataset(spec, split="train", tokenizer=lm.tokenizer)
    test = build_text_dataset(spec, split="test", tokenizer=lm.tokenizer)
    assert all(2 <= len(tokens) <= 8 for tokens in train.sequences + test.sequences)
    # documents 9, 19 and 29 are held out, cut into pieces that lose no text
    documents = [json.loads(line)["text"] for line in lm_files["corpus"].read_text().splitlines()]
    decoded = lm.tokenizer.decode(np.concatenate(test.sequences), skip_special_tokens=True)
    assert decoded == "".join(documents[9::10])
    batch = collate(train, [0, 1])
    n = len(train.sequences[0])
    assert batch.input_ids.shape == (2, 8)
    assert batch.mask[0].sum() == n - 1
    assert batch.targets[0, n - 2] == train.sequences[0][-1]
    assert not batch.mask[:, -1].any()


def test_plain_text_documents_are_paragraphs(tmp_path, lm_files):
    lm = load_causal_lm(f"hf:{lm_files['teacher']}")
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"the cat sat {i}" for i in range(10)) + "\n")
    test = build_text_dataset(f"text:{path}", split="test", tokenizer=lm.tokenizer)
    assert len(test) == 1
    assert lm.tokenizer.decode(test.sequences[0][:-1]) == "the cat sat 9"


def test_fingerprint_names_the_differing_part(lm_files):
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    other = load_causal_lm(f"hf:{lm_files['other_tok']}")
    spec = f"text:{lm_files['corpus']}:16"
    data = build_text_dataset(spec, split="train", tokenizer=teacher.tokenizer)
    base = lm_fingerprint(teacher.tokenizer, data)
    assert compare_lm_fingerprints(base, lm_fingerprint(teacher.tokenizer, data)) == []
    shorter = build_text_dataset(
        f"text:{lm_files['corpus']}:12", split="train", tokenizer=teacher.tokenizer
    )
    assert any(
        "max length 16 vs 12" in d
        for d in compare_lm_fingerprints(base, lm_fingerprint(teacher.tokenizer, shorter))
    )
    other_data = build_text_dataset(spec, split="train", tokenizer=other.tokenizer)
    diffs = compare_lm_fingerprints(base, lm_fingerprint(other.tokenizer, other_data))
    assert diffs[0].startswith("tokenizer vocabulary size")
    teacher.tokenizer.chat_template = "{{ messages }}"
    diffs = compare_lm_fingerprints(base, lm_fingerprint(teacher.tokenizer, data))
    assert diffs == [diffs[0]]
    assert diffs[0].startswith("tokenizer chat template")
    teacher.tokenizer.chat_template = None
    edited = type(data)(
        spec=spec, split="train", sequences=[s.copy() for s in data.sequences], max_length=16
    )
    edited.sequences[3][1] = (edited.sequences[3][1] + 1) % 50
    diffs = compare_lm_fingerprints(base, lm_fingerprint(teacher.tokenizer, edited))
    assert len(diffs) == 1
    assert diffs[0].startswith("token ids")
    assert np.array_equal(
        data.sequences[3],
        build_text_dataset(spec, split="train", tokenizer=teacher.tokenizer).sequences[3],
    )


def test_lm_specs_are_refused_clearly(tmp_path):
    with pytest.raises(SpecError, match="not a save_pretrained folder"):
        load_causal_lm(f"hf:{tmp_path}")
    with pytest.raises(SpecError, match="unknown language-model spec"):
        load_causal_lm("gpt2")

"""text:FILE datasets, LM specs and the fingerprint that names what differs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache.errors import DatasetNotFoundError, SpecError
from kdcache.lm.fingerprint import compare_lm_fingerprints, lm_fingerprint
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import MAX_LENGTH_LIMIT, build_text_dataset, collate, parse_text_spec


def test_spec_parsing_and_errors(tmp_path):
    assert parse_text_spec("text:a/b.jsonl") == (tmp_path.__class__("a/b.jsonl"), 128)
    assert parse_text_spec("text:a:b.txt:32")[1] == 32
    assert parse_text_spec("text:a:16:32") == (tmp_path.__class__("a:16"), 32)
    for absurd in ("1", "0", "-5", "+1", str(10**12), str(MAX_LENGTH_LIMIT + 1), "9" * 5000):
        with pytest.raises(SpecError, match=r"MAX_LENGTH must be from 2 to 1,048,576") as refused:
            parse_text_spec(f"text:x.txt:{absurd}")
        assert "\n" not in str(refused.value)
        assert len(str(refused.value)) < 300
    assert parse_text_spec(f"text:x.txt:{MAX_LENGTH_LIMIT}")[1] == MAX_LENGTH_LIMIT
    teacher = None
    with pytest.raises(DatasetNotFoundError, match="no text file"):
        build_text_dataset(f"text:{tmp_path / 'missing.txt'}", split="train", tokenizer=teacher)


@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        (b'{"text": "the cat"}\n\x00\x01\x02\n', "NUL byte at offset 20, so it is binary"),
        (b"the cat\n\nsat \xff\xfe on", r"not UTF-8 text \(byte 0xff at offset 13\)"),
        ("the caf\u00e9".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 7\)"),
    ],
)
def test_binary_or_undecodable_text_is_refused_in_one_line(tmp_path, content, refusal):
    for name in ("data.jsonl", "data.txt"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SpecError, match=refusal) as refused:
            build_text_dataset(f"text:{tmp_path / name}", split="train", tokenizer=None)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("line", "refusal"),
    [
        ('{"text": "the cat', "is not valid JSON"),
        ("[" * 100_000, r"cannot read \(nested too deeply\)"),
        ("1" * 5000, r"cannot read \(Exceeds the limit"),
        ('{"text": 5}', "has no text"),
    ],
)
def test_unreadable_json_lines_are_refused_in_one_line(tmp_path, line, refusal):
    path = tmp_path / "data.jsonl"
    path.write_text(f'"the cat"\n{line}\n')
    with pytest.raises(SpecError, match=rf"data\.jsonl:2 .*{refusal}") as refused:
        build_text_dataset(f"text:{path}", split="train", tokenizer=None)
    assert "\n" not in str(refused.value)


def test_the_spec_is_recorded_resolved_whatever_the_spelling(tmp_path, lm_files, monkeypatch):
    lm = load_causal_lm(f"hf:{lm_files['teacher']}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.jsonl").write_bytes(lm_files["corpus"].read_bytes())
    monkeypatch.chdir(tmp_path / "data")
    canonical = f"text:{tmp_path.resolve() / 'data' / 'corpus.jsonl'}"
    relative = build_text_dataset("text:corpus.jsonl:16", split="train", tokenizer=lm.tokenizer)
    assert relative.spec == f"{canonical}:16"
    other = build_text_dataset("text:../data/./corpus.jsonl", split="test", tokenizer=lm.tokenizer)
    assert other.spec == f"{canonical}:128"
    again = build_text_dataset(relative.spec, split="train", tokenizer=lm.tokenizer)
    assert again.spec == relative.spec
    assert lm_fingerprint(lm.tokenizer, again) == lm_fingerprint(lm.tokenizer, relative)


def test_one_token_documents_gain_the_eos_and_shorter_ones_are_refused(tmp_path, lm_files):
    lm = load_causal_lm(f"hf:{lm_files['teacher']}")
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": "cat"}) + "\n" for _ in range(12)))
    data = build_text_dataset(f"text:{one}:16", split="train", tokenizer=lm.tokenizer)
    eos = lm.tokenizer.eos_token_id
    assert [tokens.tolist() for tokens in data.sequences] == [[data.sequences[0][0], eos]] * 11
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(12)))
    with pytest.raises(SpecError, match="each of its 11 documents is shorter than 2 tokens"):
        build_text_dataset(f"text:{empty}:16", split="train", tokenizer=lm.tokenizer)
    few = tmp_path / "few.jsonl"
    few.write_text('"the cat sat"\n' * 3)
    with pytest.raises(SpecError, match="has no test document among its 3"):
        build_text_dataset(f"text:{few}:16", split="test", tokenizer=lm.tokenizer)


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

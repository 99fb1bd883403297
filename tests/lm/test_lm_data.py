"""The data people distill on: jsonl/parquet/hfdisk tables, chat with --train-on, --pack."""

from __future__ import annotations

import json
import sys
from typing import Any

import lm_teachers
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from lm_fixtures import (  # noqa: F401  (provides the lm_files and chat_files fixtures)
    chat_files_fixture,
    chat_rows,
    lm_files_fixture,
)
from safetensors.torch import load_file

from kdcache import DistillConfig, distill
from kdcache.config import DumpConfig
from kdcache.errors import ConfigError, SpecError
from kdcache.lm.dump import dump_lm
from kdcache.lm.fingerprint import compare_lm_fingerprints, lm_fingerprint
from kdcache.lm.sources import READERS
from kdcache.lm.text import (
    HELD_OUT_EVERY,
    build_text_dataset,
    collate,
    is_text_spec,
    parse_dataset_spec,
)
from kdcache.store.sequence import open_sequence_store

#: Short enough that some pieces of a conversation hold no assistant token.
CHAT_LENGTH = 16


@pytest.fixture(scope="module", name="tokenizer")
def tokenizer_fixture(lm_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_files["teacher"])


def test_table_files_give_the_documents_a_text_file_gives(tmp_path, lm_files, tokenizer):
    import datasets
    import pyarrow
    import pyarrow.parquet

    corpus = lm_files["corpus"]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    table = pyarrow.table({"id": list(range(len(texts))), "text": texts})
    pyarrow.parquet.write_table(table, tmp_path / "corpus.parquet")
    saved = datasets.Dataset.from_dict({"text": texts})
    saved.save_to_disk(str(tmp_path / "saved"))
    reference = build_text_dataset(f"text:{corpus}:16", split="train", tokenizer=tokenizer)
    specs = (
        f"jsonl:{corpus}:16",
        f"jsonl:{body}:body:16",
        f"parquet:{tmp_path / 'corpus.parquet'}:16",
        f"hfdisk:{tmp_path / 'saved'}:16",
    )
    assert {spec.partition(":")[0] for spec in specs} == set(READERS)  # every reader is read
    for spec in specs:
        assert is_text_spec(spec), spec
        data = build_text_dataset(spec, split="train", tokenizer=tokenizer)
        assert len(data) == len(reference), spec
        assert all(map(np.array_equal, data.sequences, reference.sequences)), spec
        fingerprint = lm_fingerprint(tokenizer, data)
        assert fingerprint == lm_fingerprint(tokenizer, reference)  # no "data": plain documents
    assert data.spec == f"hfdisk:{(tmp_path / 'saved').resolve()}:text:16"
    assert parse_dataset_spec(f"jsonl:{body}:body").column == "body"
    assert parse_dataset_spec("jsonl:a:b.jsonl:text:8").path.name == "a:b.jsonl"

    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "mixed.jsonl").write_text('{"text": "the cat"}\n{"text": ["a"]}\n')
    refusals = {
        f"jsonl:{body}": "neither a 'text' nor a 'messages' column",
        f"parquet:{tmp_path / 'corpus.parquet'}:body": "has no column 'body'",
        f"hfdisk:{tmp_path / 'dict'}": "DatasetDict of splits train, test; pass one of them",
        f"jsonl:{tmp_path / 'mixed.jsonl'}": "row 1 of column 'text' holds list",
        f"parquet:{body}": "is not a Parquet file",
        "jsonl:": "malformed dataset",
        f"jsonl:{corpus}:": "malformed dataset",
    }
    for spec, refusal in refusals.items():
        with pytest.raises(SpecError, match=refusal) as refused:
            build_text_dataset(spec, split="train", tokenizer=tokenizer)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("kind", "package"), [("parquet", "pyarrow"), ("hfdisk", "datasets")], ids=["pq", "hf"]
)
def test_a_missing_table_library_is_one_line_naming_the_extra(monkeypatch, kind, package):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=rf'need {package}.*pip install -e "\.\[llm-data\]"'):
        build_text_dataset(f"{kind}:somewhere", split="train", tokenizer=None)


def test_the_assistant_tokens_are_exactly_the_replies(chat_files):
    tokenizer, chat = chat_files["tokenizer"], chat_files["chat"]
    spec = f"jsonl:{chat}:1024"  # long enough that no conversation is cut
    everything = build_text_dataset(spec, split="train", tokenizer=tokenizer)
    replies = build_text_dataset(spec, split="train", tokenizer=tokenizer, train_on="assistant")
    conversations = [
        row["messages"]
        for number, row in enumerate(chat_rows())
        if number % HELD_OUT_EVERY != HELD_OUT_EVERY - 1
    ]
    assert everything.chat
    assert everything.train_on == "all"
    assert replies.train_on == "assistant"
    assert len(replies) == len(everything) == len(conversations)
    batch = collate(replies, list(range(len(replies))))
    full = collate(everything, list(range(len(everything))))
    assert torch.equal(batch.input_ids, full.input_ids)  # the same tokens, fewer counted
    assert full.mask.sum() > batch.mask.sum() == replies.num_tokens
    for row, messages in enumerate(conversations):
        written = tokenizer.decode(batch.targets[row][batch.mask[row]].tolist())
        expected = "".join(
            f"{message['content']}<|end|>\n"
            for message in messages
            if message["role"] == "assistant"
        )
        assert written == expected
        rendered = tokenizer.apply_chat_template(messages, tokenize=False) + "<|endoftext|>"
        assert tokenizer.decode(everything.sequences[row].tolist()) == rendered
    with pytest.raises(SpecError, match="--train-on assistant needs chat data"):
        build_text_dataset(
            f"jsonl:{chat_files['root'].parent / 'corpus.jsonl'}",
            split="train",
            tokenizer=tokenizer,
            train_on="assistant",
        )


def test_packing_joins_the_documents_and_round_trips_through_a_store(tmp_path, lm_files, tokenizer):
    spec = f"text:{lm_files['corpus']}:16"
    plain = build_text_dataset(spec, split="train", tokenizer=tokenizer)
    packed = build_text_dataset(spec, split="train", tokenizer=tokenizer, pack=True)
    texts = [json.loads(line)["text"] for line in lm_files["corpus"].read_text().splitlines()]
    stream = np.concatenate(
        [
            [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
            for number, text in enumerate(texts)
            if number % HELD_OUT_EVERY != HELD_OUT_EVERY - 1
        ]
    )
    joined = np.concatenate(packed.sequences)
    assert np.array_equal(joined, stream[: len(joined)])
    assert len(stream) - len(joined) <= 1  # a last piece of one token has nothing to learn
    assert {len(tokens) for tokens in packed.sequences[:-1]} == {16}
    assert len(packed) < len(plain)
    assert "data" not in lm_fingerprint(tokenizer, plain)  # as every store before --pack
    assert compare_lm_fingerprints(
        lm_fingerprint(tokenizer, plain), lm_fingerprint(tokenizer, packed)
    )[0].startswith("packing: one document per sequence (no --pack) vs packed (--pack)")

    out = tmp_path / "packed.zarr"
    config = DumpConfig(
        teacher=f"hf:{lm_files['teacher']}", dataset=spec, pack=True, batch_size=16, out=str(out)
    )
    assert dump_lm(config).num_tokens == packed.num_tokens
    store = open_sequence_store(out)
    assert store.num_sequences == len(packed)
    assert all(np.array_equal(store.tokens(i), packed.sequences[i]) for i in range(len(packed)))
    assert store.metadata.dataset["fingerprint"]["data"] == {"packed": True}


@pytest.fixture(scope="module", name="chat_stores")
def chat_stores_fixture(tmp_path_factory, chat_files):
    """float32 stores of the chat teacher: every position, and the assistant's rows only."""
    root = tmp_path_factory.mktemp("chat-stores")
    stores = {}
    for train_on in ("all", "assistant"):
        stores[train_on] = str(root / f"{train_on}.zarr")
        dump_lm(
            DumpConfig(
                teacher=f"hf:{chat_files['teacher']}",
                dataset=f"jsonl:{chat_files['chat']}:{CHAT_LENGTH}",
                train_on=train_on,
                encoding="float32",
                batch_size=16,
                out=stores[train_on],
            )
        )
    return stores


def test_assistant_rows_align_whether_the_dump_skipped_the_others_or_not(
    tmp_path, chat_files, chat_stores
):
    tokenizer = chat_files["tokenizer"]
    spec = f"jsonl:{chat_files['chat']}:{CHAT_LENGTH}"
    replies = build_text_dataset(spec, split="train", tokenizer=tokenizer, train_on="assistant")
    everything = build_text_dataset(spec, split="train", tokenizer=tokenizer)
    assert replies.pieces is not None
    assert replies.counted is not None
    assert len(replies) < len(everything)  # some pieces held no reply: dropped, indices remapped
    skipped, full = (open_sequence_store(chat_stores[key]) for key in ("assistant", "all"))
    assert not skipped.every_position
    assert full.every_position
    assert skipped.num_sequences == len(replies)
    assert full.num_sequences == len(everything)
    assert skipped.num_tokens == replies.num_tokens < full.num_tokens
    for sample, piece in enumerate(replies.pieces):
        positions = np.flatnonzero(replies.counted[sample])
        rows = full.read_rows(full.offsets[piece] + positions)
        stored = skipped.read([sample])
        assert isinstance(rows, torch.Tensor)
        assert isinstance(stored, torch.Tensor)
        assert torch.equal(stored, rows)
    with pytest.raises(Exception, match="not all stored"):
        skipped.tokens(0)

    common: dict[str, Any] = dict(
        student=f"hf:{chat_files['student']}", epochs=1, batch_size=8, temperature=2.0
    )
    finals = {}
    for name, source in {
        "skipped": dict(cache=chat_stores["assistant"]),
        "full": dict(cache=chat_stores["all"], train_on="assistant"),
        "online": dict(teacher=f"hf:{chat_files['teacher']}", dataset=spec, train_on="assistant"),
    }.items():
        out = tmp_path / name
        finals[name] = distill(DistillConfig(**common, **source, out=str(out))).final
        resolved = json.loads((out / "config.json").read_text())["resolved"]
        assert (resolved["train_on"], resolved["pack"]) == ("assistant", False)
    weights = {name: load_file(tmp_path / name / "last" / "model.safetensors") for name in finals}
    assert finals["skipped"] == finals["full"] == finals["online"]
    for name in ("full", "online"):
        assert all(torch.equal(weights["skipped"][k], weights[name][k]) for k in weights[name])


def test_an_interrupted_assistant_only_dump_resumes_to_the_same_rows(
    tmp_path, chat_files, chat_stores
):
    out = str(tmp_path / "resumed.zarr")
    lm_teachers.FOLDER = str(chat_files["teacher"])
    lm_teachers.FAIL_AFTER = 2
    config: dict[str, Any] = dict(
        teacher="lm_teachers:flaky",
        dataset=f"jsonl:{chat_files['chat']}:{CHAT_LENGTH}",
        train_on="assistant",
        encoding="float32",
        batch_size=16,  # as the fixture's store: the same batches, so the same bits
        chunk_rows=16,
        out=out,
    )
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**config))
    finally:
        lm_teachers.FAIL_AFTER = None
    resumed = dump_lm(DumpConfig(**config, resume=True))
    assert 0 < resumed.rows_computed < resumed.num_tokens
    store, reference = open_sequence_store(out), open_sequence_store(chat_stores["assistant"])
    assert not store.every_position
    assert np.array_equal(store.offsets, reference.offsets)
    samples = np.arange(store.num_sequences)
    assert torch.equal(store.read(samples), reference.read(samples))  # type: ignore[arg-type]


def test_the_command_line_refuses_another_template_packing_or_masking(
    tmp_path, chat_files, chat_stores
):
    store = chat_stores["assistant"]
    common = ["distill", "--cache", store, "--epochs", "1", "--temperature", "1"]
    student = ["--student", f"hf:{chat_files['student']}"]
    refusals = [
        (["--train-on", "all", *student], ["assistant tokens only", "--train-on all"]),
        (["--pack", *student], ["without --pack", "drop --pack"]),
        (
            ["--student", f"hf:{chat_files['other_template']}"],
            ["another tokenizer", "chat template"],
        ),
    ]
    for options, fragments in refusals:
        refused = run_cli(*common, *options, "--out", str(tmp_path / "run"), check=False)
        assert_one_line_error(refused, *fragments)
        assert not (tmp_path / "run").exists()
    dumped = tmp_path / "packed.zarr"
    run_cli(
        "dump-teacher",
        "--teacher",
        f"hf:{chat_files['teacher']}",
        "--dataset",
        f"jsonl:{chat_files['chat']}:{CHAT_LENGTH}",
        "--train-on",
        "assistant",
        "--pack",
        "--out",
        str(dumped),
    )
    data = open_sequence_store(dumped).metadata.dataset["fingerprint"]["data"]
    assert {key: data[key] for key in ("format", "packed", "train_on")} == {
        "format": "chat",
        "packed": True,
        "train_on": "assistant",
    }
    run_cli(*common[:2], str(dumped), *common[3:], *student, "--out", str(tmp_path / "packed"))
    recorded = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert (recorded["train_on"], recorded["pack"]) == (None, False)  # as given: the store's
    assert (recorded["resolved"]["train_on"], recorded["resolved"]["pack"]) == ("assistant", True)

"""Language models at real scale on tiny models: bf16 teachers kept in bf16, heads padded beyond
the tokenizer, a 262,144-token vocabulary end to end, and sparse stores of earlier releases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_teachers
import numpy as np
import pytest
import torch
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from narrowing import dense
from older_stores import as_previous_release, with_plain_arrays

from kdcache import DistillConfig, distill
from kdcache.config import DumpConfig
from kdcache.errors import StoreMismatchError
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset, collate
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sparse import SparseLogits
from kdcache.store.sequence import open_sequence_store
from kdcache.store.tools.verify import verify_store
from kdcache.train.tokens import fitted_to


def gpt2(folder: Path, tokenizer: Any, *, vocab: int, width: int, weights: bool, dtype=None):
    """A save_pretrained GPT-2 whose head has ``vocab`` rows (padded when above the tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=width,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    if weights:
        model = GPT2LMHeadModel(config)
        (model.to(dtype) if dtype is not None else model).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(name="tokenizer")
def tokenizer_fixture(lm_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_files["teacher"], local_files_only=True)


def test_a_bf16_teacher_with_a_padded_head_stays_bf16_and_stores_its_true_vocabulary(
    tmp_path, lm_files, tokenizer
):
    vocab = len(tokenizer)
    folder = gpt2(
        tmp_path / "t", tokenizer, vocab=vocab + 24, width=16, weights=True, dtype=torch.bfloat16
    )
    teacher = load_causal_lm(f"hf:{folder}")
    assert teacher.dtype == "bfloat16"
    assert teacher.head_size == vocab + 24
    assert teacher.vocab_size == vocab
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}  # no float32 copy

    spec = f"text:{lm_files['corpus']}:16"
    out = tmp_path / "t.zarr"
    dump_lm(DumpConfig(teacher=f"hf:{folder}", dataset=spec, out=str(out), encoding="float32"))
    store = open_sequence_store(out)
    assert store.vocab_size == vocab
    assert store.metadata.teacher["dtype"] == "bfloat16"
    assert store.metadata.teacher["head_size"] == vocab + 24
    dataset = build_text_dataset(spec, split="train", tokenizer=teacher.tokenizer)
    batch = collate(dataset, [3], pad_id=tokenizer.eos_token_id)
    with torch.no_grad():
        full = teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    want = full.logits.float()[batch.mask][:, :vocab]  # the padded columns dropped
    assert torch.equal(dense(store.read([3])), want)

    # A student with the same tokenizer but another padding distills from the first V columns.
    student = gpt2(tmp_path / "s", tokenizer, vocab=vocab + 7, width=8, weights=False)
    run = distill(
        DistillConfig(
            student=f"hf:{student}",
            cache=str(out),
            epochs=1,
            batch_size=8,
            out=str(tmp_path / "run"),
        )
    )
    assert np.isfinite(run.final)


def test_a_live_padded_teacher_is_cut_too_and_a_narrower_student_is_refused(
    tmp_path, lm_files, tokenizer
):
    vocab = len(tokenizer)
    teacher = gpt2(tmp_path / "t", tokenizer, vocab=vocab + 24, width=16, weights=True)
    student = gpt2(tmp_path / "s", tokenizer, vocab=vocab, width=8, weights=False)
    live = DistillConfig(
        student=f"hf:{student}",
        teacher=f"hf:{teacher}",
        dataset=f"text:{lm_files['corpus']}:16",
        epochs=1,
        batch_size=8,
        out=str(tmp_path / "online"),
    )
    assert np.isfinite(distill(live).final)
    # A store of an earlier release kept every column of a padded head: a student as wide
    # distills from it, a narrower one is refused in one line.
    wide = fitted_to(load_causal_lm(f"hf:{teacher}"), vocab + 24, "old.zarr")
    assert wide.vocab_size == vocab + 24
    with pytest.raises(StoreMismatchError, match="size the student's output") as refused:
        fitted_to(load_causal_lm(f"hf:{student}"), vocab + 24, "old.zarr")
    assert "\n" not in str(refused.value)


def word_tokenizer(vocab: int, words: list[str]):
    """A word-level tokenizer of exactly ``vocab`` tokens: the corpus' words, then fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<|endoftext|>", "[UNK]", *words]
    names += [f"w{i}" for i in range(vocab - len(names))]
    tokenizer = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="[UNK]"
    )


def test_a_262k_vocabulary_dumps_and_distills_end_to_end(tmp_path, lm_files):
    from lm_fixtures import WORDS

    vocab = 262_144
    tokenizer = word_tokenizer(vocab, WORDS)
    teacher = gpt2(tmp_path / "t", tokenizer, vocab=vocab, width=8, weights=True)
    student = gpt2(tmp_path / "s", tokenizer, vocab=vocab, width=4, weights=False)
    for encoding in ("topk:32", "sampled:16"):
        out = tmp_path / f"{encoding.replace(':', '')}.zarr"
        dump_lm(
            DumpConfig(
                teacher=f"hf:{teacher}",
                dataset=f"text:{lm_files['corpus']}:8",
                out=str(out),
                encoding=encoding,
                batch_size=16,
            )
        )
        store = open_sequence_store(out)
        assert store.vocab_size == vocab
        rows = store.read(np.arange(store.num_sequences))
        assert isinstance(rows, SparseLogits | SampledLogits)
        assert 0 <= int(rows.indices.min()) <= int(rows.indices.max()) < vocab
        assert verify_store(out).ok
        run = distill(
            DistillConfig(
                student=f"hf:{student}",
                cache=str(out),
                temperature=1.0,
                epochs=1,
                batch_size=16,
                out=str(tmp_path / f"run-{encoding.replace(':', '')}"),
            )
        )
        assert np.isfinite(run.final)


@pytest.mark.parametrize("encoding", ["topk:4", "sampled:6"])
def test_sparse_stores_of_earlier_releases_load_verify_resume_and_distill(
    tmp_path, lm_files, encoding
):
    lm_teachers.FOLDER = str(lm_files["teacher"])
    spec = f"text:{lm_files['corpus']}:16"
    options: dict[str, Any] = dict(
        teacher="lm_teachers:flaky", dataset=spec, batch_size=8, chunk_rows=40, encoding=encoding
    )
    reference = tmp_path / "new.zarr"
    dump_lm(DumpConfig(**options, out=str(reference)))
    out = tmp_path / "old.zarr"
    lm_teachers.FAIL_AFTER = 3
    try:
        with pytest.raises(lm_teachers.Interrupted):
            dump_lm(DumpConfig(**options, out=str(out)))
    finally:
        lm_teachers.FAIL_AFTER = None
    recorded = open_sequence_store(out, allow_incomplete=True).metadata.teacher
    with_plain_arrays(out)
    as_previous_release(out, teacher={k: v for k, v in recorded.items() if k != "dtype"})

    resumed = dump_lm(DumpConfig(**options, out=str(out), resume=True))
    assert 0 < resumed.rows_computed < resumed.num_tokens
    assert verify_store(out).ok
    old, new = open_sequence_store(out), open_sequence_store(reference)
    assert "dtype" not in old.metadata.teacher
    samples = np.arange(old.num_sequences)
    got, want = old.read(samples), new.read(samples)
    for field in ("indices", "values", "probs"):
        if hasattr(want, field):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
    run = distill(
        DistillConfig(
            student=f"hf:{lm_files['student']}",
            cache=str(out),
            temperature=1.0,
            epochs=1,
            batch_size=8,
            out=str(tmp_path / "run"),
        )
    )
    assert np.isfinite(run.final)

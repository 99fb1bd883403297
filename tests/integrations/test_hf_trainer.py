"""The Hugging Face Trainer distilling from token stores: the collator's rows are the store's, the
loss is kdcache distill's, every encoding trains, mismatches are refused, and under torchrun each
rank reads its own samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lm_fixtures import (  # noqa: F401  (provide the lm_files and chat_files fixtures)
    chat_files_fixture,
    lm_files_fixture,
)

pytest.importorskip("accelerate", reason="the [llm] extra is not installed")

from conftest import cli_environment
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
)

from kdcache.config import DumpConfig
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.integrations.hf_trainer import (
    DistillationTrainer,
    TeacherRowsCollator,
    TokenStoreDataset,
)
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import lm_logits
from kdcache.lm.text import build_text_dataset, collate
from kdcache.logits.sampled import SampledLogits
from kdcache.logits.sequence_losses import TOKEN_LOSSES, TokenDistillationLoss
from kdcache.logits.sparse import SparseLogits
from kdcache.store.sequence import open_sequence_store

ENCODINGS = ("float16", "int8", "topk:8", "sampled:8")
JOB = Path(__file__).with_name("hf_trainer_job.py")


@pytest.fixture(scope="module")
def stores(lm_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_stores")
    out = {}
    for encoding in ENCODINGS:
        out[encoding] = root / f"{encoding.replace(':', '')}.zarr"
        dump_lm(
            DumpConfig(
                teacher=f"hf:{lm_files['teacher']}",
                dataset=f"text:{lm_files['corpus']}:16",
                out=str(out[encoding]),
                encoding=encoding,
                batch_size=16,
            )
        )
    return out


def student(lm_files, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_files["student"]))


def arguments(tmp_path: Path, **options: Any) -> TrainingArguments:
    defaults: dict[str, Any] = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **options})


def as_dense(rows: Any) -> torch.Tensor:
    if isinstance(rows, SparseLogits):
        return rows.dense(1.0)
    if isinstance(rows, SampledLogits):
        return rows.dense_probs()
    return rows


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_collator_pads_its_samples_and_attaches_their_stored_rows(stores, encoding):
    store = open_sequence_store(stores[encoding])
    samples = [3, 0, 5]
    features = [TokenStoreDataset(store)[i] for i in samples]
    batch = TeacherRowsCollator(store, temperature=2.0, pad_token_id=7)(features)
    lengths = store.lengths[samples]
    assert batch["input_ids"].shape == (3, lengths.max())
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        tokens = torch.from_numpy(store.tokens(sample))
        assert torch.equal(batch["input_ids"][row, :length], tokens)
        assert (batch["input_ids"][row, length:] == 7).all()
        assert torch.equal(batch["labels"][row, :length], tokens)
        assert (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].sum() == length
    assert batch["sample_index"].tolist() == samples
    teacher = batch["teacher"]
    assert teacher.shape[0] == int((lengths - 1).sum())
    expected = store.read(samples, temperature=2.0)
    assert type(teacher) is type(expected)
    assert torch.equal(as_dense(teacher), as_dense(expected))


def test_the_trainer_loss_is_kdcache_distills_loss_on_the_same_samples(tmp_path, lm_files, stores):
    store = open_sequence_store(stores["float16"])
    criterion = TOKEN_LOSSES["js"](temperature=2.0, alpha=0.6)
    model = student(lm_files).eval()
    trainer = DistillationTrainer(
        model, arguments(tmp_path), store=store, distillation_loss=criterion
    )
    samples = [4, 1, 2, 9]
    features = [trainer.train_dataset[i] for i in samples]
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(features))
        # kdcache's own loop: its collate pads to the dataset's max length
        tokenizer = AutoTokenizer.from_pretrained(lm_files["student"])
        dataset = build_text_dataset(
            f"text:{lm_files['corpus']}:16", split="train", tokenizer=tokenizer
        )
        batch = collate(dataset, samples)
        logits = lm_logits(model, batch.input_ids, batch.attention_mask)
        expected = criterion(
            logits, store.read(samples, temperature=2.0), batch.targets, batch.mask
        )
    torch.testing.assert_close(loss, expected["total"], rtol=1e-5, atol=1e-6)


def test_a_batch_whose_labels_are_all_masked_gives_a_zero_loss_that_backward_passes(
    tmp_path, lm_files, stores
):
    store = open_sequence_store(stores["topk:8"])
    model = student(lm_files)
    trainer = DistillationTrainer(model, arguments(tmp_path), store=store)
    features = [
        {**trainer.train_dataset[i], "labels": [-100] * int(store.lengths[i])} for i in (2, 5)
    ]
    batch = trainer.data_collator(features)
    assert batch["teacher"].shape[0] == 0
    loss = trainer.compute_loss(model, batch)
    assert isinstance(loss, torch.Tensor)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_trainer_distills_from_every_encoding(tmp_path, lm_files, stores, encoding):
    model = student(lm_files)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    temperature = 1.0 if encoding.startswith("sampled") else 2.0
    trainer = DistillationTrainer(
        model,
        arguments(tmp_path, max_steps=2),  # remove_unused_columns left at True: the default
        store=stores[encoding],
        distillation_loss=TokenDistillationLoss(temperature=temperature, alpha=0.5),
        processing_class=AutoTokenizer.from_pretrained(lm_files["student"]),
    )
    result = trainer.train()
    assert result.global_step == 2
    assert np.isfinite(result.training_loss)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_brings_the_student_closer_to_the_teacher(tmp_path, lm_files, stores):
    store = open_sequence_store(stores["topk:8"])
    held_out = TokenStoreDataset(store, indices=range(0, store.num_sequences, 3))
    trainer = DistillationTrainer(
        student(lm_files),
        arguments(tmp_path, num_train_epochs=3, learning_rate=1e-2),
        store=store,
        distillation_loss=TokenDistillationLoss(temperature=1.0, alpha=1.0),
        eval_dataset=held_out,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.8 * before, (before, after)


def test_a_held_out_text_set_is_scored_by_the_models_own_loss_but_cannot_train(
    tmp_path, lm_files, stores
):
    store = open_sequence_store(stores["float16"])
    model = student(lm_files)
    text = [{"input_ids": store.tokens(i)} for i in range(6)]
    trainer = DistillationTrainer(
        model, arguments(tmp_path, max_steps=1), store=store, eval_dataset=text
    )
    batch = trainer.data_collator(text)
    assert "teacher" not in batch
    with torch.no_grad():
        expected = model.eval()(**batch).loss
    torch.testing.assert_close(trainer.evaluate()["eval_loss"], expected.item(), rtol=1e-5, atol=0)
    plain = DistillationTrainer(model, arguments(tmp_path), store=store, train_dataset=text)
    with pytest.raises(ConfigError, match="a training batch came without the teacher's rows"):
        plain.train()


def test_mismatches_are_refused_in_one_line(tmp_path, lm_files, stores):
    store = open_sequence_store(stores["float16"])
    other = AutoTokenizer.from_pretrained(lm_files["other_tok"])
    with pytest.raises(StoreMismatchError, match="dumped with another tokenizer") as info:
        DistillationTrainer(
            student(lm_files), arguments(tmp_path), store=store, processing_class=other
        )
    assert "\n" not in str(info.value)
    collator = TeacherRowsCollator(store, temperature=1.0)
    cut = {"input_ids": store.tokens(2)[:-1], "sample_index": 2}
    with pytest.raises(StoreMismatchError, match=r"sample 2 has \d+ tokens but .* holds \d+"):
        collator([cut])
    with pytest.raises(StoreMismatchError, match="sample_index 999 is not a sample"):
        collator([{"input_ids": store.tokens(2), "sample_index": 999}])
    with pytest.raises(
        ConfigError, match=r"reads rows at temperature 1\.0 but the loss softens at 4"
    ):
        DistillationTrainer(
            student(lm_files), arguments(tmp_path), store=store, data_collator=collator
        )
    with pytest.raises(ConfigError, match="distillation_loss must be a TokenDistillationLoss"):
        DistillationTrainer(
            student(lm_files),
            arguments(tmp_path),
            store=store,
            distillation_loss=torch.nn.MSELoss(),
        )


def test_a_store_of_assistant_tokens_trains_on_them_alone_as_kdcache_distill_does(
    tmp_path, chat_files
):
    spec = f"jsonl:{chat_files['chat']}:16"
    tokenizer = chat_files["tokenizer"]
    stores = {}
    for train_on in ("all", "assistant"):
        stores[train_on] = tmp_path / f"{train_on}.zarr"
        dump_lm(
            DumpConfig(
                teacher=f"hf:{chat_files['teacher']}",
                dataset=spec,
                train_on=train_on,
                encoding="float32",
                batch_size=16,
                out=str(stores[train_on]),
            )
        )
    store = open_sequence_store(stores["assistant"])
    with pytest.raises(ConfigError, match="pass tokenizer="):
        TokenStoreDataset(store)
    criterion = TokenDistillationLoss(temperature=2.0, alpha=0.5)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(chat_files["student"]))
    trainer = DistillationTrainer(
        model.eval(),
        arguments(tmp_path, max_steps=1),
        store=store,
        distillation_loss=criterion,
        processing_class=tokenizer,
    )
    samples = [0, 3, 5, 2]
    features = [trainer.train_dataset[i] for i in samples]
    batch = trainer.data_collator(features)
    # kdcache's own loop on the same sequences: targets only at the assistant's next tokens
    replies = build_text_dataset(spec, split="train", tokenizer=tokenizer, train_on="assistant")
    ours = collate(replies, samples)
    width = batch["labels"].shape[1]
    assert torch.equal(batch["labels"][:, 1:], ours.targets[:, : width - 1])
    assert 0 < int(ours.mask.sum()) < int(ours.attention_mask[:, 1:].sum())
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = lm_logits(model, ours.input_ids, ours.attention_mask)
        expected = criterion(logits, store.read(samples, temperature=2.0), ours.targets, ours.mask)
    torch.testing.assert_close(loss, expected["total"], rtol=1e-5, atol=1e-6)
    # The same labels against the store of every position read just those positions' rows.
    assert replies.pieces is not None
    everywhere = [
        {**feature, "sample_index": int(replies.pieces[sample])}
        for feature, sample in zip(features, samples, strict=True)
    ]
    full = TeacherRowsCollator(stores["all"], temperature=2.0)(everywhere)
    assert torch.equal(full["teacher"], batch["teacher"])
    unlabelled = [{k: v for k, v in f.items() if k != "labels"} for f in features]
    with pytest.raises(ConfigError, match="each feature needs labels with -100"):
        trainer.data_collator(unlabelled)
    assert np.isfinite(trainer.train().training_loss)


def test_under_torchrun_each_rank_reads_only_its_own_samples(tmp_path, lm_files, stores):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(JOB),
            str(stores["topk:8"]),
            str(lm_files["student"]),
            str(tmp_path),
        ],
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    num_sequences = open_sequence_store(stores["topk:8"]).num_sequences
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(num_sequences - num_sequences % 4))

"""Distilling a causal-LM student: cached equals online bit for bit, refusals, run folder."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from safetensors.torch import load_file

from kdcache import DistillConfig, distill, train
from kdcache.config import DumpConfig, TrainConfig
from kdcache.errors import ConfigError, StoreMismatchError
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import CHECKPOINT_RECORD, load_causal_lm
from kdcache.store.sequence import open_sequence_store


@pytest.fixture(scope="module")
def stores(lm_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    spec = f"text:{lm_files['corpus']}:16"
    out = {}
    for encoding in ("float32", "topk:8"):
        out[encoding] = str(root / f"{encoding.replace(':', '')}.zarr")
        dump_lm(
            DumpConfig(
                teacher=f"hf:{lm_files['teacher']}",
                dataset=spec,
                out=out[encoding],
                encoding=encoding,
                batch_size=16,
            )
        )
    return out


def test_cached_float32_and_online_give_bit_identical_students(tmp_path, lm_files, stores):
    common: dict[str, Any] = dict(
        student=f"hf:{lm_files['student']}", epochs=1, batch_size=8, temperature=2.0
    )
    cached = distill(DistillConfig(**common, cache=stores["float32"], out=str(tmp_path / "cached")))
    online = distill(
        DistillConfig(
            **common,
            teacher=f"hf:{lm_files['teacher']}",
            dataset=f"text:{lm_files['corpus']}:16",
            out=str(tmp_path / "online"),
        )
    )
    assert cached.final == online.final
    a = load_file(tmp_path / "cached" / "last" / "model.safetensors")
    b = load_file(tmp_path / "online" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = load_causal_lm(f"hf:{lm_files['student']}", seed=0).model.state_dict()
    assert not all(torch.equal(initial[k], a[k]) for k in a if k in initial)  # it did train


def test_topk_store_run_folder_and_the_student_reloads(tmp_path, lm_files, stores):
    result = distill(
        DistillConfig(
            student=f"hf:{lm_files['student']}",
            cache=stores["topk:8"],
            loss="reverse",
            temperature=1.0,
            epochs=2,
            batch_size=16,
            out=str(tmp_path / "run"),
        )
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert result.best == min(r["val_ppl"] for r in records)
    best = json.loads((run / "best" / CHECKPOINT_RECORD).read_text())
    assert (best["epoch"], best["step"], best["val_ppl"]) == (
        result.best_epoch,
        result.best_step,
        result.best,
    )
    last = json.loads((run / "last" / CHECKPOINT_RECORD).read_text())
    assert (last["epoch"], last["step"]) == (2, records[-1]["step"])
    assert (run / "curves.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["loss"] == "reverse"
    assert (
        load_causal_lm(f"hf:{run / 'best'}").vocab_size
        == open_sequence_store(stores["topk:8"]).vocab_size
    )


def test_store_refuses_a_student_or_dataset_that_differs(tmp_path, lm_files, stores):
    with pytest.raises(StoreMismatchError, match=r"another tokenizer.*vocabulary"):
        distill(
            DistillConfig(
                student=f"hf:{lm_files['other_tok']}",
                cache=stores["float32"],
                out=str(tmp_path / "a"),
            )
        )
    with pytest.raises(StoreMismatchError, match="max length 16 vs 12"):
        distill(
            DistillConfig(
                student=f"hf:{lm_files['student']}",
                cache=stores["float32"],
                dataset=f"text:{lm_files['corpus']}:12",
                out=str(tmp_path / "b"),
            )
        )
    with pytest.raises(ConfigError, match=r"'focal'.*valid losses: kd, reverse, skew, js"):
        distill(DistillConfig(student="hf:x", cache="s.zarr", loss="focal", out="x"))
    with pytest.raises(ConfigError, match="--gamma applies to image models only"):
        distill(DistillConfig(student="hf:x", cache="s", out="o", gamma=3.0))


def test_ce_training_writes_a_reloadable_teacher(tmp_path, lm_files):
    result = train(
        TrainConfig(
            model=f"hf:{lm_files['student']}",
            dataset=f"text:{lm_files['corpus']}:16",
            epochs=1,
            batch_size=16,
            out=str(tmp_path / "ce"),
        )
    )
    trained = load_causal_lm(f"hf:{tmp_path / 'ce' / 'best'}")
    assert trained.weights_sha256
    assert result.final < trained.vocab_size  # better than a uniform guess


def test_accumulated_batches_weigh_their_tokens_as_one_batch_that_large(tmp_path, lm_files):
    """2 batches of 2 sequences accumulated, and batches of 4: each batch's loss weighed by its
    share of the step's tokens, the same student (to float rounding). SGD, whose step follows
    the gradient's scale."""
    common: dict[str, Any] = dict(
        model=f"hf:{lm_files['student']}",
        dataset=f"text:{lm_files['corpus']}:16",
        epochs=1,
        optimizer="sgd",
        lr=0.5,
    )
    runs: dict[str, dict[str, Any]] = {
        "large": dict(batch_size=4),
        "accumulated": dict(batch_size=2, grad_accum_steps=2),
    }
    for name, options in runs.items():
        train(TrainConfig(out=str(tmp_path / name), **options, **common))
    large, accumulated = (
        load_file(tmp_path / name / "last" / "model.safetensors") for name in runs
    )
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-4, atol=1e-5)
    records = [json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in runs]
    assert records[0]["step"] == records[1]["step"]
    assert records[0]["train_loss"] == pytest.approx(records[1]["train_loss"], rel=1e-5)


def test_a_language_model_saves_its_weight_average(tmp_path, lm_files):
    """--ema-decay on a GPT-2 student (its tied embedding and head: one average): last/
    holds the average, which scores the perplexity its evaluation recorded."""
    common: dict[str, Any] = dict(
        model=f"hf:{lm_files['student']}", dataset=f"text:{lm_files['corpus']}:16", epochs=1
    )
    train(TrainConfig(out=str(tmp_path / "plain"), batch_size=4, **common))
    result = train(TrainConfig(out=str(tmp_path / "ema"), batch_size=4, ema_decay=0.5, **common))
    plain, averaged = (
        load_file(tmp_path / name / "last" / "model.safetensors") for name in ("plain", "ema")
    )
    assert not all(torch.equal(plain[key], averaged[key]) for key in plain)
    again = train(
        TrainConfig(
            out=str(tmp_path / "scored"), batch_size=4, epochs=1, lr=1e-30,
            model=f"hf:{tmp_path / 'ema' / 'last'}", dataset=common["dataset"],
        )
    )  # fmt: skip
    assert again.final == pytest.approx(result.final, rel=1e-4)

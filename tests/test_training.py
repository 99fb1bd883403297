"""train and distill on digits with real models, stores and run folders."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache import DistillConfig, TrainConfig
from kdcache.errors import ConfigError, KdcacheError, StoreMismatchError
from kdcache.store import open_store
from kdcache.training import distill, train

from test_plots import assert_png


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_train_writes_the_run_folder(tmp_path):
    result = train(TrainConfig(model="mlp:16", out=str(tmp_path / "run"), epochs=2, seed=3))
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"train_loss", "val_acc"} <= lines[0].keys()
    assert result.final_val_acc == lines[-1]["val_acc"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "mlp:16" and config["seed"] == 3 and config["resolved"]["device"] == "cpu"
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["model"] == "mlp:16" and checkpoint["val_acc"] == result.best_val_acc
    assert_png(run / "curves.png")
    assert not (run / "distributions.png").exists()


def test_a_finished_run_is_not_clobbered(tmp_path):
    train(TrainConfig(model="mlp:8", out=str(tmp_path), epochs=1))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(KdcacheError, match="--overwrite"):
        train(TrainConfig(model="mlp:8", out=str(tmp_path), epochs=1, seed=1))
    assert (tmp_path / "last.pt").read_bytes() == before


def test_cached_and_online_distillation_give_bit_identical_students(tmp_path, digits_teacher, digits_store):
    common = dict(student="mlp:16", epochs=2, batch_size=32, seed=7, device="cpu", temperature=3.0, alpha=0.6)
    distill(DistillConfig(cache=str(digits_store), out=str(tmp_path / "cached"), **common))
    distill(DistillConfig(teacher="cnn:8", weights=str(digits_teacher), dataset="digits",
                          out=str(tmp_path / "online"), **common))
    cached, online = load_state(tmp_path / "cached/last.pt"), load_state(tmp_path / "online/last.pt")
    assert cached.keys() == online.keys()
    for name in cached:
        assert torch.equal(cached[name], online[name]), name


def test_distill_shares_an_open_store_and_draws_its_figures(tmp_path, digits_store):
    moved = tmp_path / "moved.zarr"
    digits_store.rename(moved)
    try:
        reader = open_store(moved)
        reader.load()
    finally:
        moved.rename(digits_store)
    # The store's files are gone from `moved`: the run can only use the reader's decoded copy.
    config = DistillConfig(student="mlp:8", cache=str(moved), epochs=1, out=str(tmp_path / "run"), device="cpu")
    assert 0 <= distill(config, reader=reader).final_val_acc <= 100
    assert_png(tmp_path / "run/curves.png")
    assert_png(tmp_path / "run/distributions.png")
    with pytest.raises(ConfigError, match="config.cache is None"):
        distill(DistillConfig(student="mlp:8", teacher="cnn:8", dataset="digits", out=str(tmp_path / "x")), reader=reader)


@pytest.mark.parametrize("loss", ["kd", "focal", "attention"])
def test_every_loss_distills_from_the_cache(tmp_path, digits_store, loss):
    result = distill(DistillConfig(student="mlp:16", cache=str(digits_store), loss=loss, epochs=1,
                                   out=str(tmp_path), top_k=3))
    assert 0 <= result.final_val_acc <= 100
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["dataset"] == "digits"


def test_a_store_from_another_dataset_is_refused(tmp_path, digits_store):
    with pytest.raises(StoreMismatchError, match="1437 samples"):
        distill(DistillConfig(student="mlp:8", cache=str(digits_store), dataset="fake:50", out=str(tmp_path)))
    with pytest.raises(StoreMismatchError, match="1437 samples.*360"):
        distill(DistillConfig(student="mlp:8", cache=str(digits_store), split="test", out=str(tmp_path)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"batch_size": 0}, "batch size"),
        ({"loss": "mse"}, "kd, focal, attention"),
        ({"cache": None}, "--cache"),
    ],
)
def test_invalid_distill_options(changes, message):
    options = {"student": "mlp", "cache": "s.zarr", "out": "run", **changes}
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**options)


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, digits_teacher):
    from kdcache import DumpConfig
    from kdcache.dump import dump_teacher

    store = tmp_path_factory.mktemp("topk") / "top4.zarr"
    dump_teacher(DumpConfig(teacher="cnn:8", weights=str(digits_teacher), out=str(store), encoding="topk:4", device="cpu"))
    return store


@pytest.mark.parametrize("loss", ["kd", "focal", "attention"])
def test_every_loss_distills_from_a_topk_store(tmp_path, topk_store, loss):
    result = distill(DistillConfig(student="mlp:16", cache=str(topk_store), loss=loss, epochs=1, top_k=4,
                                   temperature=2.5, out=str(tmp_path / "run")))
    assert 0 <= result.final_val_acc <= 100
    assert json.loads((tmp_path / "run/config.json").read_text())["resolved"]["store"]["encoding"] == "topk:4"

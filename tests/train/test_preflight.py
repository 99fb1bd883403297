"""A refused run leaves nothing behind: its inputs are checked before its folder or store exists."""

from __future__ import annotations

import pytest
import torch

from kdcache import DistillConfig, DumpConfig, TrainConfig
from kdcache.config import SweepConfig
from kdcache.data.datasets import build_dataset
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import CheckpointError, ConfigError, SpecError, StoreMismatchError
from kdcache.train.loop import distill, train
from kdcache.train.preflight import check_model
from kdcache.train.sweep import run_sweep


def test_checking_a_model_allocates_nothing_and_leaves_the_random_state():
    state = torch.get_rng_state()
    check_model("resnet18", build_dataset("fake:8:32:4"))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ConfigError, match="cannot take inputs of shape"):
        check_model("alexnet", build_dataset("digits"))


@pytest.mark.parametrize(
    ("run", "error", "message"),
    [
        (lambda out, store: train(TrainConfig(model="resnet51", out=out)), SpecError, "resnet50"),
        (
            lambda out, store: distill(DistillConfig(student="cnn:0", cache=store, out=out)),
            SpecError,
            "cnn:WIDTH",
        ),
        (
            lambda out, store: distill(
                DistillConfig(student="mlp", cache=store, dataset="digits:8:100", out=out)
            ),
            StoreMismatchError,
            "holds 1437 samples",
        ),
        (
            lambda out, store: run_sweep(
                SweepConfig(student="alexnet", cache=store, out=out, losses=("kd",))
            ),
            ConfigError,
            "cannot take inputs",
        ),
        (
            lambda out, store: run_sweep(
                SweepConfig(student="mlp", cache=store, dataset="fake:20", out=out)
            ),
            StoreMismatchError,
            "holds 1437 samples",
        ),
        (
            lambda out, store: dump_teacher(DumpConfig(teacher="resnet51", out=out)),
            SpecError,
            "resnet50",
        ),
        (
            lambda out, store: dump_teacher(
                DumpConfig(teacher="cnn:8", weights=str(store / "zarr.json"), out=out)
            ),
            CheckpointError,
            "cannot load",
        ),
    ],
    ids=["train", "distill", "distill-dataset", "sweep", "sweep-dataset", "dump", "dump-weights"],
)
def test_a_refused_run_leaves_no_folder(tmp_path, digits_store, run, error, message):
    out = tmp_path / "out" / "run"
    with pytest.raises(error, match=message):
        run(str(out), digits_store)
    assert not (tmp_path / "out").exists()

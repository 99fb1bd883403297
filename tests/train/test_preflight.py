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
        (
            lambda out, store: distill(
                DistillConfig(student="mlp", cache=store, loss="attention", top_k=11, out=out)
            ),
            ConfigError,
            r"--top-k 11 exceeds the 10 classes .* pass --top-k 10 or less",
        ),
        (
            lambda out, store: run_sweep(
                SweepConfig(
                    student="mlp", cache=store, losses=("kd", "attention"), top_k=11, out=out
                )
            ),
            ConfigError,
            "--top-k 11 exceeds the 10 classes",
        ),
    ],
    ids=[
        "train",
        "distill",
        "distill-dataset",
        "sweep",
        "sweep-dataset",
        "dump",
        "dump-weights",
        "distill-top-k",
        "sweep-top-k",
    ],
)
def test_a_refused_run_leaves_no_folder(tmp_path, digits_store, run, error, message):
    out = tmp_path / "out" / "run"
    with pytest.raises(error, match=message):
        run(str(out), digits_store)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory, digits_teacher):
    """The digits teacher kept as 8 draws per sample at T = 1."""
    out = tmp_path_factory.mktemp("sampled") / "s.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            out=str(out),
            encoding="sampled:8",
            device="cpu",
        )
    )
    return out


def test_a_sampled_image_store_distils_at_t_1_only(tmp_path, sampled_store):
    def runs(**changes):
        return {"student": "mlp:8", "cache": str(sampled_store), "epochs": 1, **changes}

    # Softened draws are no p_T: the default T = 4 is refused, as for a token store.
    with pytest.raises(
        ConfigError,
        match="holds draws from the teacher at T = 1, got temperature 4; distill it at "
        "--temperature 1, or dump with topk:K",
    ):
        distill(DistillConfig(**runs(out=str(tmp_path / "t4"))))
    with pytest.raises(ConfigError, match="got temperature 2; distill it at --temperatures 1"):
        run_sweep(SweepConfig(**runs(out=str(tmp_path / "sweep"), temperatures=(1.0, 2.0))))
    assert not list(tmp_path.iterdir())
    result = distill(DistillConfig(**runs(out=str(tmp_path / "t1"), temperature=1.0)))
    assert result.epochs == 1
    assert (tmp_path / "t1" / "last.pt").is_file()

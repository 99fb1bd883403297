"""Numbers and names from the command line are bounded before anything runs or is written."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from kdcache import DistillConfig, DumpConfig, TrainConfig
from kdcache.config import SweepConfig
from kdcache.data.datasets import build_dataset, canonical_dataset_spec
from kdcache.errors import CheckpointError, ConfigError, SpecError
from kdcache.models import build_model, canonical_model_spec, check_input_fits, load_weights
from kdcache.run_folder import prepare_output_dir
from kdcache.runtime import resolve_device
from kdcache.train.loop import train


@pytest.mark.parametrize("device", ["meta", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_devices_that_cannot_run_a_dump_are_refused(device):
    with pytest.raises(ConfigError, match=r"use --device cpu|not supported|does not exist"):
        resolve_device(device)


def test_empty_or_in_store_output_folders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="output folder is empty"):
        prepare_output_dir("", overwrite=False)
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "zarr.json").write_text("{}")
    with pytest.raises(ConfigError, match="inside the Zarr store"):
        prepare_output_dir(tmp_path / "s.zarr" / "run", overwrite=False)
    assert not (tmp_path / "s.zarr" / "run").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [("fake:99999999999", "N=99,999,999,999"), ("fake:10:100000", "SIZE=100,000")],
)
def test_generated_datasets_too_large_to_build_are_refused(spec, message):
    with pytest.raises(ConfigError, match=f"{message} .* is too large"):
        build_dataset(spec)


def test_temperatures_whose_softmax_overflows_float32_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"at least 1.1e-19"):
        DistillConfig(student="mlp", cache="s.zarr", out=str(tmp_path), temperature=1e-45)


def test_a_text_file_as_weights_and_images_too_small_for_a_cnn(tmp_path):
    (tmp_path / "w.pt").write_text("hello\n")  # unpickles into a KeyError
    model = build_model("cnn", num_classes=2, in_channels=3)
    with pytest.raises(CheckpointError, match=r"cannot load .*w.pt: .*corrupt"):
        load_weights(model, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"cannot take inputs of shape \(3, 1, 1\)"):
        check_input_fits(model, (3, 1, 1), spec="cnn")
    check_input_fits(model, (3, 8, 8), spec="cnn")


def test_specs_are_compared_with_their_defaults_spelled_out():
    assert canonical_model_spec("mlp") == canonical_model_spec("mlp:128") == "mlp:128"
    assert canonical_model_spec("cnn") == "cnn:32"
    assert canonical_model_spec("resnet18") == "resnet18"
    assert canonical_dataset_spec("fake:50:8") == canonical_dataset_spec("fake:50:8:10")
    assert canonical_dataset_spec("synthetic:5") == "synthetic:5:32:10"
    assert canonical_dataset_spec("digits") == "digits"


def test_builtin_models_too_wide_to_allocate_are_refused():
    with pytest.raises(SpecError, match="wider than 65,536"):
        build_model("mlp:99999999999", num_classes=2, in_channels=3)


def test_a_diverging_run_stops_instead_of_exiting_0(tmp_path):
    with pytest.raises(ConfigError, match="training diverged in epoch 1"):
        train(TrainConfig(model="mlp:8", dataset="fake:10:8", out=str(tmp_path), lr=1e30, epochs=2))
    assert not (tmp_path / "last.pt").exists()


HUGE = 99999999999999999999
BATCH = "--batch-size must be an integer from 1 to 16,777,216, got"
LR = r"--lr must be a number in \(0, 1e\+37\], got"
SEED = "must be an integer from 0 to 9,223,372,036,854,775,807"


def train_config(**changes):
    return TrainConfig(**{"model": "mlp", "out": "run", **changes})


def distill_config(**changes):
    return DistillConfig(**{"student": "mlp", "cache": "s.zarr", "out": "run", **changes})


def dump_config(**changes):
    return DumpConfig(**{"teacher": "cnn", "out": "t.zarr", **changes})


def sweep_config(**changes):
    return SweepConfig(**{"student": "mlp", "cache": "s.zarr", "out": "sweep", **changes})


@pytest.mark.parametrize(
    ("build", "changes", "message"),
    [
        (train_config, {"batch_size": HUGE}, f"{BATCH} {HUGE}"),
        (train_config, {"batch_size": 0}, f"{BATCH} 0"),
        (train_config, {"batch_size": True}, f"{BATCH} True"),
        (train_config, {"batch_size": 64.0}, f"{BATCH} 64.0"),
        (dump_config, {"batch_size": HUGE}, f"{BATCH} {HUGE}"),
        (sweep_config, {"batch_size": 1 << 25}, f"{BATCH} 33554432"),
        (distill_config, {"lr": 1e300}, f"{LR} 1e\\+300"),
        (distill_config, {"lr": float("nan")}, f"{LR} nan"),
        (distill_config, {"lr": float("inf")}, f"{LR} inf"),
        (train_config, {"lr": -1.0}, f"{LR} -1.0"),
        (train_config, {"lr": 0}, f"{LR} 0"),
        (sweep_config, {"lr": 10**400}, f"{LR} 1000"),
        (train_config, {"seed": HUGE}, f"--seed {SEED}, got {HUGE}"),
        (distill_config, {"seed": -1}, f"--seed {SEED}, got -1"),
        (sweep_config, {"seeds": (0, 2**64)}, "--seeds lists 18446744073709551616; each must be"),
        (
            dump_config,
            {"augment": "flip", "augment_seed": 2**64},
            f"--augment-seed {SEED}, got 1844",
        ),
        (distill_config, {"augment_seed": -5}, f"--augment-seed {SEED}, got -5"),
        (train_config, {"epochs": HUGE}, "--epochs must be an integer from 1 to 1,000,000"),
        (dump_config, {"views": 100000, "augment": "flip"}, "--views must be an integer from 1"),
        (distill_config, {"views": 100000}, "to 65,536, got 100000"),
        (train_config, {"views": 0, "augment": "flip"}, "--views must be an integer from 1"),
        (distill_config, {"gamma": float("inf")}, "gamma must be a finite number >= 0, got inf"),
        (sweep_config, {"num_workers": HUGE}, "--num-workers must be an integer from 0 to 1,024"),
        (dump_config, {"writer_workers": HUGE}, "--writer-workers must be an integer from 1 to"),
    ],
)
def test_numbers_beyond_what_torch_and_numpy_take_are_refused_by_the_api(build, changes, message):
    with pytest.raises(ConfigError, match=message):
        build(**changes)


def test_the_largest_accepted_numbers_construct():
    train_config(batch_size=1 << 24, lr=1e37, seed=2**63 - 1, epochs=1_000_000)
    dump_config(views=1 << 16, augment="flip", augment_seed=2**63 - 1)
    sweep_config(seeds=(0, 2**63 - 1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--model", "mlp", "--batch-size", str(HUGE)), f"{BATCH} {HUGE}"),
        (("distill", "--student", "mlp", "--cache", "{tmp}/s.zarr", "--lr", "1e300"), LR),
        (("sweep", "--student", "mlp", "--cache", "{tmp}/s.zarr", "--seeds", f"0,{HUGE}"), SEED),
        (("dump-teacher", "--teacher", "cnn", "--views", "100000", "--augment", "flip"), "--views"),
        (("dump-teacher", "--teacher", "cnn", "--augment", "pad-crop:100000"), "1 to 1,024"),
    ],
    ids=["train", "distill", "sweep", "dump-teacher", "recipe"],
)
def test_the_command_line_refuses_them_in_one_line_before_writing(tmp_path, args, message):
    command = (arg.format(tmp=tmp_path) for arg in args)
    result = run_cli(*command, "--out", str(tmp_path / "out"), check=False)
    assert_one_line_error(result)
    assert result.returncode == 1
    assert re.search(message, result.stderr), result.stderr
    assert not list(tmp_path.iterdir())

"""Numbers and names from the command line are bounded before anything runs or is written."""

from __future__ import annotations

import pytest
import torch

from kdcache import DistillConfig, TrainConfig
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

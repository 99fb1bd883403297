"""timm:NAME models (the optional [timm] extra): built never pretrained, refused in one line, and
trained, dumped and distilled by the command line like any other model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import zarr
from conftest import run_cli
from narrowing import kdcache_record

from kdcache import TrainConfig, train
from kdcache.errors import CheckpointError, ConfigError, SpecError
from kdcache.models import build_model, check_input_fits, load_weights

timm = pytest.importorskip("timm", reason="the [timm] extra is not installed")

#: Two of timm's own test architectures: small enough for 8x8 digits on a shared CPU.
TEACHER, STUDENT = "timm:test_resnet", "timm:test_efficientnet"


def test_a_timm_model_has_the_asked_classes_and_channels_and_random_weights():
    torch.manual_seed(0)
    model = build_model(TEACHER, num_classes=7, in_channels=1)
    assert isinstance(model, timm.models.resnet.ResNet)
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    torch.manual_seed(1)
    again = build_model(TEACHER, num_classes=7, in_channels=1)
    # never pretrained: two builds under different seeds differ
    first, second = (next(m.parameters()) for m in (model, again))
    assert not torch.equal(first, second)


def test_a_pretrained_tag_picks_the_architecture_without_downloading():
    model = build_model("timm:resnet10t.c3_in1k", num_classes=3, in_channels=3)
    assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    assert getattr(model, "pretrained_cfg", {})["tag"] == "c3_in1k"


def test_weights_load_into_a_timm_model(tmp_path):
    source = build_model(STUDENT, num_classes=4, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "student.pt")
    target = build_model(STUDENT, num_classes=4, in_channels=1)
    load_weights(target, tmp_path / "student.pt", spec=STUDENT)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(source.eval()(x), target.eval()(x))
    with pytest.raises(CheckpointError, match="do not fit model 'timm:test_efficientnet'"):
        load_weights(
            build_model(STUDENT, num_classes=5, in_channels=1),
            tmp_path / "student.pt",
            spec=STUDENT,
        )


def test_an_unknown_timm_name_names_the_closest_ones():
    with pytest.raises(SpecError, match=r"unknown timm model 'resnet10x'.*did you mean resnet10t"):
        build_model("timm:resnet10x", num_classes=3, in_channels=1)
    with pytest.raises(
        SpecError, match=r"unknown timm model '' in model spec 'timm:'; expected timm:NAME"
    ):
        build_model("timm:", num_classes=3, in_channels=1)


def test_inputs_a_timm_model_cannot_take_are_refused_in_one_line():
    vit = build_model("timm:test_vit", num_classes=3, in_channels=1)
    with pytest.raises(
        ConfigError, match=r"'timm:test_vit' cannot take inputs of shape \(1, 8, 8\)"
    ):
        check_input_fits(vit, (1, 8, 8), spec="timm:test_vit")


def test_without_timm_the_error_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(SpecError, match=r'install it with pip install "kdcache\[timm\]"') as info:
        build_model(TEACHER, num_classes=3, in_channels=1)
    assert "\n" not in str(info.value)


def test_train_dump_and_distill_timm_models(tmp_path):
    """The teacher trained by the API, dumped (its checkpoint naming the model and dataset) and
    distilled by the command line."""
    dataset = "digits:8:100"
    train(
        TrainConfig(
            model=TEACHER, dataset=dataset, epochs=1, batch_size=50, out=str(tmp_path / "teacher")
        )
    )
    dumped = run_cli(
        "dump-teacher", "--weights", str(tmp_path / "teacher" / "last.pt"),
        "--out", str(tmp_path / "t.zarr"), "--device", "cpu",
    )  # fmt: skip
    assert "N=100 C=10 float16" in dumped.stdout
    record = kdcache_record(zarr.open_group(str(tmp_path / "t.zarr"), mode="r"))
    assert (record["teacher"]["spec"], record["dataset"]["spec"]) == (TEACHER, dataset)
    distilled = run_cli(
        "distill", "--student", STUDENT, "--cache", str(tmp_path / "t.zarr"), "--epochs", "1",
        "--batch-size", "50", "--out", str(tmp_path / "kd"), "--device", "cpu",
    )  # fmt: skip
    assert "best val_acc" in distilled.stdout
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["student"] == STUDENT
    student = build_model(STUDENT, num_classes=10, in_channels=1)
    load_weights(student, tmp_path / "kd" / "last.pt", spec=STUDENT)

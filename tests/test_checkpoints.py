"""A `kdcache train` checkpoint says which model and dataset it belongs to."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from narrowing import present

from kdcache import DistillConfig, DumpConfig
from kdcache.checkpoints import read_record
from kdcache.cli.commands import cli
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import CheckpointError, ConfigError
from kdcache.store.read.reader import open_store
from kdcache.train.loop import distill


def test_a_checkpoint_records_its_model_and_dataset(digits_teacher):
    record = read_record(digits_teacher)
    assert (record.model, record.dataset) == ("cnn:8", "digits")
    assert (record.num_classes, record.in_channels) == (10, 1)


def test_dump_and_online_distill_take_the_teacher_and_dataset_from_the_weights(
    tmp_path, digits_teacher
):
    out = tmp_path / "teacher.zarr"
    dump_teacher(DumpConfig(weights=str(digits_teacher), out=str(out), device="cpu"))
    metadata = open_store(out).metadata
    assert present(metadata.teacher)["spec"] == "cnn:8"
    assert present(metadata.dataset)["spec"] == "digits"

    run = tmp_path / "online"
    distill(
        DistillConfig(
            student="mlp:8", weights=str(digits_teacher), out=str(run), epochs=1, device="cpu"
        )
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["teacher"] == "cnn:8"
    assert saved["dataset"] == "digits"


def test_a_teacher_that_contradicts_the_weights_is_refused(tmp_path, digits_teacher):
    with pytest.raises(ConfigError, match=r"--teacher 'mlp' contradicts .* model 'cnn:8'"):
        dump_teacher(
            DumpConfig(teacher="mlp", weights=str(digits_teacher), out=str(tmp_path / "s"))
        )
    dump_teacher(  # the same model spelt otherwise is no conflict
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            dataset="digits:8:40",
            out=str(tmp_path / "same"),
            device="cpu",
        )
    )
    assert not (tmp_path / "s").exists()


def test_weights_of_another_dataset_name_the_dataset_in_use_and_the_fix(tmp_path, digits_teacher):
    with pytest.raises(CheckpointError) as caught:
        dump_teacher(
            DumpConfig(weights=str(digits_teacher), dataset="fake:20:8:4", out=str(tmp_path / "s"))
        )
    message = str(caught.value)
    assert "dataset 'fake:20:8:4' (4 classes, 3 channels) is in use" in message
    assert "trained on dataset 'digits'" in message
    assert "pass --dataset digits" in message
    # A checkpoint from before the dataset was recorded, and a plain state_dict, still load and
    # still name the dataset in use when they do not fit it.
    checkpoint = torch.load(digits_teacher, weights_only=True)
    del checkpoint["dataset"]
    torch.save(checkpoint, tmp_path / "old.pt")
    torch.save(checkpoint["state_dict"], tmp_path / "plain.pt")
    for name in ("old.pt", "plain.pt"):
        with pytest.raises(
            CheckpointError, match=r"'fake:20:8:4' .* is in use.*pass --dataset SPEC"
        ):
            dump_teacher(
                DumpConfig(
                    teacher="cnn:8",
                    weights=str(tmp_path / name),
                    dataset="fake:20:8:4",
                    out=str(tmp_path / "s"),
                )
            )
    assert not (tmp_path / "s").exists()
    dump_teacher(
        DumpConfig(teacher="cnn:8", weights=str(tmp_path / "old.pt"), out=str(tmp_path / "old"))
    )  # without a record the dataset is digits, as before
    assert present(open_store(tmp_path / "old").metadata.dataset)["spec"] == "digits"


def test_without_teacher_or_weights_the_cli_says_what_to_pass(tmp_path):
    result = CliRunner().invoke(cli, ["dump-teacher", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "needs --teacher SPEC (e.g. --teacher resnet18), or --weights CKPT" in result.output
    assert not (tmp_path / "s").exists()

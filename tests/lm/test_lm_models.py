"""hf:PATH checkpoints that cannot be trusted or do not fit, and datasets a model cannot take:
each refused in one line before anything runs or is allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from safetensors.torch import load_file, save_file

from kdcache import DistillConfig, TrainConfig, distill, train
from kdcache.errors import CheckpointError, SpecError
from kdcache.lm.models import check_dataset_fits, load_causal_lm
from kdcache.lm.text import build_text_dataset


class Payload:
    """Unpickled by a full unpickler, this creates ``marker``: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_pickle_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, lm_files):
    marker = tmp_path / "payload-ran"
    evil = copy_model(lm_files["student"], tmp_path / "evil")
    torch.save({"transformer.wte.weight": Payload(marker)}, evil / "pytorch_model.bin")
    # The payload is real: a full unpickler runs it.
    torch.load(evil / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"pytorch_model.bin in .* is a pickle") as refused:
        load_causal_lm(f"hf:{evil}")
    assert "never runs such a pickle" in one_line(refused)
    assert not marker.exists()

    out = tmp_path / "t.zarr"
    dumped = run_cli(
        "dump-teacher",
        "--teacher",
        f"hf:{evil}",
        "--dataset",
        f"text:{lm_files['corpus']}:16",
        "--out",
        str(out),
        check=False,
    )
    assert_one_line_error(dumped, "pytorch_model.bin", "pickle")
    assert not marker.exists()
    assert not out.exists()


def test_a_pickle_of_tensors_loads_as_the_same_model(tmp_path, lm_files):
    legacy = copy_model(lm_files["teacher"], tmp_path / "legacy")
    weights = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(weights, legacy / "pytorch_model.bin")
    loaded = load_causal_lm(f"hf:{legacy}").model.state_dict()
    reference = load_causal_lm(f"hf:{lm_files['teacher']}").model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


def test_safetensors_that_do_not_fit_the_config_are_refused(tmp_path, lm_files):
    weights = load_file(lm_files["teacher"] / "model.safetensors")
    wrong = copy_model(lm_files["teacher"], tmp_path / "wrong")
    save_file({**weights, "transformer.wte.weight": torch.zeros(5, 7)}, wrong / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"do not fit its config\.json") as refused:
        load_causal_lm(f"hf:{wrong}")
    assert "transformer.wte.weight is (5, 7) there but (300, 32) in the model" in one_line(refused)

    lacking = copy_model(lm_files["teacher"], tmp_path / "lacking")
    partial = {k: v for k, v in weights.items() if k != "transformer.h.0.mlp.c_fc.weight"}
    save_file(partial, lacking / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"lack transformer\.h\.0\.mlp\.c_fc\.weight"
    ) as refused:
        load_causal_lm(f"hf:{lacking}")
    one_line(refused)

    cut = copy_model(lm_files["teacher"], tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot build a causal LM") as refused:
        load_causal_lm(f"hf:{cut}")
    one_line(refused)


def test_a_dataset_the_model_cannot_take_is_refused_before_a_batch(tmp_path, lm_files):
    teacher = load_causal_lm(f"hf:{lm_files['teacher']}")
    corpus = lm_files["corpus"]
    fits = build_text_dataset(f"text:{corpus}:64", split="train", tokenizer=teacher.tokenizer)
    check_dataset_fits(teacher, fits)
    longer = build_text_dataset(f"text:{corpus}:65", split="train", tokenizer=teacher.tokenizer)
    with pytest.raises(SpecError, match="MAX_LENGTH 65 is more than the 64 positions") as refused:
        check_dataset_fits(teacher, longer)
    assert "text:FILE:64" in one_line(refused)

    narrow = copy_model(lm_files["student"], tmp_path / "narrow")
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    student = load_causal_lm(f"hf:{narrow}")
    data = build_text_dataset(f"text:{corpus}:16", split="train", tokenizer=student.tokenizer)
    with pytest.raises(SpecError, match="input embedding has 100 rows") as refused:
        check_dataset_fits(student, data)
    one_line(refused)


def test_train_and_distill_refuse_a_max_length_beyond_positions_before_the_run_folder(
    tmp_path, lm_files
):
    dataset = f"text:{lm_files['corpus']}:65"
    with pytest.raises(SpecError, match="more than the 64 positions of hf:"):
        train(TrainConfig(model=f"hf:{lm_files['student']}", dataset=dataset, out=str(tmp_path)))
    with pytest.raises(SpecError, match="more than the 64 positions of hf:"):
        distill(
            DistillConfig(
                student=f"hf:{lm_files['student']}",
                teacher=f"hf:{lm_files['teacher']}",
                dataset=dataset,
                out=str(tmp_path / "run"),
            )
        )
    assert not list(tmp_path.iterdir())

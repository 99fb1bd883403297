"""Every option of ``train``, ``distill`` and ``sweep`` x {image, language model}: recorded in the
run's config.json, or refused in one line that names it.

The options are read from the click commands, so a new option is covered (and must be declared
with ``option(only=...)`` if it means nothing for one kind of run) without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache import DistillConfig, DumpConfig, SweepConfig, TrainConfig, distill, dump_teacher
from kdcache.cli.commands import cli
from kdcache.errors import ConfigError
from kdcache.options import IMAGE, LM
from kdcache.train.loop import train
from kdcache.train.sweep import run_sweep

CONFIGS = {"train": TrainConfig, "distill": DistillConfig, "sweep": SweepConfig}
KINDS = (IMAGE, LM)
#: A value away from the default for each option only one kind of run takes.
FOREIGN_VALUES = {
    "inputs": "float32",
    "channels_last": True,
    "augment": "flip",
    "augment_seed": 3,
    "views": 1,
    "student_augment": "flip",
    "indices": (0, 1),
    "exclude_classes": (1,),
    "weights": "w.pt",
    "gamma": 1.0,
    "top_k": 2,
    "skew": 0.3,
    "train_on": "assistant",
    "pack": True,
}
#: Speed options the language-model runs set away from their defaults (they must take effect).
LM_SPEED = {"amp": "bf16", "num_workers": 1}


def click_options(command: str) -> list[str]:
    return [param.name for param in cli.commands[command].params if param.name]


CASES = [(command, name) for command in CONFIGS for name in click_options(command)]


def test_every_click_option_is_a_config_field():
    for command, name in CASES:
        assert name in {f.name for f in dataclasses.fields(CONFIGS[command])}, (command, name)


def field_of(command: str, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(CONFIGS[command]) if f.name == name)


@pytest.fixture(scope="module")
def runs(lm_files, tmp_path_factory):
    """config.json of one run per command and kind (a sweep of one setting for images; a
    language-model sweep is refused as a whole)."""
    root = tmp_path_factory.mktemp("options")
    text = f"text:{lm_files['corpus']}:16"
    hf_student, hf_teacher = f"hf:{lm_files['student']}", f"hf:{lm_files['teacher']}"
    image: dict[str, Any] = dict(epochs=1, batch_size=64, device="cpu")
    dataset = "fake:60:8:3"
    store = root / "t.zarr"
    dump_teacher(DumpConfig(teacher="mlp:8", dataset=dataset, out=str(store), device="cpu"))
    train(TrainConfig(model="mlp:8", dataset=dataset, out=str(root / "train-image"), **image))
    distill(
        DistillConfig(
            student="mlp:8",
            teacher="mlp:8",
            dataset=dataset,
            out=str(root / "distill-image"),
            **image,
        )
    )
    run_sweep(
        SweepConfig(
            cache=str(store), student="mlp:8", temperatures=(2.0,), out=str(root / "sweep"), **image
        )
    )
    lm: dict[str, Any] = dict(epochs=1, batch_size=32, device="cpu", **LM_SPEED)
    train(
        TrainConfig(model=hf_student, dataset=text, out=str(root / "train-lm"), compile=True, **lm)
    )
    distill(
        DistillConfig(
            student=hf_student,
            teacher=hf_teacher,
            dataset=text,
            temperature=1.0,
            out=str(root / "distill-lm"),
            **lm,
        )
    )
    folders = {
        ("train", IMAGE): root / "train-image",
        ("distill", IMAGE): root / "distill-image",
        ("sweep", IMAGE): next((root / "sweep").glob("kd-*")),
        ("train", LM): root / "train-lm",
        ("distill", LM): root / "distill-lm",
    }
    bases = {
        ("train", IMAGE): dict(model="mlp:8", dataset=dataset, out=str(root / "x")),
        ("distill", IMAGE): dict(student="mlp:8", cache=str(store), out=str(root / "x")),
        ("sweep", IMAGE): dict(student="mlp:8", cache=str(store), out=str(root / "x")),
        ("train", LM): dict(model=hf_student, dataset=text, out=str(root / "x")),
        ("distill", LM): dict(student=hf_student, cache=str(store), out=str(root / "x")),
        ("sweep", LM): dict(student=hf_student, cache=str(store), out=str(root / "x")),
    }
    configs = {
        key: json.loads((folder / "config.json").read_text()) for key, folder in folders.items()
    }
    return {"configs": configs, "bases": bases, "root": root}


RUNNERS: dict[str, Callable[..., Any]] = {"train": train, "distill": distill, "sweep": run_sweep}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("command", "name"), CASES)
def test_each_option_is_recorded_or_refused_in_one_line(runs, command, name, kind):
    only = field_of(command, name).metadata.get("only")
    flag = "--" + name.replace("_", "-")
    base = runs["bases"][(command, kind)]
    if command == "sweep" and kind == LM:
        with pytest.raises(ConfigError, match="sweep does not handle language models") as info:
            run_sweep(SweepConfig(**base))
        assert "\n" not in str(info.value)
        return
    if only is not None and only != kind:
        with pytest.raises(ConfigError) as info:  # by the config, or by the run before it starts
            RUNNERS[command](CONFIGS[command](**{**base, name: FOREIGN_VALUES[name]}))
        assert flag in str(info.value)
        assert "\n" not in str(info.value)
        assert not (runs["root"] / "x").exists()  # refused before anything is written
        return
    recorded = runs["configs"][(command, kind)]
    assert name in recorded or command == "sweep", f"{flag} missing from config.json"
    if command == "sweep":  # each run's config.json holds the sweep's shared options
        sweep_json = json.loads((runs["root"] / "sweep" / "sweep.json").read_text())
        assert name in sweep_json
    if kind == LM and name in LM_SPEED:
        assert recorded[name] == LM_SPEED[name]
    if kind == LM and command == "train" and name == "compile":
        assert recorded[name] is True

"""The optimiser and learning-rate schedule of a run: Adam unless --weight-decay, SGD with
Nesterov momentum (--optimizer sgd), the warm-up and cosine curve per step, its state through a
checkpoint, the lr each epoch records, and gradient clipping (--max-grad-norm)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from kdcache import DistillConfig, TrainConfig
from kdcache.config import SweepConfig
from kdcache.data.datasets import build_dataset
from kdcache.errors import ConfigError
from kdcache.train.loop import train
from kdcache.train.optim import LearningRateCurve, build_optimizer, build_schedule


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def options(**changes) -> TrainConfig:
    return TrainConfig(model="mlp:8", out="run", **changes)


def lrs(schedule, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_without_weight_decay_the_optimiser_is_plain_adam_over_every_parameter():
    model = tiny_model()
    optimizer = build_optimizer(model, options())
    reference = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert type(optimizer) is torch.optim.Adam
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert optimizer.defaults == reference.defaults
    schedule = build_schedule(optimizer, options(), steps_per_epoch=7)
    assert set(lrs(schedule, optimizer, 70)) == {1e-3}  # the very float --lr, every step


def test_weight_decay_is_adamw_over_the_weights_but_not_biases_or_norms():
    model = tiny_model()
    model[2].bias.requires_grad_(False)
    optimizer = build_optimizer(model, options(weight_decay=0.05))
    assert type(optimizer) is torch.optim.AdamW
    decayed, kept = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05
    assert kept["weight_decay"] == 0.0
    assert decayed["params"] == [model[0].weight, model[2].weight]
    assert kept["params"] == [model[0].bias, model[1].weight, model[1].bias]  # frozen bias left out


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, True), (0.0, False)])
def test_sgd_takes_nesterov_momentum_and_decays_the_weights_but_not_biases_or_norms(
    momentum, nesterov
):
    model = tiny_model()
    config = options(optimizer="sgd", lr=0.1, momentum=momentum, weight_decay=1e-4)
    optimizer = build_optimizer(model, config)
    assert type(optimizer) is torch.optim.SGD
    decayed, kept = optimizer.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (1e-4, 0.0)
    assert decayed["params"] == [model[0].weight, model[2].weight]
    assert (decayed["momentum"], decayed["nesterov"], decayed["lr"]) == (momentum, nesterov, 0.1)
    # One step of it is torch's own SGD step on the same groups.
    twin = tiny_model()
    reference = torch.optim.SGD(
        [
            {"params": [twin[0].weight, twin[2].weight]},
            {"params": [twin[0].bias, twin[1].weight, twin[1].bias, twin[2].bias]},
        ],
        lr=0.1,
        momentum=momentum,
        nesterov=nesterov,
    )
    reference.param_groups[0]["weight_decay"] = 1e-4
    inputs = torch.randn(5, 4)
    for trained, its_optimizer in ((model, optimizer), (twin, reference)):
        for _ in range(2):
            its_optimizer.zero_grad()
            trained(inputs).square().sum().backward()
            its_optimizer.step()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )


def test_an_sgd_run_records_its_optimizer_and_trains_otherwise_than_adam(tmp_path):
    common: dict[str, Any] = dict(model="mlp:8", dataset="fake:40:8", epochs=2, batch_size=8)
    train(TrainConfig(out=str(tmp_path / "adam"), **common))
    config = TrainConfig(out=str(tmp_path / "sgd"), optimizer="sgd", lr=0.05, **common)
    train(config)
    saved = json.loads((tmp_path / "sgd" / "config.json").read_text())
    assert (saved["optimizer"], saved["momentum"]) == ("sgd", 0.9)
    assert TrainConfig.from_dict(saved) == config
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("adam", "sgd"))
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_the_cosine_warms_up_linearly_then_decays_to_min_lr_per_step():
    config = options(lr=0.1, lr_schedule="cosine", warmup_epochs=0.5, min_lr=0.01, epochs=3)
    optimizer = build_optimizer(tiny_model(), config)
    seen = lrs(build_schedule(optimizer, config, steps_per_epoch=4), optimizer, 12)
    assert seen[:3] == pytest.approx([0.0, 0.05, 0.1])
    decay = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    assert seen[2:] == pytest.approx(decay)
    assert all(a > b for a, b in itertools.pairwise(seen[2:]))


def test_a_constant_schedule_may_warm_up():
    curve = LearningRateCurve(schedule="constant", total_steps=10, warmup_steps=4)
    assert [curve(step) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_a_resumed_schedule_continues_the_uninterrupted_curve(tmp_path):
    config = options(lr_schedule="cosine", warmup_epochs=1.5, min_lr=1e-5, weight_decay=0.1)

    def start():
        optimizer = build_optimizer(tiny_model(), config)
        return optimizer, build_schedule(optimizer, config, steps_per_epoch=6)

    optimizer, schedule = start()
    uninterrupted = lrs(schedule, optimizer, 60)
    optimizer, schedule = start()
    first = lrs(schedule, optimizer, 25)
    state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    torch.save(state, tmp_path / "state.pt")
    optimizer, schedule = start()
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    assert first + lrs(schedule, optimizer, 35) == uninterrupted


def test_each_epoch_records_its_last_learning_rate_and_config_json_the_options(tmp_path):
    config = TrainConfig(
        model="mlp:8",
        dataset="fake:40:8",
        out=str(tmp_path),
        epochs=3,
        batch_size=8,
        lr_schedule="cosine",
        warmup_epochs=0.5,
        weight_decay=0.01,
    )
    train(config)
    steps = math.ceil(len(build_dataset("fake:40:8", split="train")) / 8)
    warmup = round(steps * 0.5)  # --warmup-epochs 0.5
    curve = LearningRateCurve(schedule="cosine", total_steps=3 * steps, warmup_steps=warmup)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [1e-3 * curve(epoch * steps - 1) for epoch in (1, 2, 3)]
    assert [record["lr"] for record in records] == pytest.approx(expected)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == config


def test_a_default_run_equals_one_with_the_defaults_spelled_out(tmp_path):
    common: dict[str, Any] = dict(model="mlp:8", dataset="fake:40:8", epochs=2, batch_size=8)
    train(TrainConfig(out=str(tmp_path / "a"), **common))
    spelled: dict[str, Any] = dict(
        lr_schedule="constant", warmup_epochs=0.0, min_lr=0.0, weight_decay=0.0, max_grad_norm=0.0
    )
    train(TrainConfig(out=str(tmp_path / "b"), **common, **spelled))
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in "ab")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    records = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["lr"] for line in records] == [1e-3, 1e-3]


def test_configs_saved_before_these_options_load_as_constant_without_decay_or_clipping():
    old = DistillConfig(student="mlp", cache="s.zarr", out="run").to_dict()
    names = ("lr_schedule", "warmup_epochs", "min_lr", "weight_decay", "max_grad_norm", "optimizer")
    for name in names:
        del old[name]
    config = DistillConfig.from_dict(old)
    assert tuple(getattr(config, name) for name in names) == (
        "constant", 0.0, 0.0, 0.0, 0.0, "adam"
    )  # fmt: skip


def test_clipping_bounds_each_step_and_each_epoch_records_the_mean_norm_before_it(tmp_path):
    """A bound no gradient reaches leaves the run bit for bit as without clipping; a tight one
    changes every step (Adam rescales a whole gradient, but not one shrunk by a factor that
    varies from step to step)."""
    common: dict[str, Any] = dict(model="mlp:8", dataset="fake:40:8", epochs=2, batch_size=8)
    runs = {"none": 0.0, "loose": 1e30, "tight": 1e-4}
    for name, bound in runs.items():
        train(TrainConfig(out=str(tmp_path / name), max_grad_norm=bound, **common))
    weights = {
        name: torch.load(tmp_path / name / "last.pt", weights_only=True)["state_dict"]
        for name in runs
    }
    assert all(torch.equal(weights["none"][k], weights["loose"][k]) for k in weights["none"])
    assert not all(torch.equal(weights["none"][k], weights["tight"][k]) for k in weights["none"])
    for name in runs:
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        norms = [json.loads(line).get("grad_norm") for line in records]
        if name == "none":
            assert norms == [None, None]
        else:
            assert all(0 < norm < 1e3 for norm in norms)


def test_every_run_of_a_sweep_takes_the_schedule():
    sweep = SweepConfig(
        student="mlp", cache="s.zarr", out="sweep", lr_schedule="cosine", weight_decay=0.02
    )
    assert {(run.lr_schedule, run.weight_decay) for run in sweep.runs()} == {("cosine", 0.02)}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight_decay": -0.1}, r"--weight-decay must be a number in \[0, 1e\+37\], got -0.1"),
        (
            {"max_grad_norm": -1.0},
            r"--max-grad-norm must be a number in \[0, 1e\+37\], got -1",
        ),
        ({"lr_schedule": "step"}, "unknown --lr-schedule 'step'; valid choices: constant, cosine"),
        ({"warmup_epochs": 11}, r"--warmup-epochs 11 is longer than the run \(--epochs 10\)"),
        ({"warmup_epochs": -1.0}, r"--warmup-epochs must be a number in \[0, 1e\+06\], got -1"),
        (
            {"lr_schedule": "cosine", "min_lr": 0.01},
            r"--min-lr 0.01 is above --lr 0.001; give a number in \[0, 0.001\]",
        ),
        ({"min_lr": 1e-5}, "--min-lr 1e-05 is where --lr-schedule cosine ends"),
        ({"optimizer": "lamb"}, "unknown --optimizer 'lamb'; valid choices: adam, sgd"),
        ({"momentum": 0.5}, "--momentum 0.5 is SGD's, but the optimizer is adam; add --optimizer"),
        (
            {"optimizer": "sgd", "momentum": 1.5},
            r"--momentum must be a number in \[0, 1\), got 1.5",
        ),
    ],
)
def test_invalid_schedules_are_refused_naming_the_value_and_range(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(options(), **changes)

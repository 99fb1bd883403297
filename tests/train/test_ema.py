"""--ema-decay: the moving average of the student's weights, what runs evaluate and save."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from kdcache import TrainConfig
from kdcache.data.datasets import build_dataset
from kdcache.errors import ConfigError
from kdcache.models import build_model
from kdcache.train.ema import WeightAverage
from kdcache.train.loop import evaluate, train


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_each_update_moves_the_average_by_one_minus_the_decay():
    model = small_model()
    start = {name: value.clone() for name, value in model.state_dict().items()}
    average = WeightAverage(model, decay=0.75)
    assert "1.num_batches_tracked" not in average.names  # integer buffers are not averaged
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model(torch.randn(5, 3))  # training mode: the batch-norm statistics move too
    average.update(model)
    now = model.state_dict()
    for name, value in zip(average.names, average.tensors, strict=True):
        torch.testing.assert_close(value, 0.75 * start[name] + 0.25 * now[name])


def moved_average(decay: float, name: str, change: float) -> tuple[nn.Sequential, WeightAverage]:
    """A small model whose parameter ``name`` moved by ``change`` after its average began, and
    the average, updated once since."""
    model = small_model()
    average = WeightAverage(model, decay=decay)
    with torch.no_grad():
        model.get_parameter(name).add_(change)
    average.update(model)
    return model, average


def test_the_average_is_swapped_in_and_the_model_gets_its_own_weights_back():
    model, average = moved_average(0.5, "0.weight", 2.0)
    own = {name: value.clone() for name, value in model.state_dict().items()}
    averaged = [tensor.clone() for tensor in average.tensors]
    with average.swapped_into(model):
        torch.testing.assert_close(model.get_parameter("0.weight"), own["0.weight"] - 1.0)
    assert all(torch.equal(model.state_dict()[name], own[name]) for name in own)
    assert all(torch.equal(a, b) for a, b in zip(average.tensors, averaged, strict=True))


def test_a_saved_average_is_taken_up_and_one_of_another_model_refused():
    _, average = moved_average(0.9, "2.bias", 1.0)
    again = WeightAverage(small_model(), decay=0.9)
    again.load_state_dict(average.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors, average.tensors, strict=True))
    other = WeightAverage(nn.Linear(3, 2), decay=0.9)
    with pytest.raises(KeyError):
        other.load_state_dict(average.state_dict())


def test_a_run_evaluates_and_saves_the_average(tmp_path):
    common: dict[str, Any] = dict(model="mlp:8", dataset="fake:40:8", epochs=2, batch_size=8)
    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    train(TrainConfig(out=str(tmp_path / "ema"), ema_decay=0.8, **common))
    plain, averaged = (
        torch.load(tmp_path / run / "last.pt", weights_only=True)["state_dict"]
        for run in ("plain", "ema")
    )
    # The same training (no random draw depends on the average); an average behind it saved.
    assert not all(torch.equal(plain[key], averaged[key]) for key in plain)
    held_out = build_dataset("fake:40:8", split="test")
    student = build_model(
        "mlp:8", num_classes=held_out.num_classes, in_channels=held_out.in_channels
    )
    student.load_state_dict(averaged)
    accuracy, loss = evaluate(student, held_out, batch_size=8, device=torch.device("cpu"))
    last = json.loads((tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["val_acc"], last["val_loss"]) == pytest.approx((accuracy, loss))
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["ema_decay"] == 0.8


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_a_decay_outside_0_to_1_is_refused_naming_the_range(decay):
    with pytest.raises(ConfigError, match=r"--ema-decay must be a number in \[0, 1\)"):
        TrainConfig(model="mlp", out="run", ema_decay=decay)


def test_half_precision_weights_are_averaged_in_float32_and_tied_ones_once():
    """bf16 rounds an update of 1e-4 x a weight's change away; the average keeps it. An
    embedding tied to a head is one entry of the average."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight
    average = WeightAverage(model, decay=0.9998)
    assert average.names == ["0.weight"]
    assert average.tensors[0].dtype == torch.float32
    with torch.no_grad():
        model.get_parameter("0.weight").fill_(1.0)
    start = average.tensors[0].clone()
    for _ in range(100):
        average.update(model)
    expected = 1.0 + (start - 1.0) * 0.9998**100
    torch.testing.assert_close(average.tensors[0], expected)
    with average.swapped_into(model):
        assert model.get_parameter("1.weight").dtype == torch.bfloat16
        torch.testing.assert_close(model[1].weight.float(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(average.tensors[0], expected)  # still float32's
    assert bool((model.get_parameter("0.weight") == 1.0).all())

"""Tests for kdcache.models: model specs, user models, weights loading and hashing."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from kdcache.errors import CheckpointError, ConfigError, SpecError
from kdcache.models import MODELS, build_model, canonical_model_spec, load_weights, weights_sha256


class _Opaque:
    """Not an allowed global for weights_only loading."""


@pytest.mark.parametrize(
    ("spec", "in_channels", "size"),
    [
        ("mlp", 1, 8),
        ("mlp:16", 1, 8),
        ("mlp:32,16", 3, 32),
        ("cnn", 1, 8),
        ("cnn:8", 3, 32),
        ("resnet18", 1, 8),
        ("resnet18", 3, 32),
    ],
)
def test_forward_shapes(spec, in_channels, size):
    model = build_model(spec, num_classes=7, in_channels=in_channels)
    for train in (True, False):
        model.train(train)
        out = model(torch.randn(2, in_channels, size, size))
        assert isinstance(out, torch.Tensor)
        assert out.shape == (2, 7)


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_builds_and_runs_a_tiny_batch(name):
    example = MODELS[name].example
    for spec in (name, example, canonical_model_spec(name)):
        model = build_model(spec, num_classes=3, in_channels=2)
        assert model(torch.randn(2, 2, 8, 8)).shape == (2, 3)
    assert canonical_model_spec(canonical_model_spec(name)) == canonical_model_spec(name)


def test_an_unknown_model_names_what_was_given_and_every_registered_name():
    with pytest.raises(SpecError, match="'zzzzqqq'; Valid: " + ", ".join(MODELS)):
        build_model("zzzzqqq", num_classes=3, in_channels=1)


def test_builtin_layout():
    mlp = build_model("mlp", num_classes=10, in_channels=1)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(64, 128), (128, 10)]
    cnn = build_model("cnn", num_classes=10, in_channels=1)
    convs = [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 64]
    assert not any(isinstance(m, nn.Dropout) for m in cnn.modules())


def test_eval_mode_is_deterministic():
    model = build_model("cnn", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), model(x))


def test_torchvision_first_conv_replaced():
    model = build_model("resnet18", num_classes=10, in_channels=1)
    conv1, fc = model.conv1, model.fc
    assert isinstance(conv1, nn.Conv2d)
    assert isinstance(fc, nn.Linear)
    assert conv1.in_channels == 1
    assert (conv1.out_channels, conv1.kernel_size, conv1.stride) == (
        64,
        (7, 7),
        (2, 2),
    )
    assert conv1.bias is None
    assert fc.out_features == 10
    # Models whose stem is nested in a Sequential are handled too.
    mobile = build_model("mobilenet_v3_small", num_classes=4, in_channels=2)
    stem = mobile.get_submodule("features.0.0")
    assert isinstance(stem, nn.Conv2d)
    assert stem.in_channels == 2
    assert mobile.eval()(torch.randn(1, 2, 32, 32)).shape == (1, 4)


def test_user_function(tmp_path, monkeypatch):
    (tmp_path / "kd_user_models.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def tiny(num_classes, in_channels):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        def not_a_model(num_classes, in_channels):
            return 42

        def wrong_args(classes):
            return nn.Identity()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("kd_user_models:tiny", num_classes=5, in_channels=1)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    with pytest.raises(SpecError, match=r"returned int, expected a torch.nn.Module"):
        build_model("kd_user_models:not_a_model", num_classes=5, in_channels=1)
    with pytest.raises(SpecError, match="must accept keyword arguments num_classes and in_chan"):
        build_model("kd_user_models:wrong_args", num_classes=5, in_channels=1)
    with pytest.raises(SpecError, match="'kd_user_models' has no function 'missing'"):
        build_model("kd_user_models:missing", num_classes=5, in_channels=1)
    with pytest.raises(SpecError, match=r"cannot import module 'kd_no_such.module'"):
        build_model("kd_no_such.module:f", num_classes=5, in_channels=1)


@pytest.mark.parametrize(
    ("spec", "error", "fragment"),
    [
        (
            "resnt18",
            SpecError,
            "did you mean 'resnet18'\\? Valid: mlp, cnn, resnet, any torchvision",
        ),
        ("cnnn", SpecError, "did you mean 'cnn'"),
        ("zzzzqqq", SpecError, "unknown model 'zzzzqqq'; Valid: mlp, cnn"),
        ("mlp:abc", SpecError, "expected mlp, mlp:HIDDEN or mlp:H1,H2"),
        ("mlp:0", SpecError, "positive integers"),
        ("mlp:1,2,3", SpecError, "mlp:H1,H2"),
        ("cnn:4,4", SpecError, "cnn:WIDTH"),
        (":f", SpecError, "package.module:function"),
    ],
)
def test_bad_model_specs(spec, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        build_model(spec, num_classes=10, in_channels=1)
    assert "\n" not in str(info.value)


def test_bad_sizes():
    with pytest.raises(ConfigError, match="num_classes >= 1"):
        build_model("mlp", num_classes=0, in_channels=1)


def test_load_weights_plain_state_dict(tmp_path):
    source = build_model("cnn:4", num_classes=3, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    target = build_model("cnn:4", num_classes=3, in_channels=1)
    assert load_weights(target, tmp_path / "plain.pt") == {}
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_weights_checkpoint(tmp_path):
    source = build_model("mlp:8", num_classes=3, in_channels=1)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"state_dict": source.state_dict(), "model": "mlp:8", "epoch": 4, "history": [0.5, 0.25]},
        path,
    )
    target = build_model("mlp:8", num_classes=3, in_channels=1)
    assert load_weights(target, str(path)) == {"model": "mlp:8", "epoch": 4, "history": [0.5, 0.25]}
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(target(x), source(x))


def test_load_weights_mismatch_messages(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"state_dict": build_model("cnn", num_classes=5, in_channels=1).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("cnn", num_classes=10, in_channels=1), path, spec="cnn")
    message = str(info.value)
    assert message.startswith("weights in t.pt do not fit model 'cnn': shape mismatch for ")
    assert "checkpoint (5, 64) vs model (10, 64) and 1 more" in message
    assert "\n" not in message
    torch.save(build_model("mlp:8,8", num_classes=5, in_channels=1).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("mlp:8", num_classes=5, in_channels=1), path)
    assert str(info.value) == (
        "weights in t.pt do not fit model 'Sequential': 2 unexpected keys "
        "(6.weight, 6.bias), shape mismatch for 4.weight: checkpoint (8, 8) "
        "vs model (5, 8) and 1 more"
    )
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"4 missing keys \(2.weight, 2.bias, 4.weight, …\)"):
        load_weights(build_model("mlp:8", num_classes=5, in_channels=1), path, spec="mlp:8")


def test_load_weights_bad_files(tmp_path):
    model = build_model("mlp:4", num_classes=2, in_channels=1)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"cannot load .*junk.pt: it is corrupt") as info:
        load_weights(model, tmp_path / "junk.pt")
    assert "\n" not in str(info.value)
    torch.save({"state_dict": model.state_dict(), "extra": _Opaque()}, tmp_path / "untrusted.pt")
    with pytest.raises(CheckpointError, match="_Opaque") as info:
        load_weights(model, tmp_path / "untrusted.pt")
    assert "\n" not in str(info.value)
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_weights(model, tmp_path / "truncated.pt")
    assert "\n" not in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list that is not a state_dict"):
        load_weights(model, tmp_path / "list.pt")


def test_weights_sha256(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("mlp:4", num_classes=2, in_channels=1).state_dict(), path)
    digest = weights_sha256(path)
    assert len(digest) == 64
    assert digest == weights_sha256(str(path))
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="not found"):
        weights_sha256(tmp_path / "absent.pt")

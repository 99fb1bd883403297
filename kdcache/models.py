"""Models named by a spec string, and loading of weights files.

A spec is a builtin (``mlp``, ``mlp:HIDDEN``, ``mlp:H1,H2``, ``cnn``, ``cnn:WIDTH``,
``resnet``, ``resnet:WIDTH``), any
torchvision classification model name, ``timm:NAME`` for any timm model (the optional extra
``kdcache[timm]``), or ``package.module:function`` for a user-defined model. torchvision and timm
models are always randomly initialised: kdcache never downloads weights (``--weights`` loads a
state_dict).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import cast

import torch
import torchvision
from torch import nn

from kdcache.errors import CheckpointError, ConfigError, SpecError

# Without these, these models return namedtuples in train mode and warn about their init.
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build_model(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model a spec names, with ``num_classes`` outputs and ``in_channels`` inputs."""
    try:
        return _build(spec, num_classes=num_classes, in_channels=in_channels)
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise ConfigError(
            f"model {spec!r} with {num_classes} classes does not fit in memory "
            f"({_first_sentence(str(e)) or 'out of memory'}); choose a smaller model"
        ) from None


def _build(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"model {spec!r} needs num_classes >= 1 and in_channels >= 1, "
            f"got num_classes={num_classes}, in_channels={in_channels}"
        )
    name, sep, arg = spec.partition(":")
    builtin = MODELS.get(name)
    if builtin is not None:
        return builtin.build(spec, arg or builtin.default_argument, num_classes, in_channels)
    if name == TIMM_PREFIX and sep:
        return _timm_model(spec, arg, num_classes, in_channels)
    if sep:
        return _user_model(spec, name, arg, num_classes, in_channels)
    if spec in _torchvision_names():
        return _torchvision_model(spec, num_classes, in_channels)
    close = difflib.get_close_matches(spec, [*MODELS, *_torchvision_names()], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SpecError(
        f"unknown model {spec!r}; {hint}Valid: {', '.join(MODELS)}, any torchvision "
        "classification model (torchvision.models.list_models()), timm:NAME, or "
        "package.module:function"
    )


#: Widest hidden layer or channel count the builtin models accept.
MAX_BUILTIN_WIDTH = 1 << 16


def canonical_model_spec(spec: str) -> str:
    """``spec`` with its defaults spelled out, so that equal models compare equal
    (``mlp`` and ``mlp:128``); other specs are returned unchanged."""
    name, _, arg = spec.partition(":")
    builtin = MODELS.get(name)
    if builtin is not None:
        return f"{name}:{arg.replace(' ', '') or builtin.default_argument}"
    return spec


def _positive_ints(spec: str, arg: str, form: str) -> list[int]:
    if not arg:
        return []
    try:
        values = [int(v) for v in arg.split(",")]
    except ValueError:
        raise SpecError(f"malformed model spec {spec!r}; expected {form}") from None
    if any(v < 1 for v in values) or len(values) > 2:
        raise SpecError(f"malformed model spec {spec!r}; expected {form} (positive integers)")
    if any(v > MAX_BUILTIN_WIDTH for v in values):
        raise SpecError(
            f"model spec {spec!r} asks for a layer wider than {MAX_BUILTIN_WIDTH:,}; "
            f"expected {form}"
        )
    return values


def _mlp(spec: str, argument: str, num_classes: int, in_channels: int) -> nn.Module:
    hidden = _positive_ints(spec, argument, "mlp, mlp:HIDDEN or mlp:H1,H2, e.g. mlp:256,128")
    # Pooling to 8x8 is the identity on digits and lets the same MLP take any image size.
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d((8, 8)), nn.Flatten()]
    width = in_channels * 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(spec: str, argument: str, num_classes: int, in_channels: int) -> nn.Module:
    widths = _positive_ints(spec, argument, "cnn or cnn:WIDTH, e.g. cnn:32")
    if len(widths) > 1:
        raise SpecError(f"malformed model spec {spec!r}; expected cnn or cnn:WIDTH, e.g. cnn:32")
    width = widths[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 strided) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(spec: str, argument: str, num_classes: int, in_channels: int) -> nn.Module:
    """A CIFAR-style ResNet (He et al., CVPR 2016, section 4.2) for small images: a 3x3 stem
    without pooling, three stages of one basic block each at WIDTH, 2 WIDTH and 4 WIDTH channels
    (the last two halving the resolution), global average pooling: 8 weight layers."""
    widths = _positive_ints(spec, argument, "resnet or resnet:WIDTH, e.g. resnet:16")
    if len(widths) > 1:
        raise SpecError(
            f"malformed model spec {spec!r}; expected resnet or resnet:WIDTH, e.g. resnet:16"
        )
    width = widths[0]
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _BasicBlock(width, width, 1),
        _BasicBlock(width, 2 * width, 2),
        _BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


@dataclass(frozen=True)
class BuiltinModel:
    """One entry of :data:`MODELS`: an example spec, the argument a bare name stands for, and how
    it is built from ``(spec, argument, num_classes, in_channels)``."""

    example: str
    default_argument: str
    build: Callable[[str, str, int, int], nn.Module]


#: The models kdcache defines, by the name before any ``:``. Any other name is a torchvision
#: classification model, and ``package.module:function`` a user's.
MODELS: dict[str, BuiltinModel] = {
    "mlp": BuiltinModel("mlp:16,8", "128", _mlp),
    "cnn": BuiltinModel("cnn:4", "32", _cnn),
    "resnet": BuiltinModel("resnet:4", "16", _resnet),
}


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    model = torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **_TORCHVISION_KWARGS.get(name, {})
    )
    if in_channels != 3:
        path, conv = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
        if conv.groups != 1 and in_channels % conv.groups:
            raise ConfigError(
                f"model {name!r} cannot take in_channels={in_channels}: its first "
                f"convolution has {conv.groups} groups; use in_channels=3"
            )
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            cast(tuple[int, int], conv.kernel_size),
            stride=cast(tuple[int, int], conv.stride),
            padding=cast("str | tuple[int, int]", conv.padding),
            dilation=cast(tuple[int, int], conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, new)
    return model


#: The spec prefix of timm models: ``timm:NAME``.
TIMM_PREFIX = "timm"


def _require_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise SpecError(
            "timm:NAME models need timm, which is not installed; install it with "
            'pip install "kdcache[timm]" (or pip install -e ".[timm]" in a checkout)'
        ) from None
    return timm


def _timm_model(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm's ``create_model(name)``, never pretrained: ``name`` may carry a pretrained tag
    (``resnet50.a1_in1k``), which then only picks the architecture's configuration."""
    timm = _require_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SpecError(
            f"unknown timm model {name!r} in model spec {spec!r}; {hint}expected timm:NAME with "
            "NAME in timm.list_models()"
        )
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    except TypeError as e:  # an architecture whose constructor takes no in_chans
        raise ConfigError(
            f"timm model {name!r} cannot be built with num_classes={num_classes}, "
            f"in_channels={in_channels} ({_first_sentence(str(e))}); wrap timm.create_model in a "
            "package.module:function model"
        ) from None


def _user_model(
    spec: str, module_name: str, func_name: str, num_classes: int, in_channels: int
) -> nn.Module:
    form = "package.module:function"
    if not module_name or not func_name:
        raise SpecError(f"malformed model spec {spec!r}; expected {form}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(
            f"cannot import module {module_name!r} for model spec {spec!r} ({e}); "
            f"expected {form} with the module on PYTHONPATH"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SpecError(
            f"module {module_name!r} has no function {func_name!r} "
            f"(model spec {spec!r}); expected {form}"
        )
    try:
        inspect.signature(func).bind(num_classes=num_classes, in_channels=in_channels)
    except TypeError:
        raise SpecError(
            f"{spec} must accept keyword arguments num_classes and in_channels"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): just call it
    model = func(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path, *, spec: str | None = None) -> dict:
    """Load a state_dict (plain, or under key ``"state_dict"`` of a checkpoint) into ``model``.

    Returns the checkpoint's other keys as metadata ({} for a plain state_dict). ``spec`` only
    names the model in error messages. Only tensors and plain containers are unpickled.
    """
    path = Path(path)
    obj = _load_trusted(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, metadata = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, metadata = obj, {}
    else:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__} that is not a state_dict; "
            "expected torch.save(model.state_dict()) or a checkpoint dict with "
            "key 'state_dict'"
        )
    problems = _fit_problems(model, state)
    if problems:
        name = spec or type(model).__name__
        raise CheckpointError(f"weights in {path.name} do not fit model {name!r}: {problems}")
    model.load_state_dict(state)
    return metadata


def _load_trusted(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"weights file {path} not found; expected a file written by "
            "'kdcache train' or torch.save(model.state_dict(), path)"
        ) from None
    except pickle.UnpicklingError as e:
        # torch's message is many lines; its own reason follows this marker.
        reason = _first_sentence(str(e).partition("WeightsUnpickler error:")[2])
        raise CheckpointError(
            f"cannot load {path}: it is corrupt or holds objects other than "
            f"tensors and plain containers ({reason or 'unreadable pickle'}); "
            "kdcache only loads weights_only files: save "
            "model.state_dict() instead"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # torch.load of bytes that are not a torch.save file fails in any of these ways.
        reason = _first_sentence(str(e)) or type(e).__name__
        raise CheckpointError(
            f"cannot load {path}: the file is corrupt or not a torch.save file "
            f"({reason}); re-create it with torch.save"
        ) from None


def check_input_fits(model: nn.Module, input_shape: tuple[int, ...], *, spec: str) -> None:
    """Run ``model`` once on zeros of one sample's ``input_shape`` (on the model's device), so
    that inputs it cannot take (images too small for its pooling) fail before anything is
    written, in one line. User models (``package.module:function``) are not probed: an extra
    call could disturb models that count, time or gate their calls."""
    name, sep, _ = spec.partition(":")
    if sep and name not in MODELS and name != TIMM_PREFIX:
        return
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except (RuntimeError, ValueError, IndexError, AssertionError) as e:
        # timm's vision transformers assert their input size
        raise ConfigError(
            f"model {spec!r} cannot take inputs of shape {tuple(input_shape)} "
            f"({_first_sentence(str(e))}); use larger images or another model"
        ) from None
    finally:
        model.train(training)


def _first_sentence(text: str) -> str:
    """The first sentence of an error text, so that kdcache's message stays one line."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line.split(". ")[0][:200]


def _fit_problems(model: nn.Module, state: Mapping) -> str:
    """Summarise in one line how ``state`` fails to fit ``model`` ('' when it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and _shape(own[k]) != _shape(state[k])]
    parts = []
    for keys, what in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({shown})")
    if mismatched:
        k = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        parts.append(
            f"shape mismatch for {k}: checkpoint {_shape(state[k])} vs model {_shape(own[k])}{more}"
        )
    return ", ".join(parts)


def _shape(value: object) -> tuple[int, ...] | None:
    # Non-tensor entries (a module's extra_state) have no shape to compare.
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file's bytes, to record which teacher produced a store."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} not found; expected an existing file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path}: {e.strerror}") from None
    return digest.hexdigest()

"""An exponential moving average of a student's weights (``--ema-decay``): :class:`WeightAverage`.

After every optimisation step each floating-point entry of the student's ``state_dict`` (its
weights and its batch-norm statistics) moves the average towards it::

    average <- decay * average + (1 - decay) * weight

as timm's ``ModelEmaV3`` does (Polyak averaging; Tarvainen & Valpola, "Mean teachers are better
role models", NeurIPS 2017, for its use with students). Integer buffers (batch-norm's step
count) are not averaged. The run evaluates and saves the average by swapping it into the
student's own tensors for that time, so every task evaluates and saves it as it would the
student.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of ``model``'s floating-point weights and buffers, starting from
    them, with ``decay`` per :meth:`update`."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        state = model.state_dict()
        self.names = [name for name, value in state.items() if value.is_floating_point()]
        self.tensors = [state[name].detach().clone() for name in self.names]

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        """``model``'s own tensors for :attr:`names` (writing into them changes the model)."""
        state = model.state_dict()
        return [state[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights as they are now."""
        for average, live in zip(self.tensors, self._live(model), strict=True):
            average.lerp_(live, 1.0 - self.decay)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """``model`` holding the average for the duration, its own weights put back after."""
        live = self._live(model)
        kept = [tensor.clone() for tensor in live]
        with torch.no_grad():
            for tensor, average in zip(live, self.tensors, strict=True):
                tensor.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, own in zip(live, kept, strict=True):
                    tensor.copy_(own)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": dict(zip(self.names, self.tensors, strict=True))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a saved average (``--resume``); one of another model raises ``KeyError`` or
        ``RuntimeError``, as ``nn.Module.load_state_dict`` does."""
        saved = state["average"]
        if list(saved) != self.names:
            raise KeyError(f"the saved average holds other tensors than {len(self.names)} here")
        with torch.no_grad():
            for tensor, name in zip(self.tensors, self.names, strict=True):
                tensor.copy_(saved[name])

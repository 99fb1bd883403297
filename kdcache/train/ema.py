"""An exponential moving average of a student's weights (``--ema-decay``): :class:`WeightAverage`.

After every optimisation step each floating-point entry of the student's ``state_dict`` (its
weights and its batch-norm statistics) moves the average towards it::

    average <- decay * average + (1 - decay) * weight

as timm's ``ModelEmaV3`` does (Polyak averaging; Tarvainen & Valpola, "Mean teachers are better
role models", NeurIPS 2017, for its use with students). Integer buffers (batch-norm's step
count) are not averaged. The average of a bf16 or fp16 entry is kept in float32: at a decay of
0.9998 each update is far below half a bf16 step, and would round away. Entries that share
storage (a language model's tied embedding and head) are averaged once. The run evaluates and
saves the average by swapping it into the student's own tensors for that time, so every task
evaluates and saves it as it would the student.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]

#: The precision a half-precision entry is averaged in.
_AVERAGED_IN = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


class WeightAverage:
    """The moving average of ``model``'s floating-point weights and buffers, starting from
    them, with ``decay`` per :meth:`update`."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        state = model.state_dict()
        self.names: list[str] = []
        seen: set[tuple[Any, ...]] = set()
        for name, value in state.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                continue  # integer buffers and a module's extra state
            place = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
            )
            if place not in seen:  # a tied entry is the same tensor under another name
                seen.add(place)
                self.names.append(name)
        self.tensors = [
            state[name].detach().to(_averaged_dtype(state[name].dtype), copy=True)
            for name in self.names
        ]

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        """``model``'s own tensors for :attr:`names` (writing into them changes the model)."""
        state = model.state_dict()
        return [state[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights as they are now."""
        for average, live in zip(self.tensors, self._live(model), strict=True):
            average.lerp_(live.to(average.dtype), 1.0 - self.decay)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """``model`` holding the average for the duration, its own weights put back after.

        An entry averaged in its own dtype trades places with the average, one tensor at a
        time, so the swap costs no copy of the model; a half-precision one (averaged in
        float32) keeps a copy of itself."""
        live = self._live(model)
        kept = [
            None if tensor.dtype == average.dtype else tensor.clone()
            for tensor, average in zip(live, self.tensors, strict=True)
        ]
        self._trade(live, kept, restoring=False)
        try:
            yield
        finally:
            self._trade(live, kept, restoring=True)

    @torch.no_grad()
    def _trade(
        self, live: list[torch.Tensor], kept: list[torch.Tensor | None], *, restoring: bool
    ) -> None:
        """Put the average into ``live`` (or, ``restoring``, the student's own weights back): by
        exchange where nothing was ``kept``, else by copying the average or the kept weights."""
        for tensor, average, own in zip(live, self.tensors, kept, strict=True):
            if own is None:
                _exchange(tensor, average)
            else:
                tensor.copy_(own if restoring else average)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": dict(zip(self.names, self.tensors, strict=True))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a saved average (``--resume``); one of another model raises ``KeyError`` or
        ``RuntimeError``, as ``nn.Module.load_state_dict`` does."""
        saved = state["average"]
        if list(saved) != self.names:
            raise KeyError(f"the saved average holds other tensors than {len(self.names)} here")
        for tensor, name in zip(self.tensors, self.names, strict=True):
            if saved[name].shape != tensor.shape:
                raise RuntimeError(
                    f"the saved average of {name} has shape {tuple(saved[name].shape)}, the "
                    f"student's {tuple(tensor.shape)}"
                )
        with torch.no_grad():
            for tensor, name in zip(self.tensors, self.names, strict=True):
                tensor.copy_(saved[name])


def _averaged_dtype(dtype: torch.dtype) -> torch.dtype:
    return _AVERAGED_IN.get(dtype, dtype)


def _exchange(first: torch.Tensor, second: torch.Tensor) -> None:
    """Swap the values of two tensors of one shape and dtype, through one temporary copy."""
    held = first.clone()
    first.copy_(second)
    second.copy_(held)

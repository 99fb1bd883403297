"""A run's optimiser and learning-rate schedule: :func:`build_optimizer`, :func:`build_schedule`.

Adam, as kdcache always trained, unless ``--weight-decay`` asks for AdamW's decoupled decay; or
(``--optimizer sgd``) SGD with Nesterov momentum, timm's ``--opt sgd``, weight decay then being
SGD's L2 penalty. Either decays the weights only, as timm's ``param_groups_weight_decay``: biases
and normalisation parameters, the 1-D ones, are not decayed. The learning rate follows
:class:`LearningRateCurve`, stepped once per optimisation step, as the warm-up/cosine schedules
of timm and transformers are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kdcache.config import TrainingOptions

__all__ = ["LearningRateCurve", "build_optimizer", "build_schedule"]


def build_optimizer(model: nn.Module, config: TrainingOptions) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``model``'s parameters at ``config.lr``: Adam, or with
    ``config.weight_decay`` > 0 AdamW; SGD with ``config.momentum`` (Nesterov's where it is above
    0). Weight decay applies to the parameters of two or more dimensions only."""
    if config.optimizer == "adam" and config.weight_decay == 0:
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]
    kept = [group for group in groups if group["params"]]
    if config.optimizer == "sgd":
        momentum = config.momentum
        return torch.optim.SGD(kept, lr=config.lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(kept, lr=config.lr)


@dataclass(frozen=True)
class LearningRateCurve:
    """The factor of ``--lr`` at each optimisation step (0 is the first): linear from 0 over
    ``warmup_steps``, then 1 (constant), or a half cosine from 1 to ``min_factor`` at
    ``total_steps`` (cosine), the form of transformers' ``get_cosine_schedule_with_warmup``.

    An object rather than a lambda, so that :class:`LambdaLR` keeps it in its ``state_dict``.
    """

    schedule: str
    total_steps: int
    warmup_steps: int
    min_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * done))


def build_schedule(
    optimizer: torch.optim.Optimizer, config: TrainingOptions, *, steps_per_epoch: int
) -> LambdaLR:
    """The schedule of ``config`` for a run of ``config.epochs`` x ``steps_per_epoch`` steps;
    call its ``step()`` after each optimisation step."""
    curve = LearningRateCurve(
        schedule=config.lr_schedule,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        min_factor=config.min_lr / config.lr,
    )
    return LambdaLR(optimizer, curve)

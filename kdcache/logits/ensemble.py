"""An ensemble teacher's logits from its members' logits: the one definition that ``kdcache
merge`` writes into a store and multi-teacher distillation computes inside the loss.

Two modes, with weights w_i >= 0 normalised to sum to 1:

- ``mean``: the weighted mean of the raw logits, ``z = sum_i w_i z_i``; temperature-free, so
  the result can be softened at any T.
- ``mixture``: the probability-space mixture at temperature T, stored as logits

      z = T * log( sum_i w_i softmax(z_i / T) )

  so that ``softmax(z / T)`` is exactly the mixture at that T (at another T it is not a
  mixture of anything: distill it at the T it was mixed at).

Members given sparse (``topk:K``) enter with their tail filled for the temperature they are
softened at (:meth:`~kdcache.logits.sparse.SparseLogits.dense`): each member's distribution at
that T is then its stored top-K plus its exact tail mass spread uniformly, and the mixture of
those is again K' classes plus one uniform tail (exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdcache.choices import ENSEMBLE_MODES
from kdcache.errors import ConfigError
from kdcache.logits.sparse import SparseLogits, TeacherInput

MEAN, MIXTURE = ENSEMBLE_MODES
#: Where a merged store's metadata records how it was merged and from what (``extra``).
ENSEMBLE_KEY = "ensemble"


def check_mode(mode: str, *, option: str = "--mode") -> str:
    """``mode`` when it is one of :data:`ENSEMBLE_MODES`; refused in one line otherwise."""
    if mode not in ENSEMBLE_MODES:
        raise ConfigError(
            f"unknown ensemble mode {mode!r} for {option}; valid choices: "
            f"{', '.join(ENSEMBLE_MODES)}"
        )
    return mode


def ensemble_weights(
    weights: Sequence[float] | None, members: int, *, option: str = "--weights"
) -> tuple[float, ...]:
    """The members' weights normalised to sum to 1 (equal weights when ``weights`` is None or
    empty); refused in one line unless there is one finite weight >= 0 per member, not all 0."""
    if not weights:
        return (1.0 / members,) * members
    values = tuple(float(weight) for weight in weights)
    if len(values) != members:
        raise ConfigError(
            f"{option} lists {len(values)} weights for {members} teachers; give one per teacher "
            f"in the order of the stores, e.g. {option} {','.join(['1'] * members)}"
        )
    if not all(math.isfinite(weight) and weight >= 0 for weight in values) or not sum(values) > 0:
        raise ConfigError(
            f"{option} must be finite numbers >= 0, not all 0, got {','.join(map(str, values))}"
        )
    total = math.fsum(values)
    return tuple(weight / total for weight in values)


def mixture_temperature(extra: dict[str, Any]) -> float | None:
    """The T a merged store's ``mixture`` logits were mixed at (from its metadata's ``extra``);
    None for any other store, whose logits hold at every temperature."""
    record = extra.get(ENSEMBLE_KEY)
    if isinstance(record, dict) and record.get("mode") == MIXTURE:
        value = record.get("temperature")
        return float(value) if isinstance(value, int | float) else None
    return None


def member_logits(member: TeacherInput, temperature: float) -> Tensor:
    """One member's rows as dense float32 logits (B, C); a sparse member's tail is filled for
    ``temperature`` (its softmax at that T gives the tail its exact total mass)."""
    if isinstance(member, SparseLogits):
        return member.dense(temperature).float()
    return member.float()


def combine_logits(
    members: Sequence[TeacherInput],
    *,
    weights: Sequence[float],
    mode: str,
    temperature: float,
) -> Tensor:
    """The ensemble's float32 logits (B, C) of ``members`` (each (B, C), dense or sparse) with
    normalised ``weights`` (:func:`ensemble_weights`), in ``mode`` at ``temperature``.

    The arithmetic is fixed (float32 weighted sum in member order for ``mean``; float64
    log-sum-exp for ``mixture``), so a merged store and a multi-store run hold the same bits.
    ``temperature`` is the mixture's T; in ``mean`` mode it only fills sparse members' tails.
    """
    check_mode(mode)
    if len(members) != len(weights):
        raise ConfigError(f"{len(members)} teachers but {len(weights)} weights; give one each")
    dense = [member_logits(member, temperature) for member in members]
    shapes = {tuple(rows.shape) for rows in dense}
    if len(shapes) != 1:
        raise ConfigError(
            f"the teachers' rows differ in shape ({', '.join(map(str, sorted(shapes)))}); an "
            "ensemble needs the same rows and classes from every teacher"
        )
    if mode == MEAN:
        out = dense[0] * weights[0]
        for rows, weight in zip(dense[1:], weights[1:], strict=True):
            out = out + rows * weight
        return out
    log_terms = torch.stack(
        [
            torch.log_softmax(rows.double() / temperature, dim=1) + math.log(weight)
            if weight > 0
            else torch.full_like(rows, -math.inf, dtype=torch.float64)
            for rows, weight in zip(dense, weights, strict=True)
        ]
    )
    return (temperature * torch.logsumexp(log_terms, dim=0)).float()

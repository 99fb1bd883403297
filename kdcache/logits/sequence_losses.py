"""Token-level distillation losses for language models, from dense, top-k or sampled teacher rows.

A causal LM predicts a distribution over the vocabulary at every position. The student's logits
come as (B, L, V) with a boolean ``mask`` (B, L) of the positions that count (real tokens with a
next token; padding never counts); the teacher comes as one row per counted position, in
row-major order of the mask: a dense (n, V) tensor, a :class:`~kdcache.logits.sparse.SparseLogits`
(``topk:K`` store) or a :class:`~kdcache.logits.sampled.SampledLogits` (``sampled:S`` store). A
sparse teacher never becomes a dense (n, V) tensor, let alone (B, L, V): the vocabulary sums
split into the stored classes plus the tail classes, which all share one probability e (the
tail's exact mass at T spread uniformly, or 0 for sampled rows).

With p = p_T(teacher), q = p_T(student) at each counted position and n positions,

    L = alpha * T^2 * (1/n) sum_positions D(p, q) + (1 - alpha) * (1/n) sum_positions CE(s, y)

where y is the next token and D is one of :data:`TOKEN_LOSSES`:

- ``kd``: forward KL(p || q), Hinton et al. (2015) applied per token (Kim & Rush 2016, "word-level
  KD"); mode-covering.
- ``reverse``: KL(q || p), mode-seeking (Gu et al. 2024, MiniLLM). Needs p > 0 wherever q is, so
  sampled rows are refused.
- ``skew``: KL(p || lam p + (1 - lam) q), the skew KL of Ko et al. (2024, DistiLLM), bounded
  where q vanishes; ``lam`` = 0.1 there.
- ``js``: Jensen-Shannon, (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2 (Agarwal et al. 2024,
  GKD, at beta = 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import ConfigError
from kdcache.logits.loss_options import (
    ALPHA,
    SKEW,
    TEMPERATURE,
    TOKEN_LOSS_DECLARATIONS,
    check_alpha,
    check_skew,
    check_temperature,
)
from kdcache.logits.sampled import SampledLogits, check_draws_temperature
from kdcache.logits.sparse import SparseLogits

#: Teacher rows as the token-level losses accept them.
TokenTeacher = Tensor | SparseLogits | SampledLogits

#: Target of the ignored positions in ``targets``, as in torch's cross_entropy.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Rows:
    """p at the explicit classes (n, K) and one probability e (n,) for every other class.

    For a dense teacher K = V, ``indices`` is None and there is no other class.
    """

    probs: Tensor
    log_probs: Tensor
    indices: Tensor | None
    other: Tensor
    other_log: Tensor
    num_other: int
    #: Rows of draws (sampled:S): p is zero outside the drawn classes.
    draws: bool = False


def _teacher_rows(teacher: TokenTeacher, temperature: float, dtype: torch.dtype) -> _Rows:
    if isinstance(teacher, SparseLogits):
        sparse = teacher.detach().to(teacher.values.device, dtype)
        top, tail = sparse.log_probs(temperature)
        each = tail - math.log(sparse.num_tail) if sparse.num_tail else tail
        return _Rows(top.exp(), top, sparse.indices, each.exp(), each, sparse.num_tail)
    if isinstance(teacher, SampledLogits):
        check_draws_temperature(temperature)
        probs = teacher.probs.detach().to(dtype)
        zero = torch.zeros_like(probs[:, 0])
        num_other = teacher.num_classes - probs.shape[1]
        return _Rows(probs, torch.log(probs), teacher.indices, zero, zero.log(), num_other, True)
    log_probs = F.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    empty = torch.zeros_like(log_probs[:, 0])
    return _Rows(log_probs.exp(), log_probs, None, empty, empty, 0)


def _xlogy_diff(p: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """p * (log p - log r) with 0 where p = 0 (the limit), elementwise."""
    return torch.where(p > 0, p * (log_p - log_r), 0.0)


def _skew_terms(lam: float, p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor) -> Tensor:
    mix = torch.log(lam * p + (1 - lam) * q)
    return _xlogy_diff(p, log_p, mix)


def _js_terms(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor) -> Tensor:
    mix = torch.log(0.5 * (p + q))
    return 0.5 * (_xlogy_diff(p, log_p, mix) + _xlogy_diff(q, log_q, mix))


def divergence(name: str, teacher: _Rows, log_q: Tensor, *, skew: float = 0.1) -> Tensor:
    """D(p, q) per position (n,), summed over the whole vocabulary of ``log_q`` (n, V)."""
    if name == "kd":
        return _forward_kl(teacher, log_q)
    q = log_q.exp()
    if teacher.indices is None:
        p, log_p = teacher.probs, teacher.log_probs
        if name == "reverse":
            return _xlogy_diff(q, log_q, log_p).sum(dim=-1)
        if name == "skew":
            return _skew_terms(skew, p, log_p, q, log_q).sum(dim=-1)
        return _js_terms(p, log_p, q, log_q).sum(dim=-1)
    p, log_p, indices = teacher.probs, teacher.log_probs, teacher.indices
    e, log_e = teacher.other[:, None], teacher.other_log[:, None]
    log_q_top = log_q.gather(1, indices)
    q_top = log_q_top.exp()
    if name == "reverse":
        if teacher.draws:
            raise ConfigError(
                "reverse KL needs the teacher's probability of every token the student may "
                "predict; a sampled:S store keeps only draws: use --loss kd, skew or js with it, "
                "or dump with topk:K"
            )
        entropy_part = (q * log_q).sum(dim=-1)
        cross = (q_top * log_p).sum(dim=-1)
        if teacher.num_other:
            cross = cross + (1 - q_top.sum(dim=-1)).clamp_min(0.0) * log_e[:, 0]
        return entropy_part - cross

    def terms(pp: Tensor, log_pp: Tensor, qq: Tensor, log_qq: Tensor) -> Tensor:
        if name == "skew":
            return _skew_terms(skew, pp, log_pp, qq, log_qq)
        return _js_terms(pp, log_pp, qq, log_qq)

    # Every class as if it were an "other" one (a function of q and one number per row, as big
    # as the student's own softmax), then the stored classes swapped in.
    every = terms(e.expand_as(q), log_e.expand_as(q), q, log_q).sum(dim=-1)
    as_other = terms(e.expand_as(q_top), log_e.expand_as(q_top), q_top, log_q_top).sum(dim=-1)
    return every - as_other + terms(p, log_p, q_top, log_q_top).sum(dim=-1)


def _forward_kl(teacher: _Rows, log_q: Tensor) -> Tensor:
    """KL(p || q) per position (n,); for stored classes, the other ones in closed form:
    sum_other e (log e - log q) = n_other e log e - e sum_other log q."""
    if teacher.indices is None:
        return _xlogy_diff(teacher.probs, teacher.log_probs, log_q).sum(dim=-1)
    log_q_top = log_q.gather(1, teacher.indices)
    top = _xlogy_diff(teacher.probs, teacher.log_probs, log_q_top).sum(dim=-1)
    rest = log_q.sum(dim=-1) - log_q_top.sum(dim=-1)
    e, log_e = teacher.other, teacher.other_log
    return top + torch.where(e > 0, e * (teacher.num_other * log_e - rest), 0.0)


def _scaled(rows: Tensor, temperature: float) -> Tensor:
    return rows if temperature == 1.0 else rows / temperature


class _ForwardKLAndCE(torch.autograd.Function):
    """(mean KL(p || q_T), mean CE) over the rows, with the gradient in closed form.

    For teacher weights w (p at the stored classes, e at each other one, W = sum w; W = 1 up to
    rounding), d KL / d s_j = (W q_T,j - w_j) / T and d CE / d s_j = q_1,j - [j = y]: one V-wide
    softmax per temperature (shared when T = 1) and no V-wide tensor of the teacher, where
    autograd through the formula keeps several (n, V) intermediates and a second log-softmax.
    """

    @staticmethod
    def forward(
        ctx: Any, rows: Tensor, teacher: _Rows, targets: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor]:
        log_q = F.log_softmax(_scaled(rows, temperature), dim=-1)
        log_q1 = log_q if temperature == 1.0 else F.log_softmax(rows, dim=-1)
        soft = _forward_kl(teacher, log_q).mean()
        hard = F.nll_loss(log_q1, targets)
        ctx.save_for_backward(log_q, log_q1, targets)
        ctx.teacher, ctx.temperature = teacher, temperature
        return soft, hard

    @staticmethod
    def backward(
        ctx: Any, grad_soft: Tensor, grad_hard: Tensor
    ) -> tuple[Tensor | None, None, None, None]:
        log_q, log_q1, targets = ctx.saved_tensors
        teacher, temperature = ctx.teacher, ctx.temperature
        n = log_q.shape[0]
        soft_scale = grad_soft / (n * temperature)
        hard_scale = grad_hard / n
        if teacher.indices is None:
            weight, other = teacher.probs, None
            total = weight.sum(dim=-1, keepdim=True)
        else:
            weight = torch.where(teacher.probs > 0, teacher.probs, 0.0)
            other = torch.where(teacher.other > 0, teacher.other, 0.0)[:, None]
            total = weight.sum(dim=-1, keepdim=True) + teacher.num_other * other
        # Two passes over (n, V): the exp, then one multiply(-add) in place.
        grad = log_q.exp()
        if log_q1 is log_q:
            grad.mul_(total * soft_scale + hard_scale)
        else:
            grad.mul_(total * soft_scale).add_(log_q1.exp().mul_(hard_scale))
        if other is None:
            grad.sub_(weight * soft_scale)
        else:
            if not teacher.draws:  # sampled rows give the other classes p = 0
                grad.sub_(other * soft_scale)
            # a stored class's weight is its p, not e (a class stored twice holds p = 0 twice)
            grad.scatter_add_(1, teacher.indices, (other - weight) * soft_scale)
        grad.scatter_add_(1, targets[:, None], (-hard_scale).expand(n, 1).to(grad.dtype))
        return grad, None, None, None


class TokenDistillationLoss(nn.Module):
    """Token-level distillation of a causal LM: ``alpha`` * T^2 * D(p, q) + (1 - alpha) * CE.

    ``forward(student_logits (B, L, V), teacher rows (n, ...), targets (B, L), mask (B, L))``
    returns a dict with ``total``, ``soft`` (T^2 * mean D over the n positions), ``hard`` (mean
    next-token CE at the same positions) and ``tokens`` (n). Positions outside ``mask`` (padding,
    the last token of each sequence) contribute nothing; with none inside it, every term is a zero
    that backward passes through (no gradient), not a NaN mean over no position.
    """

    def __init__(
        self,
        *,
        divergence: str = "kd",
        temperature: float = TEMPERATURE.default,
        alpha: float = ALPHA.default,
        skew: float = SKEW.default,
    ) -> None:
        super().__init__()
        if divergence not in TOKEN_LOSS_DECLARATIONS:
            raise ConfigError(
                f"unknown token-level loss {divergence!r}; valid choices: "
                f"{', '.join(TOKEN_LOSS_DECLARATIONS)}"
            )
        self.divergence = divergence
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.skew = check_skew(skew)

    def forward(
        self, student_logits: Tensor, teacher: TokenTeacher, targets: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
            raise ConfigError(
                "student_logits must be (batch, length, vocab) with mask (batch, length), got "
                f"{tuple(student_logits.shape)} and {tuple(mask.shape)}"
            )
        rows = student_logits[mask]
        num_rows, width = teacher.shape[0], teacher.shape[1]
        if num_rows != rows.shape[0] or width != rows.shape[1]:
            raise ConfigError(
                f"expected {rows.shape[0]} teacher rows of {rows.shape[1]} classes (one per "
                f"masked position), got ({num_rows}, {width}); the store or teacher does not "
                "match these sequences"
            )
        dtype = torch.float32 if torch.finfo(rows.dtype).bits < 32 else rows.dtype
        rows = rows.to(dtype)
        if rows.shape[0] == 0:
            # A batch whose labels are all masked: a mean over no position would be NaN. The
            # sum over no row is 0 and on the graph, so backward runs and DDP ranks stay in step.
            zero = rows.sum()
            return {"total": zero, "soft": zero, "hard": zero, "tokens": torch.tensor(0)}
        t = self.temperature
        teacher_rows = _teacher_rows(teacher, t, dtype)
        if self.divergence == "kd":
            kl, hard = _ForwardKLAndCE.apply(rows, teacher_rows, targets[mask], t)
            soft = kl * t**2
        else:
            log_q = F.log_softmax(_scaled(rows, t), dim=-1)
            soft = divergence(self.divergence, teacher_rows, log_q, skew=self.skew).mean() * t**2
            hard = F.cross_entropy(rows, targets[mask])
        return {
            "total": self.alpha * soft + (1 - self.alpha) * hard,
            "soft": soft,
            "hard": hard,
            "tokens": torch.tensor(rows.shape[0]),
        }

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, "
            f"alpha={self.alpha}, skew={self.skew}"
        )


#: The token-level losses by the names
#: :data:`~kdcache.logits.loss_options.TOKEN_LOSS_DECLARATIONS` declares, in its order.
TOKEN_LOSSES: dict[str, Callable[..., nn.Module]] = {
    name: partial(TokenDistillationLoss, divergence=name) for name in TOKEN_LOSS_DECLARATIONS
}

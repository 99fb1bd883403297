"""Distillation losses computed from teacher logits (live or read back from a logit store).

All three losses follow Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
Network" (arXiv:1503.02531): the student matches the teacher's temperature-softened
distribution

    p_T(z)_c = exp(z_c / T) / sum_j exp(z_j / T)

through a KL divergence scaled by T^2 (which keeps the soft gradients' magnitude independent of
T), blended with the ordinary cross-entropy on the hard labels:

    L = alpha * L_soft + (1 - alpha) * CE(z_student, y)

A label of -1 (:data:`UNLABELED`) marks a sample without one: it is left out of the CE term, and
with alpha = 1 the loss is L_soft alone, so an unlabeled batch distils on the teacher only.

Logits of shape (B, C) in float16/bfloat16 are computed in float32; float32 and float64 inputs
keep their dtype, so float32 results equal the reference formulas to rounding. The teacher side
is always detached: the teacher is a fixed target, never trained through the loss.

The teacher may also be a :class:`~kdcache.logits.sparse.SparseLogits` read from a ``topk:K``
store: its
K stored classes plus the tail's total mass at T, spread uniformly over the other C - K classes.
The losses then never build a dense (B, C) teacher tensor, and equal the dense losses on
``teacher.dense(T)`` (the store's reconstruction at T) to rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import ConfigError, SpecError
from kdcache.logits.loss_options import (
    ALPHA,
    GAMMA,
    IMAGE_LOSSES,
    TEMPERATURE,
    TOP_K,
    check_alpha,
    check_gamma,
    check_temperature,
    check_top_k,
)
from kdcache.logits.sparse import SparseLogits, TeacherInput

#: The label of a sample that has none (an unlabeled transfer set): it adds nothing to the hard
#: term, and ``alpha = 1`` (soft targets only) drops that term altogether.
UNLABELED = -1
REDUCTIONS = ("mean", "sum", "none")

# Keeps log(p) finite where the softened teacher probability underflows to zero; the value is
# the reference formulation's, so per-sample KL terms match it exactly.
_LOG_EPS = 1e-10


def _check_inputs(student_logits: Tensor, teacher_logits: TeacherInput, labels: Tensor) -> None:
    checked = [("student_logits", student_logits)]
    if not isinstance(teacher_logits, SparseLogits):
        checked.append(("teacher_logits", teacher_logits))
    for name, logits in checked:
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ConfigError(
                f"{name} must be a 2-D floating-point tensor (batch, classes), "
                f"got shape {tuple(logits.shape)} and dtype {logits.dtype}"
            )
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ConfigError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    batch = student_logits.shape[0]
    if labels.shape != (batch,) or labels.is_floating_point() or labels.is_complex():
        raise ConfigError(
            f"labels must be an integer tensor of shape ({batch},) holding class indices, "
            f"got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision softmax/log over many classes loses too much to be a training target.
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


@dataclass(frozen=True)
class _TeacherTargets:
    """The teacher's softened distribution p_T, shape (B, C)."""

    probs: Tensor

    @property
    def log_probs(self) -> Tensor:
        """log(p_T + 1e-10): finite even where p_T is exactly zero."""
        return torch.log(self.probs + _LOG_EPS)

    def max_prob(self) -> Tensor:
        return self.probs.max(dim=1).values

    def mean_kl(self, student_log_probs: Tensor) -> Tensor:
        """(1/B) sum_i KL(p_i || q_i), KD's soft term before the T^2 factor."""
        # kl_div's own xlogy(p, p) and batch sum: this is the reference formulation, and at
        # T = 16 a differently ordered sum drifts by ~3e-5 once scaled by T^2.
        return F.kl_div(student_log_probs, self.probs, reduction="batchmean")

    def kl(self, student_log_probs: Tensor, *, top_k: int | None = None) -> Tensor:
        """Per-sample sum_c p_c (log(p_c + 1e-10) - log q_c), over the top_k classes of p when
        given."""
        terms = self.probs * (self.log_probs - student_log_probs)
        if top_k is not None:
            top = self.probs.topk(top_k, dim=1).indices
            # Multiplying by a 0/1 mask (not gathering) keeps the reference's summation order.
            terms = terms * torch.zeros_like(self.probs).scatter_(1, top, 1.0)
        return terms.sum(dim=1)


@dataclass(frozen=True)
class _SparseTargets:
    """p_T of a sparse teacher: K stored classes (B, K), and the tail's mass spread uniformly."""

    top_log_probs: Tensor
    tail_log_mass: Tensor
    indices: Tensor
    num_tail: int

    def max_prob(self) -> Tensor:
        # The stored classes are the largest and descending; the tail's share never exceeds them.
        return self.top_log_probs[:, 0].exp()

    def mean_kl(self, student_log_probs: Tensor) -> Tensor:
        return self._kl(student_log_probs, eps=False).mean()

    def kl(self, student_log_probs: Tensor, *, top_k: int | None = None) -> Tensor:
        if top_k is not None and top_k > self.indices.shape[1]:
            raise ConfigError(
                f"top_k must be at most the {self.indices.shape[1]} classes a topk:"
                f"{self.indices.shape[1]} store keeps, got {top_k}; lower --top-k or dump with "
                f"--encoding topk:{top_k}"
            )
        return self._kl(student_log_probs, eps=True, top_k=top_k)

    def _kl(self, student_log_probs: Tensor, *, eps: bool, top_k: int | None = None) -> Tensor:
        """As :meth:`_TeacherTargets.kl` (``eps``) or kl_div's terms, the C - K tail terms summed
        in closed form: sum_tail q-terms = sum over all classes - sum over the stored ones."""
        top_probs = self.top_log_probs.exp()
        top_student = student_log_probs.gather(1, self.indices)
        top_log = torch.log(top_probs + _LOG_EPS) if eps else self.top_log_probs
        top_terms = torch.where(top_probs > 0, top_probs * (top_log - top_student), 0.0)
        if top_k is not None:
            return top_terms[:, :top_k].sum(dim=1)
        if self.num_tail == 0:
            return top_terms.sum(dim=1)
        mass = self.tail_log_mass.exp()
        each_log = self.tail_log_mass - math.log(self.num_tail)
        each_log = torch.log(each_log.exp() + _LOG_EPS) if eps else each_log
        tail_student = student_log_probs.sum(dim=1) - top_student.sum(dim=1)
        tail = torch.where(mass > 0, mass * each_log - mass / self.num_tail * tail_student, 0.0)
        return top_terms.sum(dim=1) + tail


def _teacher_targets(
    teacher_logits: TeacherInput, temperature: float, dtype: torch.dtype
) -> _TeacherTargets | _SparseTargets:
    """Every loss gets its teacher distribution here, the one place that reads teacher logits."""
    if isinstance(teacher_logits, SparseLogits):
        sparse = teacher_logits.detach().to(teacher_logits.values.device, dtype)
        top, tail = sparse.log_probs(temperature)
        return _SparseTargets(top, tail, sparse.indices, sparse.num_tail)
    probs = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    return _TeacherTargets(probs)


def _prepare(
    student_logits: Tensor, teacher_logits: TeacherInput, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor, _TeacherTargets | _SparseTargets]:
    """Validate, then return student logits and log q_T in the compute dtype, and p_T."""
    _check_inputs(student_logits, teacher_logits, labels)
    teacher_values = (
        teacher_logits.values if isinstance(teacher_logits, SparseLogits) else teacher_logits
    )
    dtype = _compute_dtype(student_logits, teacher_values)
    student = student_logits.to(dtype)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    return student, student_log_probs, _teacher_targets(teacher_logits, temperature, dtype)


def _blend(
    alpha: float, soft: Tensor, student: Tensor, labels: Tensor, *, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """``alpha * soft + (1 - alpha) * CE(student, labels)`` and the CE term.

    Labels equal to :data:`UNLABELED` add nothing to the CE term; with alpha = 1 the total is the
    soft term alone, so a batch without any label (CE undefined, NaN) still trains.
    """
    hard = F.cross_entropy(student, labels, reduction=reduction, ignore_index=UNLABELED)
    if alpha == 1.0:
        return (soft.expand_as(hard) if hard.dim() else soft), hard
    return alpha * soft + (1 - alpha) * hard, hard


class LogitsDistillationLoss(nn.Module):
    """Classic knowledge-distillation loss (Hinton et al., 2015).

    L_soft = T^2 * (1/B) * sum_i KL(p_T(t_i) || p_T(s_i)),   L_hard = CE(s, y)
    L      = alpha * L_soft + (1 - alpha) * L_hard

    ``forward`` returns a dict: ``total``, ``soft``, ``hard``, ``teacher_probs`` (p_T of the
    teacher, (B, C); absent for a sparse teacher, which never becomes dense) and
    ``student_probs`` (the student's softmax at T = 1, (B, C)). The KL term is always averaged
    over the batch; ``reduction`` ("mean", "sum" or "none") applies to the cross-entropy only,
    so with "none" ``hard`` and ``total`` have shape (B,).
    """

    def __init__(
        self,
        temperature: float = TEMPERATURE.default,
        alpha: float = ALPHA.default,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(
                f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}"
            )
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.reduction = reduction

    def forward(
        self, student_logits: Tensor, teacher_logits: TeacherInput, labels: Tensor
    ) -> dict[str, Tensor]:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        soft = teacher.mean_kl(student_log_probs) * t**2
        total, hard = _blend(self.alpha, soft, student, labels, reduction=self.reduction)
        output = {
            "total": total,
            "soft": soft,
            "hard": hard,
            "student_probs": F.softmax(student, dim=1),
        }
        if isinstance(teacher, _TeacherTargets):
            output["teacher_probs"] = teacher.probs
        return output

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"


class FocalDistillationLoss(nn.Module):
    """Distillation weighted towards samples the teacher itself is unsure about.

    w_i    = (1 - max_c p_T(t_i)_c)^gamma
    L_soft = T^2 * (1/B) * sum_i w_i * sum_c p_c (log(p_c + 1e-10) - log q_c)
    L      = alpha * L_soft + (1 - alpha) * CE(s, y)

    with p = p_T(t_i), q = p_T(s_i); the weight follows the focal loss of Lin et al. (2017),
    "Focal Loss for Dense Object Detection", applied to the teacher's confidence. Returns the
    scalar L; gamma = 0 gives the plain KD loss.
    """

    def __init__(
        self,
        temperature: float = TEMPERATURE.default,
        alpha: float = ALPHA.default,
        gamma: float = GAMMA.default,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.gamma = check_gamma(gamma)

    def forward(
        self, student_logits: Tensor, teacher_logits: TeacherInput, labels: Tensor
    ) -> Tensor:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        weight = (1 - teacher.max_prob()) ** self.gamma
        kl = teacher.kl(student_log_probs)
        soft = (weight * kl).mean() * t**2
        return _blend(self.alpha, soft, student, labels)[0]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, gamma={self.gamma}"


class AttentionLogitsLoss(nn.Module):
    """Distillation restricted to the teacher's top-k classes.

    K_i    = the top_k classes of p_T(t_i)
    L_soft = T^2 * (1/B) * sum_i sum_{c in K_i} p_c (log(p_c + 1e-10) - log q_c)
    L      = alpha * L_soft + (1 - alpha) * CE(s, y)

    with p = p_T(t_i), q = p_T(s_i) (both still normalised over all C classes); this is the
    top-k variant of Hinton et al. (2015). Returns the scalar L; top_k = C gives the plain KD loss.

    Over a ``topk:K`` store (sparse or its dense reconstruction) with top_k <= K this is exactly
    top-k-only distillation: K_i are the stored classes, which are the teacher's true top ones,
    and the tail enters only through the normalisation of p. A sparse teacher refuses top_k > K,
    since beyond K the tail classes tie and any choice among them would be arbitrary.
    """

    def __init__(
        self,
        temperature: float = TEMPERATURE.default,
        alpha: float = ALPHA.default,
        top_k: int = int(TOP_K.default),
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.top_k = check_top_k(top_k)

    def forward(
        self, student_logits: Tensor, teacher_logits: TeacherInput, labels: Tensor
    ) -> Tensor:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        num_classes = student.shape[1]
        if self.top_k > num_classes:
            raise ConfigError(
                f"top_k must be in [1, {num_classes}] (the number of classes), got {self.top_k}"
            )
        soft = teacher.kl(student_log_probs, top_k=self.top_k).mean() * t**2
        return _blend(self.alpha, soft, student, labels)[0]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, top_k={self.top_k}"


_IMPLEMENTATIONS = {
    loss.__name__: loss
    for loss in (LogitsDistillationLoss, FocalDistillationLoss, AttentionLogitsLoss)
}
#: The image losses by the names :data:`~kdcache.logits.loss_options.IMAGE_LOSSES` declares
#: (with their hyper-parameters), in its order.
LOSSES: dict[str, type[nn.Module]] = {
    name: _IMPLEMENTATIONS[declaration.implementation] for name, declaration in IMAGE_LOSSES.items()
}


def build_loss(name: str, **hyper_parameters: float) -> nn.Module:
    """The image loss called ``name`` (a key of :data:`LOSSES`) from those of
    ``hyper_parameters`` its constructor takes (``gamma`` is focal's, ``top_k`` attention's)."""
    if name not in LOSSES:
        raise SpecError(f"unknown loss {name!r}; valid choices: {', '.join(LOSSES)}")
    return construct(LOSSES[name], hyper_parameters)


def construct(loss: Callable[..., nn.Module], hyper_parameters: Mapping[str, Any]) -> nn.Module:
    """``loss(**hyper_parameters)`` keeping only the keyword arguments it accepts: each loss owns
    its hyper-parameters, the callers pass every one they have."""
    accepted = inspect.signature(loss).parameters
    return loss(**{key: value for key, value in hyper_parameters.items() if key in accepted})


def total_loss(output: Tensor | Mapping[str, Tensor]) -> Tensor:
    """The loss to back-propagate: ``output["total"]`` for a dict, the tensor itself otherwise."""
    return output["total"] if isinstance(output, Mapping) else output

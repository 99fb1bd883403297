"""Distillation losses computed from teacher logits (live or read back from a logit store).

All three losses follow Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
Network" (arXiv:1503.02531): the student matches the teacher's temperature-softened
distribution

    p_T(z)_c = exp(z_c / T) / sum_j exp(z_j / T)

through a KL divergence scaled by T^2 (which keeps the soft gradients' magnitude independent of
T), blended with the ordinary cross-entropy on the hard labels:

    L = alpha * L_soft + (1 - alpha) * CE(z_student, y)

Logits of shape (B, C) in float16/bfloat16 are computed in float32; float32 and float64 inputs
keep their dtype, so float32 results equal the reference formulas to rounding. The teacher side
is always detached: the teacher is a fixed target, never trained through the loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import ConfigError, SpecError

LOSS_NAMES = ("kd", "focal", "attention")
REDUCTIONS = ("mean", "sum", "none")

# Keeps log(p) finite where the softened teacher probability underflows to zero; the value is
# the reference formulation's, so per-sample KL terms match it exactly.
_LOG_EPS = 1e-10


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_temperature(temperature: float) -> float:
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_alpha(alpha: float) -> float:
    # Written so that NaN fails the range test too.
    if not (_is_real(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ConfigError(
                f"{name} must be a 2-D floating-point tensor (batch, classes), "
                f"got shape {tuple(logits.shape)} and dtype {logits.dtype}"
            )
    if student_logits.shape != teacher_logits.shape:
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


def _teacher_targets(
    teacher_logits: Tensor, temperature: float, dtype: torch.dtype
) -> _TeacherTargets:
    """Every loss gets its teacher distribution here, the one place that reads teacher logits."""
    probs = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    return _TeacherTargets(probs)


def _prepare(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor, _TeacherTargets]:
    """Validate, then return student logits and log q_T in the compute dtype, and p_T."""
    _check_inputs(student_logits, teacher_logits, labels)
    dtype = _compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    return student, student_log_probs, _teacher_targets(teacher_logits, temperature, dtype)


def _kl_terms(teacher: _TeacherTargets, student_log_probs: Tensor) -> Tensor:
    """Per-class terms p_c (log(p_c + 1e-10) - log q_c), shape (B, C); sum over c gives KL."""
    return teacher.probs * (teacher.log_probs - student_log_probs)


class LogitsDistillationLoss(nn.Module):
    """Classic knowledge-distillation loss (Hinton et al., 2015).

    L_soft = T^2 * (1/B) * sum_i KL(p_T(t_i) || p_T(s_i)),   L_hard = CE(s, y)
    L      = alpha * L_soft + (1 - alpha) * L_hard

    ``forward`` returns a dict: ``total``, ``soft``, ``hard``, ``teacher_probs`` (p_T of the
    teacher, (B, C)) and ``student_probs`` (the student's softmax at T = 1, (B, C)). The KL term
    is always averaged over the batch; ``reduction`` ("mean", "sum" or "none") applies to the
    cross-entropy only, so with "none" ``hard`` and ``total`` have shape (B,).
    """

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.7, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(
                f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}"
            )
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_alpha(alpha)
        self.reduction = reduction

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> dict[str, Tensor]:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        # kl_div's own xlogy(p, p) rather than _kl_terms: this is the reference formulation, and
        # at T = 16 a differently ordered sum drifts by ~3e-5 once scaled by T^2.
        soft = F.kl_div(student_log_probs, teacher.probs, reduction="batchmean") * t**2
        hard = F.cross_entropy(student, labels, reduction=self.reduction)
        return {
            "total": self.alpha * soft + (1 - self.alpha) * hard,
            "soft": soft,
            "hard": hard,
            "teacher_probs": teacher.probs,
            "student_probs": F.softmax(student, dim=1),
        }

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

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7, gamma: float = 2.0) -> None:
        super().__init__()
        if not (_is_real(gamma) and math.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_alpha(alpha)
        self.gamma = float(gamma)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        weight = (1 - teacher.probs.max(dim=1).values) ** self.gamma
        kl = _kl_terms(teacher, student_log_probs).sum(dim=1)
        soft = (weight * kl).mean() * t**2
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student, labels)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, gamma={self.gamma}"


class AttentionLogitsLoss(nn.Module):
    """Distillation restricted to the teacher's top-k classes.

    K_i    = the top_k classes of p_T(t_i)
    L_soft = T^2 * (1/B) * sum_i sum_{c in K_i} p_c (log(p_c + 1e-10) - log q_c)
    L      = alpha * L_soft + (1 - alpha) * CE(s, y)

    with p = p_T(t_i), q = p_T(s_i) (both still normalised over all C classes); this is the
    top-k variant of Hinton et al. (2015). Returns the scalar L; top_k = C gives the plain KD loss.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7, top_k: int = 5) -> None:
        super().__init__()
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_alpha(alpha)
        self.top_k = top_k

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        t = self.temperature
        student, student_log_probs, teacher = _prepare(student_logits, teacher_logits, labels, t)
        num_classes = student.shape[1]
        if self.top_k > num_classes:
            raise ConfigError(
                f"top_k must be in [1, {num_classes}] (the number of classes), got {self.top_k}"
            )
        top = teacher.probs.topk(self.top_k, dim=1).indices
        mask = torch.zeros_like(teacher.probs).scatter_(1, top, 1.0)
        # Multiplying by a 0/1 mask (not gathering) keeps the reference's summation order.
        soft = (_kl_terms(teacher, student_log_probs) * mask).sum(dim=1).mean() * t**2
        return self.alpha * soft + (1 - self.alpha) * F.cross_entropy(student, labels)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, top_k={self.top_k}"


def build_loss(
    name: str, *, temperature: float, alpha: float, gamma: float = 2.0, top_k: int = 5
) -> nn.Module:
    """Build the loss called ``name`` (one of LOSS_NAMES); ``gamma`` is read by "focal" only and
    ``top_k`` by "attention" only."""
    if name == "kd":
        return LogitsDistillationLoss(temperature=temperature, alpha=alpha)
    if name == "focal":
        return FocalDistillationLoss(temperature=temperature, alpha=alpha, gamma=gamma)
    if name == "attention":
        return AttentionLogitsLoss(temperature=temperature, alpha=alpha, top_k=top_k)
    raise SpecError(f"unknown loss {name!r}; valid choices: {', '.join(LOSS_NAMES)}")


def total_loss(output: Tensor | Mapping[str, Tensor]) -> Tensor:
    """The loss to back-propagate: ``output["total"]`` for a dict, the tensor itself otherwise."""
    return output["total"] if isinstance(output, Mapping) else output

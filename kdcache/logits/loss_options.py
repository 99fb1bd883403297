"""Every distillation loss's name, hyper-parameters, defaults and bounds, declared once, torch-free.

:data:`IMAGE_LOSSES` and :data:`TOKEN_LOSS_DECLARATIONS` name each loss and the
:class:`HyperParameter` objects it takes; each hyper-parameter holds its default, its check
(the bounds, for images and tokens alike) and its help. The loss classes
(:mod:`kdcache.logits.losses`, :mod:`kdcache.logits.sequence_losses`) take their defaults and
checks from here and build their registries from these names; the option declarations
(:mod:`kdcache.config`) read them when the CLI loads, before torch is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdcache.errors import ConfigError

#: The smallest distillation temperature: T^2 is still a normal float32 (float32's smallest
#: normal is 2**-126) and logits / T stays finite in float32 for any logit below 3e19.
MIN_TEMPERATURE = math.sqrt(2.0**-126)


def is_real(value: object) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or a ConfigError naming it and the valid range."""
    if not (is_real(temperature) and math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ConfigError(
            f"temperature must be > 0 and at least {MIN_TEMPERATURE:.2g} (below it "
            "softmax(logits / T) overflows float32 and the T^2 loss scale underflows to 0), got "
            f"{temperature!r}; typical values are 1 to 20"
        )
    return float(temperature)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a ConfigError naming it and the valid range."""
    # Written so that NaN fails the range test too.
    if not (is_real(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(
            f"alpha must lie in [0, 1], got {alpha!r}; it must be a number such as 0.7 (the "
            "weight of the soft loss)"
        )
    return float(alpha)


def check_gamma(gamma: float) -> float:
    if not (is_real(gamma) and math.isfinite(gamma) and gamma >= 0):
        raise ConfigError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return float(gamma)


def check_top_k(top_k: int) -> int:
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
    return top_k


def check_skew(skew: float) -> float:
    if not (is_real(skew) and 0.0 < skew < 1.0):
        raise ConfigError(f"skew must lie in (0, 1), got {skew!r}")
    return float(skew)


@dataclass(frozen=True)
class HyperParameter:
    """A loss hyper-parameter: the keyword every loss taking it accepts, its default, the check
    of its value (which raises a ConfigError naming it and its valid values) and its help."""

    name: str
    default: float
    check: Callable[[Any], Any]
    help: str


TEMPERATURE = HyperParameter("temperature", 4.0, check_temperature, "Softmax temperature T (> 0).")
ALPHA = HyperParameter("alpha", 0.7, check_alpha, "Weight of the soft loss, in [0, 1].")
GAMMA = HyperParameter("gamma", 2.0, check_gamma, "Focal exponent.")
TOP_K = HyperParameter("top_k", 5, check_top_k, "Teacher classes kept.")
SKEW = HyperParameter("skew", 0.1, check_skew, "Mixing weight of the skew KL, in (0, 1).")


@dataclass(frozen=True)
class LossDeclaration:
    """A loss: the class implementing it (by name, in its module), what it computes in a few
    words, and the hyper-parameters its constructor takes."""

    implementation: str
    summary: str
    hyper_parameters: tuple[HyperParameter, ...] = (TEMPERATURE, ALPHA)


#: The losses of image runs by name, declared here and nowhere else: their classes are in
#: :mod:`kdcache.logits.losses` (its ``LOSSES`` registry is built from these names).
IMAGE_LOSSES: dict[str, LossDeclaration] = {
    "kd": LossDeclaration("LogitsDistillationLoss", "Hinton's KL at temperature T"),
    "focal": LossDeclaration(
        "FocalDistillationLoss",
        "KL weighted towards samples the teacher is unsure of",
        (TEMPERATURE, ALPHA, GAMMA),
    ),
    "attention": LossDeclaration(
        "AttentionLogitsLoss", "KL over the teacher's top-k classes", (TEMPERATURE, ALPHA, TOP_K)
    ),
}

#: The token-level losses of language-model runs by name (the divergence of
#: :class:`~kdcache.logits.sequence_losses.TokenDistillationLoss`), declared here and nowhere
#: else; ``kd`` is KL(p||q) as for images.
TOKEN_LOSS_DECLARATIONS: dict[str, LossDeclaration] = {
    "kd": LossDeclaration("TokenDistillationLoss", "forward KL, mode-covering"),
    "reverse": LossDeclaration("TokenDistillationLoss", "reverse KL, mode-seeking, MiniLLM"),
    "skew": LossDeclaration(
        "TokenDistillationLoss", "skew KL, DistiLLM", (TEMPERATURE, ALPHA, SKEW)
    ),
    "js": LossDeclaration("TokenDistillationLoss", "Jensen-Shannon, GKD"),
}

#: Every hyper-parameter some loss takes, each once.
HYPER_PARAMETERS: tuple[HyperParameter, ...] = tuple(
    dict.fromkeys(
        parameter
        for declarations in (IMAGE_LOSSES, TOKEN_LOSS_DECLARATIONS)
        for declaration in declarations.values()
        for parameter in declaration.hyper_parameters
    )
)


def losses_taking(parameter: HyperParameter) -> list[str]:
    """The names of the losses whose constructor takes ``parameter``, image losses first."""
    return list(
        dict.fromkeys(
            name
            for declarations in (IMAGE_LOSSES, TOKEN_LOSS_DECLARATIONS)
            for name, declaration in declarations.items()
            if parameter in declaration.hyper_parameters
        )
    )

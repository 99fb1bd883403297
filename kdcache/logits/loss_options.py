"""The losses' names, default hyper-parameters and bounds, importable without torch.

The option declarations (:mod:`kdcache.config`) read these when the CLI loads, before any loss
is built; the loss modules (:mod:`kdcache.logits.losses`, :mod:`kdcache.logits.sequence_losses`)
take their defaults and checks from here too, so each is written once for images and tokens.
"""

from __future__ import annotations

import math

from kdcache.errors import ConfigError

#: Losses for classification: the keys of :data:`kdcache.logits.losses.LOSSES`.
LOSS_NAMES = ("kd", "focal", "attention")
#: Token-level divergences: the keys of :data:`kdcache.logits.sequence_losses.TOKEN_LOSSES`;
#: ``kd`` is KL(p||q) as for images.
DIVERGENCES = ("kd", "reverse", "skew", "js")

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.7
DEFAULT_GAMMA = 2.0
DEFAULT_TOP_K = 5
DEFAULT_SKEW = 0.1

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

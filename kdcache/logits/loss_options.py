"""The losses' names and default hyper-parameters, importable without torch.

The option declarations (:mod:`kdcache.config`) read these when the CLI loads, before any loss
is built.
"""

#: Losses for classification (kdcache.logits.losses).
LOSS_NAMES = ("kd", "focal", "attention")
#: Token-level divergences (kdcache.logits.sequence_losses); ``kd`` is KL(p||q) as above.
DIVERGENCES = ("kd", "reverse", "skew", "js")

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.7
DEFAULT_GAMMA = 2.0
DEFAULT_TOP_K = 5

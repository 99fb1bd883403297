"""Training students: the loop for ``train`` and ``distill`` (cached or online), sweeps, and
:class:`TeacherLogits` for your own loop."""

from kdcache.train.loop import RunResult, distill, train
from kdcache.train.pairing import TeacherLogits
from kdcache.train.sweep import SweepResult, run_sweep

__all__ = [
    "RunResult",
    "SweepResult",
    "TeacherLogits",
    "distill",
    "run_sweep",
    "train",
]

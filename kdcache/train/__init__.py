"""Training students, image classifiers and language models alike: ``train`` and ``distill``
(from a store or a live teacher) over one loop, sweeps, and :class:`TeacherLogits` for your own
loop."""

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

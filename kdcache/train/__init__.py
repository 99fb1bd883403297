"""Training students, image classifiers and language models alike: ``train`` and ``distill``
(from a store or a live teacher) over one loop, sweeps, and :class:`TeacherLogits` for your own
loop."""

from kdcache.train.loop import RunResult, distill, train
from kdcache.train.pairing import TeacherLogits
from kdcache.train.sweep import SweepConfig, SweepResult, run_sweep

__all__ = [
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "TeacherLogits",
    "distill",
    "run_sweep",
    "train",
]

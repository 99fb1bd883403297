"""Training students: the loop for ``train`` and ``distill`` (cached or online), and sweeps."""

from kdcache.train.loop import RunResult, distill, train
from kdcache.train.sweep import SweepConfig, SweepResult, run_sweep

__all__ = ["RunResult", "SweepConfig", "SweepResult", "distill", "run_sweep", "train"]

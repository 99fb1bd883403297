"""An interrupted run continued where it stopped: ``kdcache train`` / ``distill --resume``.

At every evaluation but the run's last, :func:`fit <kdcache.train.fit.fit>` saves ``resume.pt`` in
the run folder (unless ``--no-resumable``): the student, the optimizer, the learning-rate schedule
and the loss scaler; where the run stands (epoch, steps into it) and its evaluations so far; and,
per rank, the random generators and the data order. The data order is saved as it was when the
epoch began (the loader's shuffling generator and its sampler's epoch, with torch's, Python's and
NumPy's generators): a run resumed inside an epoch goes through the same order again, loading and
dropping the batches already trained on, then takes up the generators as they were at the save.
So a resumed run trains on the same batches with the same dropout as one that never stopped, bit
for bit on the same device (tested), with or without loader workers; what a dataset draws inside
its loader workers (its own random transforms) is drawn afresh. The file is removed when the run
ends.

Like transformers' ``resume_from_checkpoint`` and timm's ``--resume``, with the run's own
options: a resumed run must be given the options it was started with (only where it runs may
change: :data:`MAY_CHANGE`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache._version import __version__
from kdcache.config import LoopConfig
from kdcache.distributed import RankSession
from kdcache.errors import KdcacheError, ResumeMismatchError
from kdcache.run_folder import atomic_torch_save, prepare_output_dir

#: The file in a run folder that an interrupted run resumes from.
RESUME_FILE = "resume.pt"

#: Options a resumed run may give differently: where it is and runs, not what it trains or in
#: which order. --num-workers decides how the loader draws its order; --cache-memory may change
#: as long as the store's feed reads in the same windows (checked where the epoch resumes).
MAY_CHANGE = ("out", "resume", "overwrite", "resumable", "device", "compile", "cache_memory")

#: What a run's state holds of its training objects (``ema`` where it averages its weights).
PARTS = ("model", "optimizer", "schedule", "scaler", "ema")

#: The state file's format. 2: an image epoch's last batch of one sample joins the batch before
#: it (kdcache.data.loaders), so a rank's batches may differ from a format 1 run's.
_FORMAT = 2
#: What a state file holds (besides its format).
_STATE_KEYS = frozenset(
    (
        "config",
        "world_size",
        "epoch",
        "steps",
        "steps_per_epoch",
        "training_s",
        "lr",
        "evaluations",
        "wall_s",
        "ranks",
        "model",
        "optimizer",
        "schedule",
        "scaler",
    )
)


def start_run_folder(config: LoopConfig, *, marker: str, **resolved: Any) -> Path:
    """Create ``config.out`` and write its ``config.json``; with ``--resume``, check that the
    folder holds an interrupted run and leave it as it is."""
    out = Path(config.out)
    state = out / RESUME_FILE
    if not config.resume:
        if state.is_file() and not config.overwrite:
            raise KdcacheError(
                f"{out} holds an interrupted run ({RESUME_FILE}); add --resume to continue it, "
                "or --overwrite to start it over"
            )
        folder = prepare_output_dir(out, overwrite=config.overwrite, marker=marker)
        remove_resume_point(out)  # --overwrite: the old run's state would resume it
        config.save(folder / "config.json", **resolved)
        return folder
    if not state.is_file():
        trained = (out / marker).exists() and (out / "config.json").is_file()
        raise KdcacheError(
            f"--resume found no {RESUME_FILE} in {out}: "
            + (
                "the run there finished, or stopped before it saved its state (or ran with "
                "--no-resumable); "
                if trained
                else "no run there reached its first evaluation; "
            )
            + "run without --resume to start anew (with --overwrite to replace that folder)"
        )
    return out


def random_states(device: torch.device) -> dict[str, Any]:
    """Torch's (CPU and, on CUDA, ``device``'s), Python's and NumPy's global generators."""
    # The legacy global generator on purpose: it is the one a user's model or dataset may use.
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002
    key = numpy_state["state"]["key"]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        # its uint32 key as an int64 tensor: the file loads with weights_only, and ranks
        # exchange it with all_gather_object (which cannot carry uint32 tensors)
        "numpy": {
            **numpy_state,
            "state": {**numpy_state["state"], "key": torch.from_numpy(key.astype(np.int64))},
        },
    }


def restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`random_states` took (the CUDA one on ``device``: a rank may sit on
    another device number when it resumes)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})  # noqa: NPY002


@dataclass(frozen=True)
class EpochStart:
    """What an epoch's batches and random draws follow from, taken as the epoch begins."""

    loader: dict[str, Any]
    random: dict[str, Any]


@dataclass(frozen=True)
class RankProgress:
    """One rank's part of a save: its epoch's start, its generators now, its sums so far."""

    start: EpochStart
    random: dict[str, Any]
    loss_sum: float
    seen: int
    grad_norm_sum: float = 0.0
    grad_norm_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankProgress:
        start = EpochStart(**data["start"])
        return cls(**{**data, "start": start})


@dataclass(frozen=True)
class ResumePoint:
    """A saved state of a run: ``epoch`` is the epoch to go on with (1-based), ``steps`` the
    steps already taken in it (0: it has not begun)."""

    epoch: int
    steps: int
    steps_per_epoch: int
    training_s: float
    lr: float
    evaluations: dict[str, Any]
    rank: RankProgress
    #: The state dicts of the student, optimizer, schedule, scaler and (``--ema-decay``)
    #: weight average, by the names of :data:`PARTS`.
    parts: dict[str, Any]
    #: Wall-clock seconds the run had taken at the save, over all its earlier sessions.
    wall_s: float = 0.0

    @property
    def step(self) -> int:
        """The run's optimisation steps before the save."""
        return (self.epoch - 1) * self.steps_per_epoch + self.steps

    def restore(self, parts: dict[str, Any]) -> None:
        """Put ``parts`` (the student, optimizer, schedule, scaler and weight average, by
        their names in the file) back as they were at the save."""
        try:
            for name, part in parts.items():
                part.load_state_dict(self.parts[name])
        except (RuntimeError, ValueError, KeyError) as error:
            # torch's message is a header line, then one line per mismatch: one line of them.
            reason = " ".join(line.strip() for line in str(error).splitlines())[:300]
            raise ResumeMismatchError(
                f"the state saved in the run folder does not fit this run's student or "
                f"optimizer ({reason}); resume with the model the run had, or start the run "
                "over with --overwrite (without --resume)"
            ) from None


def save_resume_point(
    out: Path,
    *,
    config: LoopConfig,
    session: RankSession,
    point: ResumePoint,
) -> None:
    """Write ``point`` (this rank's part in ``point.rank``) as ``out/resume.pt``: every rank
    hands rank 0 its part, rank 0 writes the file atomically."""
    ranks = session.all_gather(point.rank.to_dict())
    if not session.is_main:
        return
    atomic_torch_save(
        {
            "format": _FORMAT,
            "kdcache_version": __version__,
            "config": config.to_dict(),
            "world_size": session.info.world_size,
            "epoch": point.epoch,
            "steps": point.steps,
            "steps_per_epoch": point.steps_per_epoch,
            "training_s": point.training_s,
            "lr": point.lr,
            "evaluations": point.evaluations,
            "wall_s": point.wall_s,
            "ranks": ranks,
            **point.parts,
        },
        out / RESUME_FILE,
    )


def load_resume_point(
    out: Path, *, config: LoopConfig, session: RankSession, steps_per_epoch: int
) -> ResumePoint:
    """This rank's :class:`ResumePoint` from ``out/resume.pt``, refused in one line where the
    run it continues differs from this one."""
    path = out / RESUME_FILE
    damaged = (
        "; the run cannot continue from it: delete it, or run without --resume and with "
        "--overwrite, to start the run anew"
    )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file fails in many ways, all alike here
        reason = (str(error).splitlines() or [""])[0][:200]
        raise KdcacheError(
            f"cannot read {path} ({type(error).__name__}{': ' + reason if reason else ''}){damaged}"
        ) from None
    if isinstance(saved, dict) and saved.get("format") in range(1, _FORMAT):
        raise ResumeMismatchError(
            f"{path} was saved by kdcache {saved.get('kdcache_version')} in state format "
            f"{saved['format']}; kdcache {__version__} resumes format {_FORMAT} only, whose "
            f"epochs may be batched otherwise{damaged}"
        )
    missing = _STATE_KEYS - set(saved) if isinstance(saved, dict) else _STATE_KEYS
    if missing or saved.get("format") != _FORMAT:
        raise KdcacheError(
            f"{path} is not a state kdcache {__version__} can resume from"
            + (f" (it lacks {', '.join(sorted(missing))})" if missing else "")
            + damaged
        )
    _check_same_run(path, saved["config"], config)
    if saved["world_size"] != session.info.world_size:
        ranks = saved["world_size"]
        raise ResumeMismatchError(
            f"{path} was saved by a run of {ranks} rank(s), this one has "
            f"{session.info.world_size}; resume it "
            + (f"with torchrun --nproc-per-node {ranks}" if ranks > 1 else "without torchrun")
            + " (each rank's share of the data and its generators are saved)"
        )
    if saved["steps_per_epoch"] != steps_per_epoch:
        raise ResumeMismatchError(
            f"{path} was saved by a run of {saved['steps_per_epoch']} steps per epoch, this one "
            f"has {steps_per_epoch}: the training data changed; resume with the data the run "
            "started with, or start the run over with --overwrite (without --resume)"
        )
    parts = {key: saved[key] for key in PARTS if key in saved}
    try:
        rank = RankProgress.from_dict(saved["ranks"][session.info.rank])
    except (IndexError, KeyError, TypeError):
        raise KdcacheError(f"{path} lacks rank {session.info.rank}'s part{damaged}") from None
    return ResumePoint(
        epoch=saved["epoch"],
        steps=saved["steps"],
        steps_per_epoch=steps_per_epoch,
        training_s=saved["training_s"],
        lr=saved["lr"],
        evaluations=saved["evaluations"],
        rank=rank,
        parts=parts,
        wall_s=saved["wall_s"],
    )


def _check_same_run(path: Path, saved: dict[str, Any], config: LoopConfig) -> None:
    """Refuse options other than the saved run's; an option newer than the run counts as its
    default there (the run trained as that default does)."""
    given = config.to_dict()
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(config)
        if field.default is not dataclasses.MISSING
    }
    saved = {**{name: value for name, value in defaults.items() if name not in saved}, **saved}
    differences = [
        f"--{name.replace('_', '-')} {_shown(saved.get(name))} there, {_shown(given.get(name))} now"
        for name in sorted(set(saved) | set(given))
        if name not in MAY_CHANGE and saved.get(name) != given.get(name)
    ]
    if differences:
        raise ResumeMismatchError(
            f"--resume continues the run saved in {path} with the options it started with, "
            f"but {'; '.join(differences)}; give them as they were, or start the run over "
            "with --overwrite (without --resume)"
        )


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def skip(batches: Iterator[Any], count: int) -> None:
    """Take ``count`` batches from ``batches`` without using them (those trained on before).

    They are loaded (and their teacher rows read) as the run that never stopped loaded them:
    what keeps the order and the loaders' draws the same costs that much reading."""
    for _ in range(count):
        next(batches)


def remove_resume_point(out: Path) -> None:
    """Drop ``out``'s saved state: its run finished, or is being started over (the state is as
    large as three students, four with ``--ema-decay``)."""
    (out / RESUME_FILE).unlink(missing_ok=True)

"""--resume: a run killed mid-way continues, bit for bit, as if it had never stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ONE_THREAD, kill_once_halted, start_cli

from kdcache import DistillConfig, DumpConfig, TrainConfig
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError, KdcacheError, ResumeMismatchError
from kdcache.train.loop import distill, train
from kdcache.train.resume import RESUME_FILE

# Each run in this process is compared with one in a subprocess: both on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: digits' training split in batches of 128: 12 steps an epoch.
STEPS = 12
COMMON: dict[str, Any] = dict(model="teachers:halting", epochs=3, batch_size=128, seed=5)

#: What may differ between two runs that train alike: how long they took.
TIMES = ("train_time_s", "train_samples_per_s")


def killed_at(out: Path, step: int, *options: str) -> None:
    """``kdcache train`` of COMMON into ``out``, killed as it is about to take ``step``."""
    halted = out.parent / f"{out.name}.halted"
    process = start_cli(
        "-q", "train", "--model", COMMON["model"], "--epochs", str(COMMON["epochs"]),
        "--batch-size", str(COMMON["batch_size"]), "--seed", str(COMMON["seed"]),
        "--out", str(out), *options,
        env={"KDCACHE_TEST_HALT_AT": str(step), "KDCACHE_TEST_HALTED": str(halted), **ONE_THREAD},
    )  # fmt: skip
    kill_once_halted(process, halted)


def records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        {key: value for key, value in json.loads(line).items() if key not in TIMES}
        for line in lines
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


_WHOLE: dict[tuple[int, float], Path] = {}


def uninterrupted(tmp_path_factory, num_workers: int = 0, ema_decay: float = 0.0) -> Path:
    """COMMON trained in one go, evaluated every 5 steps (once per session, worker count and
    weight average)."""
    if (num_workers, ema_decay) not in _WHOLE:
        out = tmp_path_factory.mktemp("resume") / f"whole-{num_workers}-{ema_decay}"
        train(
            TrainConfig(
                out=str(out), eval_every=5, num_workers=num_workers, ema_decay=ema_decay, **COMMON
            )
        )
        _WHOLE[num_workers, ema_decay] = out
    return _WHOLE[num_workers, ema_decay]


@pytest.mark.parametrize(
    ("eval_every", "halt_at", "saved_step", "num_workers", "ema_decay"),
    [
        (5, 19, 15, 0, 0.0),
        (0, 19, 12, 0, 0.0),
        (5, 19, 15, 1, 0.0),
        (0, 19, 12, 1, 0.0),
        (5, 19, 15, 0, 0.9),
    ],
    ids=[
        "within-an-epoch",
        "at-an-epoch-end",
        "within-with-a-worker",
        "end-with-a-worker",
        "within-with-a-weight-average",
    ],
)
def test_a_killed_run_resumes_bit_for_bit(
    tmp_path, tmp_path_factory, eval_every, halt_at, saved_step, num_workers, ema_decay
):
    """Killed before step 19, the run saved last at its evaluation of step 15 (3 steps into
    epoch 2, with --eval-every 5) or at epoch 1's end (step 12). Resumed, it trains the same
    batches with the same dropout draws: the same weights, evaluations and best as the run
    that never stopped, and its state file is gone at the end. With a loader worker too (its
    persistent process draws its seed once, in the first epoch)."""
    whole_run = uninterrupted(tmp_path_factory, num_workers, ema_decay)
    out = tmp_path / "run"
    options = ["--num-workers", str(num_workers), "--ema-decay", str(ema_decay)]
    killed_at(out, halt_at, *options, *(["--eval-every", str(eval_every)] if eval_every else []))
    saved = torch.load(out / RESUME_FILE, map_location="cpu", weights_only=True)
    assert (saved["epoch"] - 1) * STEPS + saved["steps"] == saved_step
    before = records(out)
    result = train(
        TrainConfig(
            out=str(out),
            eval_every=eval_every,
            num_workers=num_workers,
            ema_decay=ema_decay,
            resume=True,
            **COMMON,
        )
    )
    whole = records(whole_run)
    if not eval_every:
        whole = [record for record in whole if "epoch_progress" not in record]
    assert records(out) == whole
    assert records(out)[: len(before)] == before
    a, b = weights(whole_run / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert result.final == whole[-1]["val_acc"]
    assert result.best == max(record["val_acc"] for record in whole)
    assert result.wall_time_s > saved["wall_s"] > 0  # the killed session's time counts too
    assert not (out / RESUME_FILE).exists()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run of COMMON (--eval-every 5) killed before step 19: resume.pt at step 15."""
    out = tmp_path_factory.mktemp("resume") / "interrupted"
    killed_at(out, 19, "--eval-every", "5")
    return out


def copy_of(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": 6, "lr": 0.01}, r"--lr 0.001 there, 0.01 now; --seed 5 there, 6 now; give them"),
        ({"num_workers": 1}, r"--num-workers 0 there, 1 now"),  # it moves the loader's draws
    ],
)
def test_a_run_resumed_with_other_options_is_refused_naming_them(
    tmp_path, interrupted, changes, message
):
    out = copy_of(interrupted, tmp_path)
    before = contents(out)
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(out=str(out), eval_every=5, resume=True, **{**COMMON, **changes}))
    assert contents(out) == before


def test_a_moved_run_folder_resumes(tmp_path, tmp_path_factory, interrupted):
    out = copy_of(interrupted, tmp_path, "moved")
    train(TrainConfig(out=str(out), eval_every=5, resume=True, **COMMON))
    assert records(out) == records(uninterrupted(tmp_path_factory))
    assert not (out / RESUME_FILE).exists()


def test_options_newer_than_the_saved_run_count_as_their_defaults(tmp_path, interrupted):
    """A state saved before --ema-decay existed resumes with its default; another value is
    refused, naming the default as the run's."""
    out = copy_of(interrupted, tmp_path)
    saved = torch.load(out / RESUME_FILE, weights_only=True)
    del saved["config"]["ema_decay"]
    torch.save(saved, out / RESUME_FILE)
    with pytest.raises(ConfigError, match=r"--ema-decay 0.0 there, 0.5 now"):
        train(TrainConfig(out=str(out), eval_every=5, resume=True, ema_decay=0.5, **COMMON))
    train(TrainConfig(out=str(out), eval_every=5, resume=True, **COMMON))
    assert not (out / RESUME_FILE).exists()


def test_resume_needs_an_interrupted_run(tmp_path, tmp_path_factory):
    with pytest.raises(KdcacheError, match=r"no resume.pt in .*: no run there reached its first"):
        train(TrainConfig(out=str(tmp_path / "empty"), resume=True, **COMMON))
    finished = uninterrupted(tmp_path_factory)
    with pytest.raises(KdcacheError, match=r"the run there finished, or .*run without --resume"):
        train(TrainConfig(out=str(finished), eval_every=5, resume=True, **COMMON))


def test_a_new_run_over_an_interrupted_one_needs_overwrite(tmp_path, interrupted):
    """Forgetting --resume must not throw away the state it would resume from; --overwrite
    starts over and drops it (else a later --resume would take it up)."""
    out = copy_of(interrupted, tmp_path)
    before = contents(out)
    with pytest.raises(KdcacheError, match=r"interrupted run \(resume.pt\); add --resume to"):
        train(TrainConfig(out=str(out), eval_every=5, **COMMON))
    assert contents(out) == before
    killed_at(out, 2, "--overwrite")  # before its first evaluation: nothing of its own saved
    assert not (out / RESUME_FILE).exists()


def test_no_state_is_saved_when_not_resumable(tmp_path):
    out = tmp_path / "run"
    killed_at(out, 19, "--eval-every", "5", "--no-resumable")
    assert (out / "metrics.jsonl").read_text()
    assert not (out / RESUME_FILE).exists()


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="--overwrite and --resume exclude each other"):
        DistillConfig(student="mlp:8", cache="s.zarr", out="run", overwrite=True, resume=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"cannot read .*resume.pt \(EOFError"),
        (b"junk", r"cannot read .*resume.pt \("),
        ({"lr": None}, r"resume.pt is not a state .* \(it lacks lr\)"),
        ({"format": 1}, r"resume.pt was saved by kdcache .* in state format 1; .* format 2 only"),
    ],
    ids=["empty", "junk", "a-key-missing", "an-earlier-format"],
)
def test_an_unreadable_state_is_refused_in_one_line(tmp_path, interrupted, content, message):
    out = copy_of(interrupted, tmp_path)
    if isinstance(content, dict):
        saved = torch.load(out / RESUME_FILE, weights_only=True)
        for key, value in content.items():
            if value is None:
                del saved[key]
            else:
                saved[key] = value
        torch.save(saved, out / RESUME_FILE)
    else:
        (out / RESUME_FILE).write_bytes(content)
    before = contents(out)
    with pytest.raises(KdcacheError, match=message + r".*delete it, or run without --resume"):
        train(TrainConfig(out=str(out), eval_every=5, resume=True, **COMMON))
    assert contents(out) == before


def test_a_state_that_does_not_fit_the_student_is_refused_in_one_line(tmp_path, interrupted):
    """As when the model's code changed between the kill and the resume."""
    out = copy_of(interrupted, tmp_path)
    saved = torch.load(out / RESUME_FILE, weights_only=True)
    name = next(key for key, value in saved["model"].items() if value.dim() == 2)
    saved["model"][name] = saved["model"][name][:, :3]
    torch.save(saved, out / RESUME_FILE)
    with pytest.raises(
        ResumeMismatchError, match=r"does not fit this run's student .*size mismatch.*--overwrite"
    ):
        train(TrainConfig(out=str(out), eval_every=5, resume=True, **COMMON))


def test_a_metrics_line_cut_short_by_the_kill_is_dropped(tmp_path, tmp_path_factory, interrupted):
    out = copy_of(interrupted, tmp_path)
    with (out / "metrics.jsonl").open("a") as stream:
        stream.write('{"epoch": 2, "epoch_pro')
    train(TrainConfig(out=str(out), eval_every=5, resume=True, **COMMON))
    assert records(out) == records(uninterrupted(tmp_path_factory))


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory, digits_teacher) -> Path:
    """The digits teacher's float32 logits in 23 chunks of 64 rows (2,560 bytes each)."""
    out = tmp_path_factory.mktemp("stores") / "chunked.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8", weights=str(digits_teacher), out=str(out), encoding="float32",
            chunk_rows=64, device="cpu",
        )
    )  # fmt: skip
    return out


def test_distillation_resumes_too(tmp_path, chunked_store):
    """The teacher's rows come from the store chunk by chunk, in the feed's order (its sampler's
    epoch is saved). A budget that reads them in other windows would change that order: it is
    refused, naming the budget the run had."""
    options: dict[str, Any] = dict(
        student="teachers:halting", cache=str(chunked_store), epochs=2, batch_size=128, seed=1
    )
    whole = tmp_path / "whole"
    distill(DistillConfig(out=str(whole), eval_every=7, cache_memory="16KiB", **options))
    out = tmp_path / "run"
    halted = tmp_path / "halted"
    process = start_cli(
        "-q", "distill", "--student", options["student"], "--cache", options["cache"],
        "--epochs", "2", "--batch-size", "128", "--seed", "1", "--eval-every", "7",
        "--cache-memory", "16KiB", "--out", str(out),
        env={"KDCACHE_TEST_HALT_AT": "17", "KDCACHE_TEST_HALTED": str(halted), **ONE_THREAD},
    )  # fmt: skip
    kill_once_halted(process, halted)
    for budget in ("8KiB", None):
        with pytest.raises(
            ResumeMismatchError,
            match=r"read its store's logits chunk by chunk .*give --cache-memory 16384 as the run",
        ):
            distill(
                DistillConfig(
                    out=str(out), eval_every=7, resume=True, cache_memory=budget, **options
                )
            )
    distill(DistillConfig(out=str(out), eval_every=7, resume=True, cache_memory="16KiB", **options))
    assert records(out) == records(whole)
    a, b = weights(whole / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)

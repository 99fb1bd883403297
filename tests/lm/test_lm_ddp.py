"""A language-model distillation from a sequence store under torchrun (2 ranks, gloo on CPU):
DistributedDataParallel through the one training loop, every sequence once per epoch, on one
learning-rate curve."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from conftest import cli_environment, kill_once_halted
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache.config import DumpConfig
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import load_causal_lm
from kdcache.lm.text import build_text_dataset
from kdcache.train.optim import LearningRateCurve


def test_lm_distillation_under_torchrun_sees_every_sequence_once_per_epoch(tmp_path, lm_files):
    dataset, epochs = f"text:{lm_files['corpus']}:16", 2
    store = tmp_path / "t.zarr"
    dump_lm(DumpConfig(teacher=f"hf:{lm_files['teacher']}", dataset=dataset, out=str(store)))
    record, out = tmp_path / "record", tmp_path / "run"
    record.mkdir()
    environment = cli_environment(
        {
            "PYTHONPATH": str(Path(__file__).parent),
            "KDCACHE_TEST_RECORD": str(record),
            "KDCACHE_TEST_LM_FOLDER": str(lm_files["student"]),
        }
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "kdcache", "distill", "--cache", str(store)]
    command += ["--student", "lm_teachers:recording", "--epochs", str(epochs), "--batch-size", "5"]
    command += ["--device", "cpu", "--out", str(out), "--lr-schedule", "cosine"]
    command += ["--warmup-epochs", "0.5", "--weight-decay", "0.01"]
    job = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("best val_ppl") == 1  # rank 0 reports for the job

    tokenizer = load_causal_lm(f"hf:{lm_files['teacher']}").tokenizer
    train_set = build_text_dataset(dataset, split="train", tokenizer=tokenizer)
    expected = Counter(" ".join(map(str, tokens.tolist())) for tokens in train_set.sequences)
    seen: dict[int, Counter] = {}
    assert sorted(p.name for p in record.iterdir()) == ["rank0", "rank1"]  # both ranks trained
    for path in record.iterdir():
        for line in path.read_text().splitlines():
            epoch, _, tokens = line.partition(" ")
            seen.setdefault(int(epoch), Counter())[tokens] += 1
    assert sorted(seen) == list(range(1, epochs + 1))
    for epoch, counts in seen.items():
        assert counts == expected, f"epoch {epoch}: not every sequence exactly once"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == epochs  # written once, by rank 0
    steps = math.ceil(math.ceil(len(train_set.sequences) / 2) / 5)  # the longer rank's batches
    warmup = round(steps * 0.5)  # --warmup-epochs 0.5
    curve = LearningRateCurve(schedule="cosine", total_steps=epochs * steps, warmup_steps=warmup)
    lrs = [1e-3 * curve(epoch * steps - 1) for epoch in range(1, epochs + 1)]
    assert [record["lr"] for record in metrics] == lrs
    assert json.loads((out / "config.json").read_text())["resolved"]["ranks"] == 2
    assert {"best", "last", "curves.png"} <= {p.name for p in out.iterdir()}


def torchrun_distill(store: Path, out: Path, *options: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "kdcache", "distill", "--cache", str(store)]
    command += ["--student", "lm_teachers:halting", "--epochs", "2", "--batch-size", "3"]
    return [*command, "--eval-every", "1", "--device", "cpu", "--out", str(out), *options]


#: What may differ between two runs that train alike: how long they took.
TIMES = ("train_time_s", "train_tokens_per_s")


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        {
            k: v
            for k, v in json.loads(line).items()
            if k not in ("train_time_s", "train_tokens_per_s")
        }
        for line in lines
    ]


def test_evaluations_within_epochs_under_torchrun_run_on_every_rank_and_are_written_once(
    tmp_path, lm_files
):
    """--eval-every under torchrun: every rank evaluates at the same steps (only where all still
    have batches: the ranks' shares differ by a sequence), rank 0 writes each evaluation once.

    The same job killed in its second epoch resumes (--resume, 2 ranks) from its last
    evaluation, each rank with its own generators and share: the same evaluations and weights
    as the job that never stopped."""
    from safetensors.torch import load_file  # with transformers

    dataset, epochs = f"text:{lm_files['corpus']}:16", 2
    store = tmp_path / "t.zarr"
    dump_lm(DumpConfig(teacher=f"hf:{lm_files['teacher']}", dataset=dataset, out=str(store)))
    out = tmp_path / "run"
    environment = cli_environment(
        {
            "PYTHONPATH": str(Path(__file__).parent),
            "KDCACHE_TEST_LM_FOLDER": str(lm_files["student"]),
        }
    )
    job = subprocess.run(
        torchrun_distill(store, out), env=environment, capture_output=True, text=True, timeout=600
    )
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("best val_ppl") == 1

    tokenizer = load_causal_lm(f"hf:{lm_files['teacher']}").tokenizer
    sequences = len(build_text_dataset(dataset, split="train", tokenizer=tokenizer).sequences)
    longest, shortest = math.ceil(sequences / 2 / 3), math.ceil(sequences // 2 / 3)
    within = [(e - 1) * longest + k for e in range(1, epochs + 1) for k in range(1, shortest)]
    ends = [e * longest for e in range(1, epochs + 1)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == sorted(within + ends)
    assert len(within) > 0
    assert {"best", "last"} <= {p.name for p in out.iterdir()}

    resumed, halted = tmp_path / "resumed", tmp_path / "halted"
    halt = {"KDCACHE_TEST_HALT_AT": str(longest + 3), "KDCACHE_TEST_HALTED": str(halted)}
    killed = subprocess.Popen(
        torchrun_distill(store, resumed),
        env={**environment, **halt},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and its ranks, killed together
    )
    kill_once_halted(killed, halted, group=True)
    saved = torch.load(resumed / "resume.pt", weights_only=True)
    assert (saved["epoch"], saved["steps"]) == (2, 2)  # the evaluation before the halted step
    job = subprocess.run(
        torchrun_distill(store, resumed, "--resume"),
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr
    assert records(resumed) == records(out)
    for name in ("best", "last"):
        a, b = (load_file(run / name / "model.safetensors") for run in (out, resumed))
        assert all(torch.equal(a[key], b[key]) for key in a)

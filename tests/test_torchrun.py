"""Real torchrun jobs (2 ranks, gloo on CPU): a killed multi-rank dump resumed by one process and
by 2 ranks locally and on S3, and DDP distillation from a cache and from a live teacher.

Each torchrun launch costs many seconds on a small machine, so each test checks much in few runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import cli_environment, kill_once_halted
from narrowing import kdcache_record, stored
from teachers import fingerprint

from kdcache import DumpConfig, dump_teacher
from kdcache.data.datasets import build_dataset
from kdcache.errors import StoreLockedError
from kdcache.models import build_model, load_weights
from kdcache.store.format.location import parse_location, zarr_store
from kdcache.store.write.locking import acquire_writer_lock
from kdcache.train.loop import evaluate

DUMP: dict[str, Any] = dict(
    dataset="fake:200:8:10", chunk_rows=20, batch_size=15, encoding="float32"
)
NUM_CHUNKS = 10


def torchrun(
    *args: str, env: dict[str, str] | None = None, own_session: bool = False
) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node 2 -m kdcache ARGS`` as a user would (with
    ``own_session``, in a session of its own: the launcher and its ranks, killed together)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kdcache",
            *args,
        ],
        env=cli_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_session,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{stderr}"
    return stdout


def dump_args(out: str) -> list[str]:
    options = [f"--{key.replace('_', '-')}={value}" for key, value in DUMP.items()]
    return ["dump-teacher", "--teacher", "teachers:slow", "--device", "cpu", "--out", out, *options]


def workers(launcher: int) -> dict[int, int]:
    """The pids of a torchrun launcher's workers, by rank (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(stat.parent.name)
    return found


def written_chunks(store: Path) -> set[int]:
    flags = store / "chunk_written" / "c"
    return {int(p.name) for p in flags.iterdir() if p.name.isdigit()} if flags.is_dir() else set()


def written_flags(store: Path) -> int:
    return len(written_chunks(store))


def contents(url: str) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(zarr_store(parse_location(url), read_only=True), mode="r")
    record = dict(kdcache_record(group))
    record.pop("created_at")
    assert len(record.pop("generation")) == 32  # each store's own identity, like created_at
    return {name: stored(group, name) for name in ("logits", "labels", "chunk_written")}, record


def assert_same_store(url: str, reference: Path) -> None:
    (got, got_record), (expected, expected_record) = contents(url), contents(str(reference))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # Fidelity is measured over the rows of the run that finished the store.
    assert got_record.pop("fidelity")["top1_agreement"] == 1.0
    expected_record.pop("fidelity")
    assert got_record == expected_record


def test_a_rank_killed_mid_dump_leaves_a_store_that_resumes_bit_identically_with_1_or_2_ranks(
    tmp_path, s3_bucket, s3_server, monkeypatch
):
    monkeypatch.setenv("KDCACHE_TEST_BATCH_SLEEP", "0")
    reference = tmp_path / "reference.zarr"
    dump_teacher(DumpConfig(teacher="teachers:slow", device="cpu", out=str(reference), **DUMP))

    out, gate = tmp_path / "t.zarr", tmp_path / "gate"
    job = torchrun(*dump_args(str(out)), env={"KDCACHE_TEST_GATE": str(gate)})
    deadline = time.monotonic() + 240
    # Units of one chunk here: rank 0 writes the even chunks, rank 1 the odd ones. Wait until each
    # rank has written one, however the two share the (busy) cores.
    while not {0, 1} <= {chunk % 2 for chunk in written_chunks(out)}:
        assert job.poll() is None, job.communicate()[1]
        assert time.monotonic() < deadline, "the ranks never wrote a chunk each"
        time.sleep(0.002)
    gate.touch()  # both ranks wait before their next batch
    ranks = workers(job.pid)
    assert sorted(ranks) == [0, 1]
    # One writer lock for the whole job, held by rank 0.
    with pytest.raises(StoreLockedError, match=f"pid {ranks[0]} "):
        acquire_writer_lock(parse_location(str(out)))
    os.kill(ranks[1], signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0  # torchrun stops the surviving rank and fails
    done = written_flags(out)
    assert 2 <= done < NUM_CHUNKS
    # Rank 1 wrote some of those chunks: its own, never rank 0's (units of one chunk here).
    flags = stored(zarr.open_group(str(out), mode="r"), "chunk_written")
    assert flags[1::2].any()
    assert flags[0::2].any()

    # Resumed by one process...
    single = tmp_path / "single.zarr"
    shutil.copytree(out, single)
    resumed = dump_teacher(
        DumpConfig(teacher="teachers:slow", device="cpu", out=str(single), resume=True, **DUMP)
    )
    assert resumed.rows_computed == 200 - 20 * done
    assert_same_store(str(single), reference)

    # ...and by two ranks, in place and after the killed store moved to S3 (as a copy would),
    # both jobs at once.
    import s3fs

    url = f"{s3_bucket}/t.zarr"
    bucket_copy = tmp_path / "for-s3.zarr"
    shutil.copytree(out, bucket_copy)
    for partial in bucket_copy.rglob("*.partial"):
        partial.unlink()  # a killed local writer's temporary files never reach a bucket
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(bucket_copy), url, recursive=True)
    jobs = [torchrun(*dump_args(target), "--resume", env=s3_server) for target in (str(out), url)]
    for job in jobs:
        finish(job)
    assert_same_store(str(out), reference)
    assert not Path(str(out) + ".lock").exists()
    assert not list(out.rglob("*.partial"))
    assert_same_store(url, reference)
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(url + ".lock")


def records(folder: Path) -> dict[int, Counter]:
    """Fingerprints of the samples trained on, per epoch, over every rank's record."""
    seen: dict[int, Counter] = {}
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["rank0", "rank1"]  # both ranks trained
    for path in files:
        for line in path.read_text().splitlines():
            epoch, name = line.split()
            seen.setdefault(int(epoch), Counter())[name] += 1
    return seen


#: 103 samples: on 2 ranks in batches of 10, 52 and 51 samples, 6 and 5 batches an epoch (the
#: one sample past 50 joins the batch before it).
UNEVEN = "fake:103:8:4"


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory) -> Path:
    """A float32 store of ``teachers:seeded`` on :data:`UNEVEN`."""
    store = tmp_path_factory.mktemp("uneven") / "t.zarr"
    dump_teacher(
        DumpConfig(
            teacher="teachers:seeded",
            dataset=UNEVEN,
            encoding="float32",
            device="cpu",
            out=str(store),
        )
    )
    return store


def test_ddp_distillation_from_a_cache_and_online_sees_every_sample_once_and_agrees(
    tmp_path, uneven_store
):
    dataset, epochs, store = UNEVEN, 2, uneven_store
    common = ["distill", "--student", "teachers:recording", "--epochs", str(epochs)]
    common += ["--batch-size", "10", "--device", "cpu"]
    runs = {
        "cached": ["--cache", str(store)],
        "online": ["--teacher", "teachers:seeded", "--dataset", dataset],
    }
    jobs = {}
    for name, source in runs.items():
        (tmp_path / f"record-{name}").mkdir()
        jobs[name] = torchrun(
            *common,
            *source,
            "--out",
            str(tmp_path / name),
            env={"KDCACHE_TEST_RECORD": str(tmp_path / f"record-{name}")},
        )
    outputs = {name: finish(job) for name, job in jobs.items()}

    train_set = build_dataset(dataset, split="train")
    expected = Counter(fingerprint(train_set[i][0]) for i in range(len(train_set)))
    assert len(expected) == 103
    val_set = build_dataset(dataset, split="test")
    students = {}
    for name in runs:
        seen = records(tmp_path / f"record-{name}")
        assert sorted(seen) == list(range(1, epochs + 1))
        for epoch, counts in seen.items():
            assert counts == expected, f"{name}, epoch {epoch}: not every sample exactly once"
        run = tmp_path / name
        assert {
            "config.json",
            "metrics.jsonl",
            "last.pt",
            "best.pt",
            "curves.png",
            "distributions.png",
        } <= {p.name for p in run.iterdir()}
        metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        assert len(metrics) == epochs  # written once, by rank 0
        assert json.loads((run / "config.json").read_text())["resolved"]["ranks"] == 2
        assert outputs[name].count("best val_acc") == 1
        student = build_model("teachers:recording", num_classes=4, in_channels=3)
        load_weights(student, run / "last.pt", spec="teachers:recording")
        students[name] = student
        # The logged accuracy covers the whole held-out split, summed over both ranks.
        accuracy, _ = evaluate(student, val_set, batch_size=7, device=torch.device("cpu"))
        assert f'"val_acc": {accuracy}' in metrics[-1]
    for (key, cached), online in zip(
        students["cached"].state_dict().items(),
        students["online"].state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(cached, online, rtol=1e-4, atol=1e-5, msg=key)


def test_a_killed_ddp_distillation_resumes_on_2_ranks_as_if_it_had_never_stopped(
    tmp_path, uneven_store
):
    """Uneven shares (6 and 5 batches an epoch), 2 batches accumulated per step (3 steps an
    epoch; the last one's gradients all-reduced at each batch, the shorter rank then shadowed
    by DDP's join), dropout, a weight average (evaluated and saved), and an evaluation every 2
    steps: killed in epoch 2, the job
    resumes from its save at step 4 (1 step into epoch 2, after the ranks aligned their
    optimizers) with each rank's own data order and generators: the same evaluations and
    weights as the job that never stopped."""
    store = uneven_store
    command = ["distill", "--cache", str(store), "--student", "teachers:halting", "--epochs", "2"]
    command += ["--batch-size", "10", "--grad-accum-steps", "2", "--eval-every", "2"]
    command += ["--ema-decay", "0.9"]
    # No loader worker: a persistent one would hide a sampler epoch not put back (its first
    # iterator, made on resume, moves the epoch on as the uninterrupted run's did).
    command += ["--device", "cpu"]
    whole, resumed, halted = tmp_path / "whole", tmp_path / "resumed", tmp_path / "halted"
    finish(torchrun(*command, "--out", str(whole)))

    killed = torchrun(
        *command,
        "--out",
        str(resumed),
        env={"KDCACHE_TEST_HALT_AT": "9", "KDCACHE_TEST_HALTED": str(halted)},
        own_session=True,
    )
    kill_once_halted(killed, halted, group=True)
    saved = torch.load(resumed / "resume.pt", weights_only=True)
    assert (saved["epoch"], saved["steps"]) == (2, 1)  # halted at epoch 2's 3rd batch
    finish(torchrun(*command, "--out", str(resumed), "--resume"))

    def evaluations(run: Path) -> list[dict[str, Any]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        times = ("train_time_s", "train_samples_per_s")
        return [{k: v for k, v in json.loads(line).items() if k not in times} for line in lines]

    assert [record["step"] for record in evaluations(whole)] == [2, 3, 4, 6]
    assert evaluations(resumed) == evaluations(whole)
    assert not (resumed / "resume.pt").exists()
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(run / name, weights_only=True)["state_dict"] for run in (whole, resumed))
        assert all(torch.equal(a[key], b[key]) for key in a), name

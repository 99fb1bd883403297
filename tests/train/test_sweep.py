"""Sweeps from one real store on disk: the CSV, the figure, resuming, and refusing bad grids."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    ONE_THREAD,
    assert_one_line_error,
    assert_png,
    kill_once_halted,
    run_cli,
    start_cli,
)

from kdcache import create_store, open_store
from kdcache.config import DistillConfig, SweepConfig
from kdcache.errors import ConfigError, KdcacheError
from kdcache.options import parse_list
from kdcache.store.sequence import create_sequence_store
from kdcache.train.loop import distill
from kdcache.train.sweep import format_table, run_sweep


def tiny_sweep(store, out, **changes):
    options = dict(
        cache=str(store),
        student="mlp:8",
        out=str(out),
        temperatures=(1.0, 4.0),
        seeds=(0, 1),
        epochs=1,
        batch_size=128,
        device="cpu",
    )
    return SweepConfig(**{**options, **changes})


def read_csv(path):
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, digits_store):
    out = tmp_path_factory.mktemp("sweep")
    return out, run_sweep(tiny_sweep(digits_store, out))


def test_one_run_per_setting_and_seed(finished_sweep):
    out, result = finished_sweep
    rows = read_csv(out / "results.csv")
    assert [(r["setting"], r["seed"]) for r in rows] == [
        ("kd-a0.7-T1", "0"),
        ("kd-a0.7-T1", "1"),
        ("kd-a0.7-T4", "0"),
        ("kd-a0.7-T4", "1"),
    ]
    for row in rows:
        run = out / row["run_dir"]
        assert json.loads((run / "config.json").read_text())["temperature"] == float(
            row["temperature"]
        )
        assert 0 <= float(row["final_val_acc"]) <= float(row["best_val_acc"]) <= 100
        assert float(row["wall_time_s"]) > 0
        assert_png(run / "curves.png")
        assert_png(run / "distributions.png")
    assert_png(out / "sweep.png")
    assert (result.runs_done, result.runs_skipped) == (4, 0)
    table = format_table(result.rows).splitlines()
    assert len(table) == 3
    assert table[1].startswith("kd-a0.7-T1")
    assert "±" in table[1]


def test_resume_keeps_finished_runs_and_reruns_half_finished_ones(tmp_path, digits_store):
    config = tiny_sweep(digits_store, tmp_path, temperatures=(2.0,), epochs=2)
    run_sweep(config)
    kept, killed = tmp_path / "kd-a0.7-T2-seed0", tmp_path / "kd-a0.7-T2-seed1"
    kept_checkpoint = (kept / "last.pt").read_bytes()
    # A run killed after its first epoch: last.pt exists, the metrics stop early, no result.json.
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text(lines[0] + "\n")
    (killed / "result.json").unlink()
    (killed / "curves.png").unlink()

    result = run_sweep(config)
    assert (result.runs_done, result.runs_skipped) == (1, 1)
    assert (kept / "last.pt").read_bytes() == kept_checkpoint
    assert [
        json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]
    assert (killed / "result.json").exists()
    assert (killed / "curves.png").exists()
    assert [r["run_dir"] for r in read_csv(tmp_path / "results.csv")] == [kept.name, killed.name]


@pytest.mark.usefixtures("one_torch_thread")  # compared with a run in a subprocess
def test_a_run_killed_inside_an_epoch_continues_where_it_stopped(tmp_path, digits_store, caplog):
    """A sweep killed in its run's second epoch, run again: the run resumes from its last
    evaluation (resume.pt) and ends as the same run uninterrupted."""
    grid: dict[str, Any] = dict(
        student="teachers:halting", temperatures=(2.0,), seeds=(0,), epochs=2, eval_every=5
    )
    whole = run_sweep(tiny_sweep(digits_store, tmp_path / "whole", **grid))
    out, halted = tmp_path / "sweep", tmp_path / "halted"
    process = start_cli(
        "-q", "sweep", "--cache", str(digits_store), "--student", "teachers:halting",
        "--temperatures", "2", "--alphas", "0.7", "--seeds", "0", "--epochs", "2",
        "--batch-size", "128", "--eval-every", "5", "--device", "cpu", "--out", str(out),
        env={"KDCACHE_TEST_HALT_AT": "18", "KDCACHE_TEST_HALTED": str(halted), **ONE_THREAD},
    )  # fmt: skip
    kill_once_halted(process, halted)
    run = out / "kd-a0.7-T2-seed0"
    assert (run / "resume.pt").exists()
    other = shutil.copytree(out, tmp_path / "other")
    with caplog.at_level(logging.INFO, logger="kdcache"):
        again = run_sweep(tiny_sweep(digits_store, out, **grid))
    assert f"resuming {run} at epoch 2, step 15" in caplog.text  # not started over
    assert (again.runs_done, again.runs_skipped) == (1, 0)
    assert again.rows[0]["best_val_acc"] == whole.rows[0]["best_val_acc"]
    assert again.rows[0]["final_val_acc"] == whole.rows[0]["final_val_acc"]
    a, b = (
        torch.load(r / "last.pt", weights_only=True)["state_dict"]
        for r in (run, tmp_path / "whole" / run.name)
    )
    assert all(torch.equal(a[name], b[name]) for name in a)
    # Run again with another --num-workers, which moves the loader's draws: it starts over.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdcache"):
        rerun = run_sweep(tiny_sweep(digits_store, other, num_workers=1, **grid))
    assert f"{run.name}: starting over, it cannot continue: --resume continues" in caplog.text
    assert (rerun.runs_done, rerun.runs_skipped) == (1, 0)
    assert not (other / run.name / "resume.pt").exists()


def test_a_finished_run_that_evaluated_within_epochs_is_kept(tmp_path, digits_store):
    config = tiny_sweep(digits_store, tmp_path, temperatures=(2.0,), seeds=(0,), eval_every=4)
    run_sweep(config)
    run = tmp_path / "kd-a0.7-T2-seed0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("epoch_progress" in record for record in records)
    again = run_sweep(config)
    assert (again.runs_done, again.runs_skipped) == (0, 1)
    (row,) = read_csv(tmp_path / "results.csv")
    best = max(records, key=lambda record: record["val_acc"])
    assert int(row["best_step"]) == best["step"]


def test_a_finished_run_with_other_settings_is_refused(finished_sweep, digits_store):
    out, _ = finished_sweep
    with pytest.raises(KdcacheError, match="epochs=1 but this sweep asks for 3"):
        run_sweep(tiny_sweep(digits_store, out, epochs=3))


def test_runs_from_before_the_schedule_options_are_kept_as_constant_without_decay(
    finished_sweep, digits_store, tmp_path
):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep[0], out)
    for config_path in out.glob("*/config.json"):
        saved = json.loads(config_path.read_text())
        for name in ("lr_schedule", "warmup_epochs", "min_lr", "weight_decay"):
            del saved[name]
        config_path.write_text(json.dumps(saved))
    assert run_sweep(tiny_sweep(digits_store, out)).runs_skipped == 4
    with pytest.raises(KdcacheError, match="lr_schedule='constant' but this sweep asks for 'cos"):
        run_sweep(tiny_sweep(digits_store, out, lr_schedule="cosine"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperatures": ()}, "--temperatures needs at least one value"),
        ({"seeds": (0, 0)}, "lists a value twice"),
        ({"losses": ("kd", "mse")}, "valid losses: kd, focal, attention"),
        ({"temperatures": (1.0, 0.0)}, "temperature must be > 0"),
        ({"alphas": (1.5,)}, "alpha must lie in"),
    ],
)
def test_invalid_grids_are_refused_before_any_run(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_sweep("s.zarr", tmp_path / "out", **changes)
    assert not (tmp_path / "out").exists()


def test_parse_list():
    assert parse_list("1, 2,4", float, option="--temperatures", example="1,2") == (1.0, 2.0, 4.0)
    with pytest.raises(ConfigError, match="--seeds must be a comma-separated list, got '0,x'"):
        parse_list("0,x", int, option="--seeds", example="0,1,2")


def test_the_memory_budget_reaches_the_shared_reader_and_every_run(tmp_path, digits_store):
    result = run_sweep(
        tiny_sweep(digits_store, tmp_path, temperatures=(2.0,), seeds=(0,), cache_memory="1MiB")
    )
    assert result.runs_done == 1
    assert (
        json.loads((tmp_path / "kd-a0.7-T2-seed0" / "config.json").read_text())["cache_memory"]
        == "1MiB"
    )
    with pytest.raises(ConfigError, match="memory size 'lots'"):
        tiny_sweep(digits_store, tmp_path / "bad", cache_memory="lots")


def test_jobs_run_settings_side_by_side_from_one_shared_table(
    finished_sweep, digits_store, tmp_path, monkeypatch
):
    import torch

    from kdcache.store.read.private_folder import SHARED_DIR_ENV

    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path / "shm"))  # inherited by the workers
    sequential, _ = finished_sweep
    result = run_sweep(tiny_sweep(digits_store, tmp_path / "parallel", jobs=2))
    assert (result.runs_done, result.runs_skipped) == (4, 0)
    rows = read_csv(tmp_path / "parallel" / "results.csv")
    assert [row["run_dir"] for row in rows] == [
        row["run_dir"] for row in read_csv(sequential / "results.csv")
    ]
    for row in rows:
        # The same students as one run at a time (torch threads differ: float tolerance).
        trained, reference = (
            torch.load(folder / row["run_dir"] / "last.pt", weights_only=True)["state_dict"]
            for folder in (tmp_path / "parallel", sequential)
        )
        for name, tensor in reference.items():
            torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-5)
    assert list((tmp_path / "shm").iterdir())  # the workers used a shared table...
    assert not list((tmp_path / "shm").glob("*/*.npy"))  # ...and the last one removed it
    with pytest.raises(ConfigError, match="--jobs must be >= 1, got 0"):
        tiny_sweep(digits_store, tmp_path / "x", jobs=0)


def test_a_sweep_under_torchrun_is_refused(digits_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="not under torchrun; use --jobs"):
        run_sweep(tiny_sweep(digits_store, tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_jobs_check_the_index_file_before_any_worker_starts(tmp_path, digits_store):
    (tmp_path / "idx.txt").write_text("1 2\n--5\n")
    with pytest.raises(ConfigError, match=r"idx\.txt line 2 holds '--5'"):
        run_sweep(
            tiny_sweep(digits_store, tmp_path / "out", jobs=2, indices=str(tmp_path / "idx.txt"))
        )
    assert not (tmp_path / "out").exists()  # refused before the sweep folder, so before workers


def test_workers_that_cannot_start_end_the_sweep_in_one_line(tmp_path, digits_store):
    site = tmp_path / "site"
    site.mkdir()
    # Every spawned worker exits as its interpreter starts, as one killed for memory would.
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os._exit(3)\n"
    )
    args = ("--cache", str(digits_store), "--student", "mlp:8", "--epochs", "1", "--jobs", "2")
    result = run_cli(
        "sweep",
        *args,
        "--temperatures",
        "1,2",
        "--out",
        str(tmp_path / "out"),
        check=False,
        env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
    )
    assert_one_line_error(result, "its worker process died before finishing", "--jobs")
    assert result.returncode == 1


def test_a_sweep_of_a_token_store_is_refused_naming_the_store_and_why(tmp_path):
    store = tmp_path / "tokens.zarr"
    sequences = [np.array([1, 2, 3]), np.array([4, 5])]
    writer = create_sequence_store(store, sequences=sequences, vocab_size=8)
    writer.write(range(2), np.zeros((3, 8), dtype=np.float32))
    writer.finalize()
    with pytest.raises(ConfigError) as info:
        run_sweep(tiny_sweep(store, tmp_path / "sweep"))
    message = str(info.value)
    assert f"{store} is a token store" in message
    assert "perplexity" in message
    assert f"kdcache distill --cache {store}" in message
    assert "\n" not in message
    assert not (tmp_path / "sweep").exists()


def other_teacher(source, out):
    """A second store of the digits dataset: the first teacher's logits, rescaled and noisy."""
    reader = open_store(source)
    logits = reader.read_dense(np.arange(reader.num_samples)).numpy()
    noise = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32)
    writer = create_store(
        out,
        num_samples=reader.num_samples,
        num_classes=reader.num_classes,
        encoding="float32",
        labels=reader.labels,
        teacher={"spec": "other", "weights_sha256": None},
        dataset=reader.metadata.dataset,
    )
    writer.write(np.arange(reader.num_samples), logits * 0.6 + 2.0 * noise)
    writer.finalize()
    return out


def test_a_sweep_over_several_teachers_trains_each_run_as_distill_does(tmp_path, digits_store):
    pair = (str(digits_store), str(other_teacher(digits_store, tmp_path / "other.zarr")))
    ensemble: dict[str, Any] = dict(cache=pair, teacher_weights=(3.0, 1.0), teacher_mix="mixture")
    grid: dict[str, Any] = dict(temperatures=(4.0,), seeds=(0,), **ensemble)
    result = run_sweep(tiny_sweep(digits_store, tmp_path / "sweep", **grid))
    assert (result.runs_done, result.runs_skipped) == (1, 0)
    run = tmp_path / "sweep" / "kd-a0.7-T4-seed0"
    record = json.loads((run / "config.json").read_text())
    assert (record["cache"], record["teacher_weights"]) == (list(pair), [3.0, 1.0])
    assert record["resolved"]["ensemble"]["weights"] == [0.75, 0.25]
    sweep_record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep_record["cache"] == list(pair)
    assert sweep_record["store_identity"]["teacher"][1] == {"spec": "other", "weights_sha256": None}
    # The sweep's run is the run `distill --cache a --cache b` trains, bit for bit.
    alone = DistillConfig(
        student="mlp:8",
        epochs=1,
        batch_size=128,
        device="cpu",
        temperature=4.0,
        seed=0,
        out=str(tmp_path / "alone"),
        **ensemble,
    )
    distill(alone)
    states = [
        torch.load(f / "last.pt", weights_only=True)["state_dict"]
        for f in (run, tmp_path / "alone")
    ]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert run_sweep(tiny_sweep(digits_store, tmp_path / "sweep", **grid)).runs_skipped == 1
    with pytest.raises(KdcacheError, match=r"teacher_weights=\[3.0, 1.0\] but this sweep asks"):
        run_sweep(
            tiny_sweep(digits_store, tmp_path / "sweep", **{**grid, "teacher_weights": (1, 1)})
        )


def test_teacher_weights_without_several_stores_are_refused_in_one_line(tmp_path, digits_store):
    refused = run_cli(
        "sweep",
        "--cache",
        str(digits_store),
        "--student",
        "mlp:8",
        "--out",
        str(tmp_path / "s"),
        "--teacher-weights",
        "1,2",
        check=False,
    )
    assert_one_line_error(refused, "--teacher-weights and --teacher-mix combine several teachers")
    assert not (tmp_path / "s").exists()

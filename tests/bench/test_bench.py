"""The benchmarks' reports, on tiny models and data (their figures are not checked: speed is noise
here)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli

from kdcache.bench.distill import bench_distill
from kdcache.bench.dump import bench_dump
from kdcache.bench.writer import bench_writer

TINY = dict(dataset="fake:64:8:10", batch_size=32, repeats=2, device="cpu", threads=1)


def test_bench_dump_reports_dump_and_bare_forward_side_by_side():
    result = bench_dump(teacher="cnn:4", **TINY)
    json.dumps(result)
    assert result["num_samples"] == 64 and result["repeats"] == 2
    assert len(result["all_bare_forward_s"]) == len(result["all_dump_loop_s"]) == 2
    unsynced = result["all_dump_no_fsync_loop_s"]
    assert len(unsynced) == 2
    fsync_ratios = [a / b for a, b in zip(result["all_dump_loop_s"], unsynced, strict=True)]
    assert result["fsync_cost"] == pytest.approx(sum(fsync_ratios) / 2, rel=1e-3)
    loop, bare = result["all_dump_loop_s"], result["all_bare_forward_s"]
    ratios = [a / b for a, b in zip(loop, bare, strict=False)]
    assert result["dump_loop_over_bare"] == pytest.approx(
        sum(ratios) / 2, rel=1e-3
    )  # median of two rounds


def test_bench_distill_runs_each_kind_once_per_round():
    result = bench_distill(student="mlp:8", teacher="cnn:4", **TINY)
    json.dumps(result)
    assert {name: len(times) for name, times in result["all_epoch_s"].items()} == {
        "ce": 2,
        "cache": 2,
        "online": 2,
    }
    times = result["all_epoch_s"]
    ratios = [a / b for a, b in zip(times["cache"], times["ce"], strict=False)]
    assert result["cache_over_ce"] == pytest.approx(
        sum(ratios) / 2, rel=1e-3
    )  # median of two rounds
    assert result["compute_only_saving"] > 1


def test_bench_dump_of_views_runs_the_teacher_on_every_view():
    result = bench_dump(
        teacher="cnn:4", views=3, augment="pad-crop:1+flip", writer_workers=2, **TINY
    )
    assert result["views"] == 3 and result["writer_workers"] == 2
    assert result["dump_loop_views_per_s"] == pytest.approx(
        3 * result["dump_loop_samples_per_s"], rel=1e-3
    )


def test_bench_writer_reports_rows_per_second_for_each_encoding_and_thread_count():
    result = bench_writer(
        encodings=("float16", "topk:2"),
        workers=(1, 2),
        num_rows=100,
        num_classes=6,
        batch_size=16,
        repeats=2,
    )
    json.dumps(result)
    runs = {(run["encoding"], run["workers"]): run for run in result["runs"]}
    assert set(runs) == {("float16", 1), ("float16", 2), ("topk:2", 1), ("topk:2", 2)}
    assert all(len(run["all_wall_s"]) == 2 and run["rows_per_s"] > 0 for run in runs.values())
    assert runs[("float16", 1)]["speedup"] == 1.0


def test_bench_dump_writer_only_from_the_command_line(tmp_path):
    result = run_cli(
        "bench",
        "dump",
        "--writer-only",
        "--dataset",
        "fake:8:4:5",
        "--encoding",
        "float16,int8",
        "--writer-workers",
        "1,2",
        "--rows",
        "64",
        "--repeats",
        "1",
        "--json",
    )
    runs = json.loads(result.stdout)["runs"]
    assert [(run["encoding"], run["workers"]) for run in runs] == [
        ("float16", 1),
        ("float16", 2),
        ("int8", 1),
        ("int8", 2),
    ]
    refused = run_cli("bench", "dump", "--encoding", "float16,int8", check=False)
    assert_one_line_error(refused, "need --writer-only")

"""The benchmarks' reports, on tiny models and data (their figures are not checked: speed is noise
here)."""

from __future__ import annotations

import json

import pytest

from kdcache.bench import bench_distill, bench_dump

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

"""``kdcache bench lm`` on a tiny GPT-2 and text (its figures are not checked: speed is noise
here; what is checked is that every measurement is made and reported)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)

from kdcache.cli.bench import BenchLMOptions, summary_lines
from kdcache.errors import ConfigError


def test_bench_lm_reports_the_dump_the_feed_and_the_three_runs(lm_files):
    """Two rounds, so that each figure is a median over rounds and the order alternates."""
    result = run_cli(
        "bench",
        "lm",
        "--teacher",
        f"hf:{lm_files['teacher']}",
        "--student",
        f"hf:{lm_files['student']}",
        "--dataset",
        f"text:{lm_files['corpus']}:16",
        "--encoding",
        "sampled:4",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--repeats",
        "2",
        "--feed-batches",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--json",
    )
    report = json.loads(result.stdout)
    assert report["benchmark"] == "lm"
    assert report["encoding"] == "sampled:4"
    assert report["repeats"] == 2
    assert len(report["all_bare_forward_s"]) == len(report["all_dump_loop_s"]) == 2
    assert len(report["all_bare_forward_cpu_s"]) == len(report["all_dump_loop_cpu_s"]) == 2
    assert {name: len(times) for name, times in report["all_epoch_s"].items()} == {
        "ce": 2,
        "cache": 2,
        "online": 2,
    }
    assert report["num_tokens"] > report["num_sequences"] > 0
    assert report["vocab_size"] == 300
    for key in (
        "bare_forward_tokens_per_s",
        "dump_loop_tokens_per_s",
        "dump_over_bare_throughput",
        "dump_over_bare_cpu_throughput",
        "feed_tokens_per_s",
        "cache_over_ce",
        "online_over_cache",
    ):
        assert report[key] > 0, key
    assert report["dump_loop_tokens_per_s"] == pytest.approx(
        report["num_tokens"] / report["dump_loop_s"], rel=1e-3
    )
    summary = summary_lines(report)
    for name in ("dump over bare throughput:", "feed tokens/s:", "cache over ce:"):
        assert any(line.startswith(name) for line in summary), name


def test_bench_lm_refuses_image_specs_naming_the_option(lm_files):
    refused = run_cli(
        "bench",
        "lm",
        "--teacher",
        "resnet18",
        "--student",
        f"hf:{lm_files['student']}",
        "--dataset",
        f"text:{lm_files['corpus']}",
        check=False,
    )
    assert_one_line_error(refused, "--teacher resnet18", "hf:PATH", "bench distill")
    with pytest.raises(ConfigError, match=r"--dataset fake:64:8:10.*text:FILE"):
        BenchLMOptions(
            teacher=f"hf:{lm_files['teacher']}",
            student=f"hf:{lm_files['student']}",
            dataset="fake:64:8:10",
        )
    refused = run_cli("bench", "distill", "--teacher", "hf:gpt2", check=False)
    assert_one_line_error(refused, "--teacher hf:gpt2", "kdcache bench lm")

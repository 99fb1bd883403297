"""The benchmarks' reports, on tiny models and data (their figures are not checked: speed is noise
here)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
import pytest
from conftest import assert_one_line_error, run_cli

from kdcache.bench.distill import bench_distill
from kdcache.bench.dump import bench_dump
from kdcache.bench.writer import bench_writer
from kdcache.cli.bench import (
    BenchDistillOptions,
    BenchDumpOptions,
    BenchFeedOptions,
    BenchInputsOptions,
    bench,
)
from kdcache.errors import ConfigError

TINY: dict[str, Any] = dict(
    dataset="fake:64:8:10", batch_size=32, repeats=2, device="cpu", threads=1
)


def test_bench_dump_reports_dump_and_bare_forward_side_by_side():
    result = bench_dump(teacher="cnn:4", **TINY)
    json.dumps(result)
    assert result["num_samples"] == 64
    assert result["repeats"] == 2
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
    assert result["views"] == 3
    assert result["writer_workers"] == 2
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


def test_bench_writer_writes_views_of_one_sample_together():
    result = bench_writer(
        encodings=("viewset:3",),
        workers=(1,),
        num_rows=64,
        num_classes=12,
        batch_size=16,
        repeats=1,
        views=4,
    )
    (run,) = result["runs"]
    assert result["views"] == 4
    assert run["encoding"] == "viewset:3"
    assert run["rows_per_s"] > 0
    assert run["rows_per_cpu_s"] > 0
    with pytest.raises(ConfigError, match="multiple of the views"):
        bench_writer(encodings=("float16",), num_rows=10, views=4)


def test_bench_writer_writes_the_first_rows_of_a_larger_dump():
    result = bench_writer(
        encodings=("float16",), num_rows=32, store_rows=4096, num_classes=5, batch_size=16
    )
    assert result["store_rows"] == 4096
    assert result["runs"][0]["rows_per_s"] > 0


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
        "--path",
        str(tmp_path / "not" / "yet"),
        "--json",
    )
    assert (tmp_path / "not" / "yet").is_dir()  # made, as a dump makes its --out's parents
    runs = json.loads(result.stdout)["runs"]
    assert [(run["encoding"], run["workers"]) for run in runs] == [
        ("float16", 1),
        ("float16", 2),
        ("int8", 1),
        ("int8", 2),
    ]
    refused = run_cli("bench", "dump", "--encoding", "float16,int8", check=False)
    assert_one_line_error(refused, "need --writer-only")
    (tmp_path / "a-file").write_text("")
    unmakeable = str(tmp_path / "a-file" / "folder")
    refused = run_cli(
        "bench", "dump", "--writer-only", "--dataset", "fake:8:4:5", "--rows", "64",
        "--path", unmakeable, check=False,
    )  # fmt: skip
    assert_one_line_error(refused, "cannot make that folder")


def test_the_summary_is_aligned_lines_with_units_and_json_only_on_request():
    args = ("bench", "dump", "--writer-only", "--dataset", "fake:8:4:5", "--rows", "64")
    summary = run_cli(*args, "--encoding", "float16,int8", "--repeats", "1").stdout
    assert "{" not in summary
    assert '"' not in summary
    lines = summary.splitlines()
    assert lines[0].split() == ["benchmark:", "writer"]
    assert "fsync:" in summary
    runs = lines.index("runs:")
    assert lines[runs + 1].split() == ["-", "encoding:", "float16"]
    assert lines[runs + 3].lstrip().startswith("rows/s:")
    assert lines[runs + 4].lstrip().startswith("rows/cpu-s:")
    assert lines[runs + 6].lstrip().startswith("all wall:")
    assert lines[runs + 6].endswith(" s")


def test_summary_values_carry_their_units():
    from kdcache.cli.bench import summary_lines

    assert summary_lines(
        {"open_s": 0.13612, "table_bytes": 4_000_000, "samples_per_cpu_s": 181975.2, "ok": True}
    ) == [
        "open:          0.136 s",
        "table:         3.8 MiB",
        "samples/cpu-s: 181,975",
        "ok:            yes",
    ]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("feed", BenchFeedOptions),
        ("dump", BenchDumpOptions),
        ("distill", BenchDistillOptions),
        ("inputs", BenchInputsOptions),
    ],
)
def test_every_bench_option_is_a_declared_field_with_its_default(name, options):
    params = {param.name: param for param in bench.commands[name].params if param.name != "help"}
    fields = {field.name: field for field in dataclasses.fields(options)}
    assert set(params) == set(fields)
    for field_name, field in fields.items():
        assert params[field_name].help == field.metadata["help"]
        if field.default is False:
            flag = params[field_name]
            assert isinstance(flag, click.Option)
            assert flag.is_flag
        else:
            assert params[field_name].default == field.default


def test_a_language_model_spec_is_refused_naming_its_option():
    refused = run_cli("bench", "distill", "--teacher", "hf:gpt2", check=False)
    assert_one_line_error(refused, "--teacher hf:gpt2", "image models", "resnet50")
    with pytest.raises(ConfigError, match=r"--dataset text:corpus.txt"):
        BenchInputsOptions(dataset="text:corpus.txt")

"""The kdcache command line, run in real subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_one_line_error, run_cli
from narrowing import kdcache_record

from kdcache import DumpConfig, create_store
from kdcache.dump.teacher import dump_teacher
from kdcache.store.format.metadata import FORMAT_VERSION


def test_dump_then_distill_end_to_end(tmp_path, digits_teacher):
    dumped = run_cli(
        "dump-teacher",
        "--teacher",
        "cnn:8",
        "--weights",
        str(digits_teacher),
        "--out",
        str(tmp_path / "t.zarr"),
        "--device",
        "cpu",
    )
    assert "N=1437 C=10 float16" in dumped.stdout
    assert "B/sample" in dumped.stdout
    attributes = kdcache_record(zarr.open_group(str(tmp_path / "t.zarr"), mode="r"))
    assert attributes["teacher"]["spec"] == "cnn:8"
    assert len(attributes["teacher"]["weights_sha256"]) == 64
    assert attributes["dataset"]["fingerprint"]["num_samples"] == 1437
    assert attributes["complete"]

    distilled = run_cli(
        "distill",
        "--student",
        "mlp:16",
        "--cache",
        str(tmp_path / "t.zarr"),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "kd"),
    )
    assert "best val_acc" in distilled.stdout
    assert ", 1 epoch in " in distilled.stdout
    assert json.loads((tmp_path / "kd/config.json").read_text())["temperature"] == 4.0


def test_user_errors_are_one_line(tmp_path, digits_store):
    assert_one_line_error(
        run_cli(
            "distill",
            "--student",
            "mlp",
            "--cache",
            str(tmp_path / "nope.zarr"),
            "--out",
            str(tmp_path / "r"),
            check=False,
        ),
        "no store at",
    )
    assert_one_line_error(
        run_cli(
            "distill",
            "--student",
            "mlp",
            "--cache",
            str(digits_store),
            "--temperature",
            "-1",
            "--out",
            str(tmp_path / "r"),
            check=False,
        ),
        "temperature must be > 0",
    )
    assert_one_line_error(
        run_cli("dump-teacher", "--teacher", "cnn", "--out", str(digits_store), check=False),
        "already holds a complete store; pass --overwrite to replace it",
    )
    assert kdcache_record(zarr.open_group(str(digits_store), mode="r"))["complete"]


def test_a_missing_required_option_is_a_usage_error_that_writes_nothing(tmp_path):
    result = run_cli("train", "--out", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert "Missing option '--model'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_the_commands():
    result = run_cli("--help")
    for command in ("train", "dump-teacher", "distill", "sweep", "inspect"):
        assert command in result.stdout


def test_sweep_end_to_end_and_resumed(tmp_path, digits_store):
    args = (
        "sweep",
        "--cache",
        str(digits_store),
        "--student",
        "mlp:8",
        "--temperatures",
        "1,4",
        "--seeds",
        "0,1",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "sweep"),
    )
    first = run_cli(*args)
    table = first.stdout.splitlines()
    assert table[0].split()[:2] == ["setting", "seeds"]
    assert [line.split()[:2] for line in table[1:3]] == [["kd-a0.7-T1", "2"], ["kd-a0.7-T4", "2"]]
    assert "4 runs trained, 0 kept" in first.stdout
    assert "[4/4] kd-a0.7-T4-seed1" in first.stderr
    rows = (tmp_path / "sweep/results.csv").read_text().splitlines()
    assert rows[0].startswith("setting,loss,alpha,temperature,seed,best_val_acc,final_val_acc")
    assert len(rows) == 5
    assert (tmp_path / "sweep/sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "0 runs trained, 4 kept" in run_cli(*args).stdout


def test_a_sweep_over_two_stores_in_two_jobs_equals_one_job(tmp_path, digits_store):
    from kdcache.store.tools.convert import convert_store

    other = convert_store(digits_store, tmp_path / "int8.zarr", encoding="int8").out
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        run_cli(
            "sweep",
            "--cache",
            str(digits_store),
            "--cache",
            str(other),
            "--student",
            "mlp:8",
            "--temperatures",
            "2,4",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--device",
            "cpu",
            "--jobs",
            jobs,
            "--out",
            str(out),
        )
        lines = (out / "results.csv").read_text().splitlines()
        # Wall time and run folder differ between the two sweeps; what was learnt may not.
        rows[jobs] = sorted(line.split(",")[:9] for line in lines[1:])
    assert len(rows["1"]) == 2  # one run per temperature, each distilled from both stores
    assert rows["1"] == rows["2"]


def test_sweep_user_errors_are_one_line(tmp_path, digits_store):
    common = ("--student", "mlp:8", "--out", str(tmp_path / "s"))
    assert_one_line_error(
        run_cli(
            "sweep", "--cache", str(digits_store), "--temperatures", "1,x", *common, check=False
        ),
        "--temperatures must be a comma-separated list, got '1,x'",
    )
    assert_one_line_error(
        run_cli("sweep", "--cache", str(tmp_path / "none.zarr"), *common, check=False),
        "no store at",
    )
    assert not (tmp_path / "s").exists()


def test_topk_store_through_the_cli_dump_inspect_distill(tmp_path, digits_teacher):
    store = str(tmp_path / "top3.zarr")
    dumped = run_cli(
        "dump-teacher",
        "--teacher",
        "cnn:8",
        "--weights",
        str(digits_teacher),
        "--out",
        store,
        "--device",
        "cpu",
        "--encoding",
        "topk:3",
    )
    assert "C=10 topk:3" in dumped.stdout
    assert "KL(T=1)" in dumped.stdout

    report = json.loads(
        run_cli("inspect", store, "--json", "--plot", str(tmp_path / "fig" / "store.png")).stdout
    )
    assert (tmp_path / "fig" / "store.png").read_bytes()[:4] == b"\x89PNG"
    assert report["encoding"] == "topk:3"
    assert report["complete"]
    assert report["num_samples"] == 1437
    assert report["fidelity"]["top1_agreement"] == 1.0
    assert len(report["fidelity"]["mean_kl"]) == 4
    assert 0 <= report["teacher_accuracy"] <= 100
    assert report["bytes_per_sample"] > 0

    # Distilling from it with k > K is refused before the run folder exists.
    assert_one_line_error(
        run_cli(
            "distill",
            "--student",
            "mlp:16",
            "--cache",
            store,
            "--epochs",
            "1",
            "--loss",
            "attention",
            "--top-k",
            "5",
            "--out",
            str(tmp_path / "kd5"),
            check=False,
        ),
        "--top-k 5 exceeds the 3 classes",
        "pass --top-k 3 or less",
    )
    assert not (tmp_path / "kd5").exists()


def test_bad_encodings_are_one_line_errors_that_write_nothing(tmp_path):
    assert_one_line_error(
        run_cli(
            "dump-teacher",
            "--teacher",
            "cnn:8",
            "--encoding",
            "bf16",
            "--out",
            str(tmp_path / "a.zarr"),
            check=False,
        ),
        "'bf16'",
        "float32, float16, int8, topk:K",
    )
    assert_one_line_error(
        run_cli(
            "dump-teacher",
            "--teacher",
            "cnn:8",
            "--encoding",
            "topk:10",
            "--out",
            str(tmp_path / "b.zarr"),
            check=False,
        ),
        "topk:10 keeps 10 classes",
        "K < 10",
    )
    assert not (tmp_path / "a.zarr").exists()
    assert not (tmp_path / "b.zarr").exists()


def tree_bytes(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, digits_store) -> Path:
    """Things users point kdcache at by mistake, beside the good digits store."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a folder")
    shutil.copytree(digits_store, root / "newer.zarr")
    group = zarr.open_group(str(root / "newer.zarr"), mode="r+")
    group.attrs["kdcache"] = {**kdcache_record(group), "format_version": FORMAT_VERSION + 1}
    writer = create_store(
        root / "five-classes.zarr", num_samples=1437, num_classes=5, chunk_rows=500
    )
    writer.write(np.arange(1437), np.zeros((1437, 5)))
    writer.finalize()
    dump_teacher(
        DumpConfig(
            teacher="cnn:4", dataset="fake:40:8:10", out=str(root / "fake.zarr"), device="cpu"
        )
    )
    return root


DISTILL = ("distill", "--student", "mlp:8", "--epochs", "1", "--out", "{tmp}/run")
BAD_INPUTS = {
    "folder that is not a store": ((*DISTILL, "--cache", "{root}/empty"), ["not a kdcache store"]),
    "newer format version": (
        (*DISTILL, "--cache", "{root}/newer.zarr"),
        [f"version {FORMAT_VERSION + 1}", "upgrade kdcache"],
    ),
    "other N": (
        (*DISTILL, "--cache", "{store}", "--dataset", "fake:50"),
        ["1437 samples", "has 50"],
    ),
    "other C": (
        (*DISTILL, "--cache", "{root}/five-classes.zarr", "--dataset", "digits"),
        ["5 classes", "has 10"],
    ),
    "other fingerprint": (
        (*DISTILL, "--cache", "{root}/fake.zarr", "--dataset", "fake:40:16:10"),
        ["labels differ"],
    ),
    # A missing store and temperature <= 0 are covered by test_user_errors_are_one_line above,
    # an unknown encoding by test_bad_encodings_are_one_line_errors_that_write_nothing.
    "alpha above 1": (
        (*DISTILL, "--cache", "{store}", "--alpha", "1.5"),
        ["alpha must lie in [0, 1], got 1.5"],
    ),
    "unknown model": (
        ("dump-teacher", "--teacher", "resnet-18", "--out", "{tmp}/t.zarr"),
        ["'resnet-18'", "Valid: mlp, cnn"],
    ),
    "unknown dataset": (
        ("dump-teacher", "--teacher", "cnn", "--dataset", "imagenette", "--out", "{tmp}/t.zarr"),
        ["'imagenette'", "valid kinds: digits, fake"],
    ),
    "weights of another model": (
        ("dump-teacher", "--teacher", "cnn:16", "--weights", "{teacher}", "--out", "{tmp}/t.zarr"),
        ["--teacher 'cnn:16' contradicts", "a checkpoint of model 'cnn:8'"],
    ),
    "weights that do not fit the dataset": (
        ("dump-teacher", "--weights", "{teacher}", "--dataset", "fake:20", "--out", "{tmp}/t.zarr"),
        ["dataset 'fake:20' (10 classes, 3 channels) is in use", "pass --dataset digits"],
    ),
    "batch size 0": (
        (*DISTILL, "--cache", "{store}", "--batch-size", "0"),
        ["--batch-size must be an integer from 1 to 16,777,216, got 0"],
    ),
    "unwritable store output": (
        ("dump-teacher", "--teacher", "cnn", "--out", "{root}/a-file/t.zarr"),
        ["cannot write a store at", "a-file/t.zarr", "choose a writable path"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_ends_in_one_line_and_damages_nothing(
    case, tmp_path, bad_inputs, digits_store, digits_teacher
):
    args, fragments = BAD_INPUTS[case]
    values = {"tmp": tmp_path, "root": bad_inputs, "store": digits_store, "teacher": digits_teacher}
    before = tree_bytes(bad_inputs, digits_store)
    result = run_cli(*(arg.format(**values) for arg in args), check=False)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 1
    assert tree_bytes(bad_inputs, digits_store) == before
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "t.zarr").exists()


def test_distill_with_a_cache_memory_budget(tmp_path, digits_store):
    # 15 chunks of 100 rows x 10 float32 logits (4,000 bytes each): 16KiB holds four of them.
    writer = create_store(
        tmp_path / "t.zarr",
        num_samples=1437,
        num_classes=10,
        encoding="float32",
        chunk_rows=100,
        dataset={"spec": "digits", "split": "train"},
    )
    writer.write(np.arange(1437), np.random.default_rng(0).normal(size=(1437, 10)))
    writer.finalize()
    run_cli(
        "distill",
        "--student",
        "mlp:8",
        "--cache",
        str(tmp_path / "t.zarr"),
        "--epochs",
        "1",
        "--num-workers",
        "2",
        "--cache-memory",
        "16KiB",
        "--out",
        str(tmp_path / "kd"),
    )
    resolved = json.loads((tmp_path / "kd/config.json").read_text())["resolved"]
    assert resolved["feed"] == {"mode": "chunked", "memory_budget": 16384}
    assert_one_line_error(
        run_cli(
            "distill",
            "--student",
            "mlp",
            "--cache",
            str(digits_store),
            "--cache-memory",
            "1KB",
            "--out",
            str(tmp_path / "r"),
            check=False,
        ),
        "at least",
        "--cache-memory",
    )


def test_bench_json_output_parses(tmp_path):
    feed = json.loads(
        run_cli("bench", "feed", "--num-samples", "3000", "--max-batches", "4", "--json").stdout
    )
    assert set(feed["modes"]) == {"memory", "chunked"}
    assert (
        feed["modes"]["chunked"]["table_bytes"] <= feed["modes"]["chunked"]["memory_budget_bytes"]
    )
    assert all(
        mode["batches"] == 4 and mode["samples_per_s"] > 0 for mode in feed["modes"].values()
    )


def test_an_impossible_warm_up_is_refused_in_one_line(tmp_path):
    result = run_cli(
        "train",
        "--model",
        "mlp",
        "--epochs",
        "2",
        "--warmup-epochs",
        "3",
        "--out",
        str(tmp_path / "run"),
        check=False,
    )
    assert result.returncode == 1
    assert_one_line_error(result, "--warmup-epochs 3 is longer than the run (--epochs 2)")
    assert not (tmp_path / "run").exists()

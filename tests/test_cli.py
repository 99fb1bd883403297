"""The kdcache command line, run in real subprocesses."""

from __future__ import annotations

import json

import zarr

from conftest import assert_one_line_error, run_cli


def test_dump_then_distill_end_to_end(tmp_path, digits_teacher):
    dumped = run_cli("dump-teacher", "--teacher", "cnn:8", "--weights", str(digits_teacher), "--out",
                     str(tmp_path / "t.zarr"), "--device", "cpu")
    assert "N=1437 C=10 float16" in dumped.stdout and "B/sample" in dumped.stdout
    attributes = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["kdcache"]
    assert attributes["teacher"]["spec"] == "cnn:8" and len(attributes["teacher"]["weights_sha256"]) == 64
    assert attributes["dataset"]["fingerprint"]["num_samples"] == 1437 and attributes["complete"]

    distilled = run_cli("distill", "--student", "mlp:16", "--cache", str(tmp_path / "t.zarr"), "--epochs", "1",
                        "--out", str(tmp_path / "kd"))
    assert "best val_acc" in distilled.stdout
    assert json.loads((tmp_path / "kd/config.json").read_text())["temperature"] == 4.0


def test_user_errors_are_one_line(tmp_path, digits_store):
    assert_one_line_error(run_cli("distill", "--student", "mlp", "--cache", str(tmp_path / "nope.zarr"),
                                  "--out", str(tmp_path / "r"), check=False), "no store at")
    assert_one_line_error(run_cli("distill", "--student", "mlp", "--cache", str(digits_store), "--temperature", "-1",
                                  "--out", str(tmp_path / "r"), check=False), "temperature must be > 0")
    assert_one_line_error(run_cli("dump-teacher", "--teacher", "cnn", "--out", str(digits_store), check=False),
                          "--overwrite")
    assert zarr.open_group(str(digits_store), mode="r").attrs["kdcache"]["complete"]


def test_help_lists_the_commands():
    result = run_cli("--help")
    for command in ("train", "dump-teacher", "distill"):
        assert command in result.stdout

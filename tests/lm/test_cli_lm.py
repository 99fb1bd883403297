"""The same commands as for images, with hf:PATH and text:FILE (two real subprocesses)."""

from __future__ import annotations

from conftest import run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)


def test_dump_then_distill_through_the_cli(tmp_path, lm_files):
    store = tmp_path / "t.zarr"
    dumped = run_cli(
        "dump-teacher",
        "--teacher",
        f"hf:{lm_files['teacher']}",
        "--dataset",
        f"text:{lm_files['corpus']}:16",
        "--encoding",
        "sampled:6",
        "--batch-size",
        "16",
        "--out",
        str(store),
    )
    assert "sequences" in dumped.stdout
    assert "B/token" in dumped.stdout
    refused = run_cli(
        "distill",
        "--cache",
        str(store),
        "--student",
        f"hf:{lm_files['student']}",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        check=False,
    )
    # the default temperature (4) cannot be met by draws taken at T = 1: one line, exit 1
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "--temperature 1" in lines[0], refused.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder is made

"""Progress wherever a user waits: bars on a terminal, whole lines in logs, a start-up line."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import time

import pytest
from conftest import cli_environment

from kdcache import DumpConfig
from kdcache.dump.teacher import dump_teacher
from kdcache.progress import progress


def test_a_log_gets_whole_lines_only_once_a_phase_runs_long(capsys, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="kdcache")
    for _ in progress(range(3), desc="fast", unit="batch"):
        pass
    assert capsys.readouterr().err == ""  # a short phase (and its errors) stays clean
    monkeypatch.setenv("KDCACHE_PROGRESS_SECONDS", "0.01")
    for _ in progress(range(4), desc="slow", unit="batch"):
        time.sleep(0.03)
    lines = capsys.readouterr().err.splitlines(keepends=True)
    assert lines
    assert all(line.startswith("slow: ") and line.endswith("\n") for line in lines)
    assert "\r" not in "".join(lines)
    assert "batch/s" in lines[-1]
    caplog.set_level(logging.WARNING, logger="kdcache")  # --quiet
    for _ in progress(range(4), desc="quiet", unit="batch"):
        time.sleep(0.03)
    assert capsys.readouterr().err == ""


def test_a_dump_of_views_counts_views(tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="kdcache")
    monkeypatch.setenv("KDCACHE_PROGRESS_SECONDS", "0")
    dump_teacher(
        DumpConfig(
            teacher="teachers:slow",
            dataset="fake:24:8:4",
            out=str(tmp_path / "v.zarr"),
            views=2,
            augment="flip",
            batch_size=8,
            device="cpu",
        )
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dump: ")]
    assert lines
    assert all("view" in line and "sample" not in line for line in lines)
    assert "48/48" in lines[-1]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_command_says_it_started_on_a_terminal(tmp_path):
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "kdcache", "train", "--model", "resnet51", "--out", str(tmp_path)],
        env=cli_environment(),
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        output += data
    process.wait(timeout=120)
    os.close(main)
    lines = output.decode().splitlines()
    assert lines[0].startswith("train: starting")
    assert lines[-1].startswith("Error: unknown model 'resnet51'")
    assert process.returncode == 1

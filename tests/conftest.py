"""Shared fixtures: running the real CLI in a subprocess, tiny stores and runs on digits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from PIL import Image
from warm_interpreter import WarmInterpreter

# CI replays the same examples every run (a red CI must be reproducible); elsewhere the fuzzers
# explore new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and so would
# every kdcache process it starts: the tests that press Ctrl-C need it handled.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def cli_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a kdcache subprocess: this checkout first, then tests/ (teachers.py)."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), str(TESTS_DIR), environment.get("PYTHONPATH")])
    )
    return environment


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m kdcache ARGS`` without waiting for it (to kill it midway)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache", *args],
        env=cli_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


#: For a subprocess whose training a test compares bit for bit with one in the test's process
#: (under :func:`one_torch_thread`): on CPU the sums' order, so their last bits, follow the
#: number of torch threads, which other tests may have changed in this process.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch computing on one thread in this process during the test (see :data:`ONE_THREAD`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_once_halted(process: subprocess.Popen, halted: Path, *, group: bool = False) -> None:
    """Wait until ``process`` creates ``halted`` (tests/teachers.py's ``halt_if_chosen``), then
    kill it (with ``group``, its whole session: a torchrun launcher and its ranks)."""
    deadline = time.monotonic() + 300
    while not halted.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{halted} never appeared"
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait()


#: Packages every CLI test process imports: the warm interpreter (:func:`run_cli`) has them.
CLI_PRELOAD = ("torch", "torchvision", "transformers")
_warm_cli: WarmInterpreter | None = None


def _warm_interpreter() -> WarmInterpreter:
    global _warm_cli
    if _warm_cli is None or _warm_cli.process.poll() is not None:
        _warm_cli = WarmInterpreter(CLI_PRELOAD, env=cli_environment(), cwd=REPO_ROOT)
    return _warm_cli


@pytest.fixture(scope="session", autouse=True)
def _close_warm_interpreter() -> Iterator[None]:
    yield
    if _warm_cli is not None:
        _warm_cli.close()


def run_cli(
    *args: str,
    cwd: Path | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m kdcache ARGS`` in a fresh process, as a user would.

    The process is forked from a warm interpreter that imported :data:`CLI_PRELOAD` once
    (tests/warm_interpreter.py), unless ``preexec_fn`` or an environment variable read at
    interpreter start-up asks for a genuinely new interpreter.
    """
    command = [sys.executable, "-m", "kdcache", *args]
    environment = cli_environment(env)
    warm = _warm_interpreter() if preexec_fn is None else None
    if warm is not None and warm.serves(environment):
        returncode, stdout, stderr = warm.run(
            command[2:], cwd=cwd or Path.cwd(), env=environment, module="kdcache", timeout=600
        )
        result = subprocess.CompletedProcess(command, returncode, stdout, stderr)
    else:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=preexec_fn,
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kdcache {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one line on stderr naming ``fragments``, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session", autouse=True)
def _private_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Datasets drawn and cached by the tests (``glyphs``) go to a temporary folder, never to the
    user's cache; the CLI's subprocesses inherit it."""
    from kdcache.data.datasets.glyphs import CACHE_DIR_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cnn teacher trained for two epochs on digits (checkpoint path)."""
    from kdcache import TrainConfig
    from kdcache.train.loop import train

    out = tmp_path_factory.mktemp("teacher")
    train(TrainConfig(model="cnn:8", dataset="digits", out=str(out), epochs=2, batch_size=64))
    return out / "best.pt"


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> Path:
    """A complete float32 store of the digits teacher's logits on the train split."""
    from kdcache import DumpConfig
    from kdcache.dump.teacher import dump_teacher

    out = tmp_path_factory.mktemp("stores") / "digits.zarr"
    dump_teacher(
        DumpConfig(
            teacher="cnn:8",
            weights=str(digits_teacher),
            out=str(out),
            encoding="float32",
            device="cpu",
        )
    )
    return out


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto) on 127.0.0.1; yields the AWS variables that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test S3 server, with this process's AWS variables pointing at it."""
    import s3fs

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = f"kdcache-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def assert_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    """A complete PNG of at least ``min_size`` pixels, with no temporary file left beside it."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0]
        assert image.size[1] >= min_size[1]
    assert not path.with_name(path.name + ".tmp").exists()

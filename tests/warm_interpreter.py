"""Real processes without paying the heavy imports each time: a warm interpreter that forks.

A :class:`WarmInterpreter` is one ``python`` process that imports some third-party packages
(torch, torchvision, ...) once and then, for each request, forks a fresh child that runs a
module as ``python -m MODULE ARGS`` would, or a piece of code as a script, in its own
working directory and environment, with its own stdout and stderr, and ends as that process
would end (an uncaught exception prints its traceback and exits 1, ``sys.exit`` gives its
status, non-daemon threads are waited for and atexit handlers run). The interpreter runs
nothing before it forks (torch's thread pools start in each child, with the child's settings)
and imports nothing of kdcache: each child imports kdcache afresh, reading its environment then.

Variables that the interpreter or the preloaded packages read at start-up (``PYTHON*``, thread
and device settings), and a ``PYTHONPATH`` entry holding a ``sitecustomize`` or a package that
shadows a preloaded one, cannot take effect in a child: :meth:`WarmInterpreter.serves` says
whether an environment asks for any of them, and callers then start a fresh process.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: The server: imports the packages named on its command line, then for each request line forks
#: a child (answering with its pid) and, once the child has ended, answers with its exit status.
SERVER = r"""
import atexit, importlib, json, os, runpy, sys, threading, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
base_path = list(sys.path[1:])
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
        os.chdir(request["cwd"])
        if request["env"] is not None:
            os.environ.clear()
            os.environ.update(request["env"])
        extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        sys.path[:] = [request["path0"], *extra, *[p for p in base_path if p not in extra]]
        sys.argv = list(request["argv"])
        try:
            if request["module"]:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            else:
                name = request["argv"][0]
                code = compile(request["code"], "<string>" if name == "-c" else name, "exec")
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
            status = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                status = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        # What interpreter shutdown does, short of tearing down every object (which would
        # copy each page shared with this server, seconds per child).
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(json.dumps(pid), flush=True)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(wait_status)), flush=True)
"""

#: Environment variables read when the interpreter or a preloaded package starts (never again).
STARTUP_PREFIXES = (
    *("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "TORCH", "PYTORCH_"),
    *("HF_", "TRANSFORMERS_", "TOKENIZERS_"),
)


def _startup_variables(env: dict[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in env.items()
        if key.startswith(STARTUP_PREFIXES) and key != "PYTHONPATH"
    }


class WarmInterpreter:
    """One interpreter with ``preload`` imported, forking a child per :meth:`run`."""

    def __init__(self, preload: tuple[str, ...], *, env: dict[str, str], cwd: Path) -> None:
        self._startup = _startup_variables(env)
        self._path = env.get("PYTHONPATH", "").split(os.pathsep)
        #: Files that an added sys.path entry would need a new interpreter to honour: start-up
        #: hooks, and packages shadowing the preloaded ones.
        self._startup_files = {"sitecustomize.py", "usercustomize.py"}
        self._startup_files |= {name for top in preload for name in (top, f"{top}.py")}
        self._outputs = Path(tempfile.mkdtemp(prefix="kdcache-warm-"))
        self._count = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, *preload],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a child can run with ``env``: it agrees with the warm one on the start-up
        variables."""
        added = set(env.get("PYTHONPATH", "").split(os.pathsep)) - set(self._path)
        return (
            _startup_variables(env) == self._startup
            and not any(
                (Path(entry) / name).exists()
                for entry in added
                if entry
                for name in self._startup_files
            )
            and self.process.poll() is None
        )

    def run(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        module: str | None = None,
        code: str | None = None,
        timeout: float,
        merge_output: bool = False,
    ) -> tuple[int, str, str]:
        """Run ``python -m MODULE ARGV[1:]`` (``module``) or the script ``code`` named
        ``ARGV[0]``, in ``cwd`` with ``env`` (the warm one if None): exit status, stdout, stderr
        (stderr also into stdout with ``merge_output``). Raises ``subprocess.TimeoutExpired``
        after killing a child that outlives ``timeout`` seconds."""
        self._count += 1
        stdout = self._outputs / f"{self._count}.out"
        stderr = stdout if merge_output else self._outputs / f"{self._count}.err"
        request = {
            "argv": argv,
            "cwd": str(cwd),
            "env": env,
            "module": module,
            "code": code,
            # ``python -m`` puts the working directory first on sys.path, a script its folder.
            "path0": str(cwd) if module else str((cwd / argv[0]).parent),
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        pid = self._ask(json.dumps(request) + "\n", timeout)
        try:
            status = self._ask("", timeout)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self._ask("", timeout)
            raise
        try:
            return status, stdout.read_text(), "" if merge_output else stderr.read_text()
        finally:
            stdout.unlink()
            stderr.unlink(missing_ok=True)

    def _ask(self, line: str, timeout: float) -> int:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        if line:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(self.process.args, timeout)
        answer = self.process.stdout.readline()
        assert answer, "the warm interpreter died"
        return int(json.loads(answer))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        for leftover in self._outputs.iterdir():
            leftover.unlink()
        self._outputs.rmdir()

"""A ``bentoml serve`` subprocess of the service on a free local port, ready or failed within a deadline.

Used by ``csc bench --http`` when it is given no URL, and by the tests. The server runs in its own process
group, so stopping it ends the BentoML workers it spawned as well (and nothing else).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

SERVICE = "csc_serve.service.api:CSCService"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(env={"CSC_MODEL": ...}) as server: server.url``; ``timeout`` bounds the start.
    ``target``: the service import path, a Bento tag, or ``None`` for the ``bentofile.yaml`` in ``cwd``;
    ``python``: the interpreter that runs ``bentoml`` (default: this one)."""

    def __init__(self, env: Mapping[str, str] | None = None, args: tuple[str, ...] = (), timeout: float = 300,
                 cwd: str | os.PathLike | None = None, target: str | None = SERVICE,
                 python: str | os.PathLike = sys.executable):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
        self.args, self.timeout, self.cwd, self.target, self.python = args, timeout, cwd, target, python
        self.process: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix="csc-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        # No target: 'bentoml serve' finds the service in the bentofile.yaml of ``cwd``.
        target = [self.target] if self.target else []
        command = [os.fspath(self.python), "-m", "bentoml", "serve", *target, "--host", "127.0.0.1",
                   "--port", str(self.port), *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop(keep_log=True)  # the error names the log
            raise

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChildProcessError(f"bentoml serve exited with code {self.process.returncode}: "
                                        f"{self.last_error()} (log: {self.log_path})")
            if self.status("/readyz") == 200:
                return
            time.sleep(0.25)
        raise TimeoutError(f"bentoml serve was not ready within {self.timeout:.0f} s: {self.last_error()} "
                           f"(log: {self.log_path})")

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (OSError, ValueError):
            return None

    def last_error(self) -> str:
        """The last line of the server's log that reads like an error (or its last line)."""
        try:
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        errors = [line for line in lines if "Error" in line or "error" in line]
        return (errors or lines or ["empty log"])[-1]

    def stop(self, keep_log: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
            except ProcessLookupError:
                pass
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

"""Helpers for tests that start real servers (`mlflow models serve`, `mlflow ui`): a free port, and a
context manager that waits for the server to answer and kills its whole process group afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_uri: str, port: int) -> list[str]:
    """`mlflow models serve` as the README starts it: this Python, no new environment, request timeout 600 s."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-p", str(port), "-h", "127.0.0.1", "-t", "600"]  # fmt: skip


def clean_env(**extra) -> dict:
    """The environment without the MLFLOW_* variables in-process tests may have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def running(cmd, ready_url: str, log: Path, timeout: float = 180, **popen):
    """Start `cmd` (a list, or a string for bash) in its own session, wait until `ready_url` answers
    200, yield the process, then stop the whole process group (uvicorn workers included)."""
    shell = isinstance(cmd, str)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            ["bash", "-c", cmd] if shell else cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"server did not answer {ready_url} in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post_json(url: str, body: bytes, timeout: float = 600) -> tuple[int, bytes]:
    """(HTTP status, body) of a JSON POST; error statuses are returned, not raised."""
    import urllib.error

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()

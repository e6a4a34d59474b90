"""Helpers the test files share: waiting on a condition with a deadline, and starting and
stopping service processes by PID. Fixtures built on them live in conftest.py; free ports come
from `services.common.ports`, as the launcher's do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition", interval: float = 0.02,
               log: Path | None = None) -> T:
    """Poll `condition` until it returns something truthy and return that; past `timeout` seconds,
    fail the test naming `what` (with the tail of `log`, the process output that explains it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}".rstrip())


def start_service(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m <module> <args>` from the repository root, unbuffered, its output in `log`."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Kill `proc` by its PID if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)

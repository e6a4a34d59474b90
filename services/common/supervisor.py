"""Service processes started and stopped on this machine: by the local-cluster launcher and by the
autoscaler's local actuator.

A child runs in its own session (Ctrl-C in the parent's terminal does not reach it), stdin closed,
stdout and stderr appended to its log file after a `---- start <time> <argv>` line. Stopping is by
PID: SIGTERM, then SIGKILL once the grace has passed; a stopped child is waited for so that it
leaves no zombie.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

DEFAULT_GRACE_S = 15.0
KILL_WAIT_S = 5.0  # after SIGKILL only the kernel is left to act
POLL_S = 0.05
EXPERT_PROGRAM = (sys.executable, "-m", "services.expert")


def expert_replica_command(*, model: str | os.PathLike, experts: str, shard: str, replica_id: str, cluster: str,
                           redis_url: str, host: str, port: int = 0, metrics_port: int = 0, plane: int = 0,
                           device: str | None = None, dtype: str | None = None, advertise_host: str | None = None,
                           log_level: str | None = None, ucx_port: int | None = None, cpus: str | None = None,
                           program: Sequence[str] = EXPERT_PROGRAM) -> list[str]:
    """The argv of one expert replica serving `experts` (e.g. "0-3") as `replica_id` of `shard`;
    flags left at None are not passed, so the service's own defaults apply."""
    argv = [*program, "--model", str(model)]
    argv += ["--device", device] if device else []
    argv += ["--dtype", dtype] if dtype else []
    argv += ["--cluster", cluster, "--redis-url", redis_url, "--host", host]
    argv += ["--advertise-host", advertise_host] if advertise_host else []
    argv += ["--port", str(port), "--metrics-port", str(metrics_port)]
    argv += ["--log-level", log_level] if log_level else []
    argv += ["--experts", experts, "--shard", shard, "--replica-id", replica_id, "--plane", str(plane)]
    argv += ["--ucx-port", str(ucx_port)] if ucx_port is not None else []
    argv += ["--cpus", cpus] if cpus else []
    return argv


def start_child(argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start `argv` logging to `log_path` (appended); OSError when it cannot be started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"---- start {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, start_new_session=True)


@dataclass
class Child:
    """A child this process started; `stop_deadline` is set once it was asked to stop."""

    name: str
    process: subprocess.Popen
    log_path: Path
    stop_deadline: float | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_deadline is not None

    def terminate(self, grace_s: float) -> None:
        """SIGTERM without waiting; `reap` sends SIGKILL once `grace_s` has passed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.stop_deadline = time.monotonic() + grace_s


def reap(children: Iterable[Child], *, exited: Callable[[Child, int], None] = lambda child, status: None,
         killed: Callable[[Child], None] = lambda child: None) -> list[Child]:
    """The children still running. Each one that has exited is reported to `exited` (with its exit
    status) and dropped; each one past its stop deadline gets SIGKILL, is reported to `killed`, and
    is kept until it has exited."""
    running = []
    for child in children:
        status = child.process.poll()
        if status is not None:
            exited(child, status)
            continue
        if child.stopping and time.monotonic() > child.stop_deadline:
            killed(child)
            child.process.kill()
        running.append(child)
    return running


def wait_or_kill(process: subprocess.Popen, timeout: float,
                 killing: Callable[[subprocess.Popen], None] = lambda process: None) -> int | None:
    """Wait up to `timeout` for `process` to exit, then SIGKILL it (telling `killing` first) and
    wait for that; returns its exit status."""
    try:
        return process.wait(max(0.0, timeout))
    except subprocess.TimeoutExpired:
        killing(process)
        process.kill()
        return process.wait(KILL_WAIT_S)


def stop_children(processes: Sequence[subprocess.Popen], grace_s: float = DEFAULT_GRACE_S,
                  killing: Callable[[subprocess.Popen], None] = lambda process: None) -> None:
    """SIGTERM each running one at once, give all of them `grace_s` together, SIGKILL stragglers."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        wait_or_kill(process, deadline - time.monotonic(), killing)


# ---- PIDs this process did not start (`moe down` stops a cluster another `moe up` started) ----

def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_pids(pids: Iterable[int], grace_s: float = DEFAULT_GRACE_S) -> list[int]:
    """SIGTERM each live PID, wait up to `grace_s`, SIGKILL stragglers; returns the killed ones.

    Callers check that each PID is still the process they mean: this signals exactly the PIDs given.
    """
    targets = [p for p in pids if p and pid_alive(p)]
    for pid in targets:
        send_signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in targets):
        time.sleep(POLL_S)
    killed = [p for p in targets if pid_alive(p)]
    for pid in killed:
        send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and any(pid_alive(p) for p in killed):
        time.sleep(POLL_S)
    return killed

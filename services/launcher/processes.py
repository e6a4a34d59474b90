"""Processes of a local cluster: what was started, whether a PID is still ours, health probes and
log tails. `cluster.py` composes these into a cluster; `services.common.supervisor` starts and
stops them.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.supervisor import pid_alive

HOST = "127.0.0.1"
LOG_TAIL_LINES = 20


@dataclass
class ManagedProcess:
    """One process of the cluster and how to (re)start it."""

    name: str                 # unique in the cluster, e.g. "shard-0-3.r1"
    kind: str                 # redis | router | expert | attention | gateway
    label: str                # for progress lines, e.g. "expert shard-0-3 replica 2/2"
    cmd: list[str]
    port: int                 # gRPC port (Redis: its port)
    log_path: Path
    metrics_port: int = 0
    replica_id: str = ""
    plane: int | None = None
    shard: str = ""
    experts: str = ""
    ucx_port: int = 0
    popen: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def current_pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_status(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def to_json(self) -> dict:
        return {"kind": self.kind, "pid": self.current_pid(), "port": self.port, "endpoint": self.endpoint,
                "metrics_port": self.metrics_port, "log": str(self.log_path), "replica_id": self.replica_id,
                "plane": self.plane, "shard": self.shard, "experts": self.experts, "ucx_port": self.ucx_port,
                "label": self.label, "cmd": self.cmd}


# ---- PIDs of a cluster another `moe up` started (moe down) --------------------------------

def pid_belongs_to(pid: int, cluster: str, kind: str = "", port: int = 0) -> bool:
    """True when `pid` is still the process we started (a recycled PID is not); True without /proc.

    Services carry MOE_CLUSTER=<cluster> in their environment. redis-server rewrites its process
    title over argv and environ, so it is recognised by "redis" and its address in the title.
    """
    proc = Path(f"/proc/{pid}")
    try:
        if kind == "redis":
            title = (proc / "cmdline").read_bytes()
            return b"redis" in title and f"{HOST}:{port}".encode() in title
        environ = (proc / "environ").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return f"MOE_CLUSTER={cluster}".encode() in environ.split(b"\0")


def cluster_pids(cluster: str) -> list[int]:
    """Live PIDs whose environment carries MOE_CLUSTER=<cluster> (Linux /proc; [] elsewhere)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if pid != os.getpid() and f"MOE_CLUSTER={cluster}".encode() in environ.split(b"\0") and pid_alive(pid):
            out.append(pid)
    return sorted(out)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (log is empty)"


def health_status(endpoint: str, timeout: float = 0.5, channel: grpc.Channel | None = None) -> str:
    """grpc.health.v1 status name of service "" at `endpoint` ("UNREACHABLE" when no answer)."""
    own = channel is None
    channel = channel or grpc.insecure_channel(endpoint)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        if own:
            channel.close()


def redis_ping(port: int, password: str | None = None) -> bool:
    import redis

    client = redis.Redis(host=HOST, port=port, password=password, socket_connect_timeout=0.3, socket_timeout=0.3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()

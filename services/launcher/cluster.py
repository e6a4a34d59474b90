"""A whole cluster as local processes: Redis, router, expert shards, attention workers, gateway.

    with LocalCluster("ckpt/", shards=2, replicas=2, attention_workers=2, run_dir=tmp) as cluster:
        Client(cluster.gateway_endpoint).generate(prompt_ids=[1, 2, 3])
        cluster.stop_process("shard-0-3.r1", signal.SIGKILL)    # lose a replica
        cluster.start_process("shard-0-3.r1"); cluster.wait_serving("shard-0-3.r1")

Every process runs `python -m services.<name>` (Redis: its own binary) in its own session, on
free loopback ports, logging to `<run_dir>/logs/<name>.log`, with `MOE_CLUSTER=<prefix>` in its
environment (`moe down` checks it before signalling a PID it did not start itself).
Process names: "redis", "router", "shard-<a>-<b>.r<k>" (replica k of the shard holding experts
a..b), "attention-<w>", "gateway". Startup runs everything at once and waits on all: each must
answer SERVING on grpc.health.v1 (Redis: PING), then the router must report every replica
registered and a plan with no missing expert. If one exits or the deadline passes, everything is
stopped and ClusterError names the culprit with the tail of its log.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import json
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

from services.common.cpus import available_cpus, deal_cpus
from services.common.expert_ids import format_id_list
from services.common.ports import free_ports
from services.common.supervisor import (
    DEFAULT_GRACE_S,
    expert_replica_command,
    pid_alive,
    start_child,
    stop_children,
    stop_pids,
    wait_or_kill,
)
from services.launcher.preflight import (
    ClusterError,
    check_flags,
    check_weight_files,
    read_n_experts,
    split_experts,
)
from services.launcher.processes import HOST, ManagedProcess, health_status, log_tail, pid_belongs_to, redis_ping

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_ORDER = ("gateway", "attention", "expert", "router", "redis")
DEFAULT_READY_TIMEOUT_S = 180.0
STATE_FILE = "cluster.json"


def expert_plane(shard: int, replica: int, planes: int) -> int:
    """Replicas of one shard sit on different planes while there are planes enough."""
    return (shard + replica) % planes


def visible_gpus() -> list[str]:
    """GPU ids this host offers: CUDA_VISIBLE_DEVICES when set, else every GPU torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class LocalCluster:
    """Start, watch and stop a cluster of local processes (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, shards: int = 2, replicas: int = 2, attention_workers: int = 2,
                 planes: int = 1, transport: str = "grpc", dispatch_dtype: str | None = None,
                 dtype: str | None = None, run_dir: str | os.PathLike | None = None,
                 extra_env: dict[str, str] | None = None, *, gateway_port: int = 0, device: str = "cpu",
                 extra_args: dict[str, list[str]] | None = None, cluster: str | None = None,
                 log_level: str = "info", ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
                 stop_timeout: float = DEFAULT_GRACE_S, progress: Callable[[str], None] | None = None,
                 gpus: list[str] | None = None, compile_decode: bool = False, pin_cpus: bool = False) -> None:
        """extra_args: more flags per process name or per kind (appended last, so they win).
        compile_decode: attention workers compile their CPU decode steps before serving.
        pin_cpus: each shard replica and attention worker runs on CPUs of its own (`--cpus`), dealt
        out of the launcher's in start order, shard replicas first (`deal_cpus`): on a host with
        fewer CPUs than model processes, one each in turn (2 CPUs, 2 shards and a worker: the
        worker shares the first shard's).
        transport: "grpc" (this API's default, which tests rely on), "ucx", or "auto" (`moe up`'s
        default: shards listen on UCX where ucxx is installed, and workers use it where offered).
        gpus: with device "cuda", the GPU ids the shard replicas and attention workers are spread
        over, one per process in turn (CUDA_VISIBLE_DEVICES of each); default: the launcher's
        CUDA_VISIBLE_DEVICES, else every GPU the host has."""
        check_flags(shards, replicas, attention_workers, planes, gateway_port, ready_timeout, transport)
        self.model_dir = Path(model_dir).resolve()
        self.n_experts = read_n_experts(self.model_dir)
        check_weight_files(self.model_dir)
        self.ranges = split_experts(self.n_experts, shards)
        self.shards, self.replicas, self.attention_workers, self.planes = shards, replicas, attention_workers, planes
        self.transport, self.dispatch_dtype, self.dtype, self.device = transport, dispatch_dtype, dtype, device
        self.run_dir = Path(run_dir if run_dir is not None else ".run").resolve()
        self.extra_env = dict(extra_env or {})
        self.extra_args = dict(extra_args or {})
        self.cluster = cluster or f"moe-{secrets.token_hex(4)}"
        # the cluster's Redis requires AUTH: the password lives in the run directory's redis.conf
        # (mode 0600) and reaches the services as MOE_REDIS_PASSWORD, never on a command line
        self.redis_password = secrets.token_urlsafe(24)
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.progress = progress or (lambda line: None)
        self.gpus = (visible_gpus() if gpus is None else list(gpus)) if device == "cuda" else []
        self.gateway_port = gateway_port
        self.compile_decode = compile_decode
        self.pin_cpus = pin_cpus
        self.processes: dict[str, ManagedProcess] = {}
        self.detached = False
        self._started = False
        self._status = "starting"
        self._build()

    def _build(self) -> None:
        n_services = 3 + self.model_processes
        ports = free_ports(2 * n_services + self.shards * self.replicas)
        take = iter(ports).__next__
        logs = self.run_dir / "logs"
        py = [sys.executable, "-m"]

        def common(name: str, port: int, metrics: int) -> list[str]:
            return ["--cluster", self.cluster, "--redis-url", self.redis_url_for(redis_port), "--host", HOST,
                    "--advertise-host", HOST, "--port", str(port), "--metrics-port", str(metrics),
                    "--log-level", self.log_level]

        def weights() -> list[str]:
            out = ["--model", str(self.model_dir), "--device", self.device]
            return out + (["--dtype", self.dtype] if self.dtype else [])

        placed = itertools.count()  # model processes given a GPU so far
        dealt = iter(deal_cpus(available_cpus(), self.model_processes)) if self.pin_cpus else None

        def cpus() -> str | None:
            """The next model process's `--cpus`, when pinning."""
            return format_id_list(next(dealt)) if dealt else None

        def on_gpu(label: str) -> tuple[str, dict[str, str]]:
            """The next model process's GPU (round robin), as a label suffix and its environment."""
            if not self.gpus:
                return label, {}
            gpu = self.gpus[next(placed) % len(self.gpus)]
            return f"{label} on GPU {gpu}", {"CUDA_VISIBLE_DEVICES": gpu}

        redis_port = take()
        self._add(ManagedProcess("redis", "redis", "redis", self._redis_cmd(redis_port), redis_port,
                                 logs / "redis.log"))
        port, metrics = take(), take()
        self._add(ManagedProcess("router", "router", "router",
                                 py + ["services.router", "--model", str(self.model_dir)] + common("router", port, metrics),
                                 port, logs / "router.log", metrics))
        for i, (first, last) in enumerate(self.ranges):
            shard = f"shard-{first}-{last}"
            for r in range(self.replicas):
                name = f"{shard}.r{r}"
                port, metrics = take(), take()
                ucx = take() if self.serves_ucx else 0
                plane = expert_plane(i, r, self.planes)
                cmd = expert_replica_command(
                    model=self.model_dir, device=self.device, dtype=self.dtype, cluster=self.cluster,
                    redis_url=self.redis_url_for(redis_port), host=HOST, advertise_host=HOST, port=port,
                    metrics_port=metrics, log_level=self.log_level, experts=f"{first}-{last}", shard=shard,
                    replica_id=name, plane=plane, ucx_port=ucx, cpus=cpus())
                label, env = on_gpu(f"expert {shard} replica {r + 1}/{self.replicas}")
                self._add(ManagedProcess(name, "expert", label, cmd, port, logs / f"{name}.log", metrics,
                                         replica_id=name, plane=plane, shard=shard, experts=f"{first}-{last}",
                                         ucx_port=ucx, env=env))
        for w in range(self.attention_workers):
            name = f"attention-{w}"
            port, metrics = take(), take()
            plane = w % self.planes
            pinned = cpus()
            cmd = py + ["services.attention"] + weights() + common(name, port, metrics) + [
                "--replica-id", name, "--plane", str(plane), "--transport", self.transport]
            if pinned:
                cmd += ["--cpus", pinned]
            if self.dispatch_dtype:
                cmd += ["--dispatch-dtype", self.dispatch_dtype]
            if self.compile_decode:
                cmd += ["--compile-decode"]
            label, env = on_gpu(f"attention worker {w + 1}/{self.attention_workers}")
            self._add(ManagedProcess(name, "attention", label, cmd, port, logs / f"{name}.log", metrics,
                                     replica_id=name, plane=plane, env=env))
        port, metrics = self.gateway_port or take(), take()
        self._add(ManagedProcess("gateway", "gateway", "gateway", py + ["services.gateway"] + common("gateway", port, metrics),
                                 port, logs / "gateway.log", metrics))
        self._redis_port = redis_port

    def _add(self, proc: ManagedProcess) -> None:
        proc.cmd = proc.cmd + self.extra_args.get(proc.kind, []) + self.extra_args.get(proc.name, [])
        self.processes[proc.name] = proc

    def _redis_cmd(self, port: int) -> list[str]:
        from services.common.redis_server import redis_server_binary

        try:
            binary = redis_server_binary()
        except FileNotFoundError as err:
            raise ClusterError(str(err)) from None
        return [binary, str(self.redis_config), "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.run_dir), "--protected-mode", "no", "--loglevel", "warning"]

    @property
    def redis_config(self) -> Path:
        """The Redis configuration holding the password, written when Redis starts."""
        return self.run_dir / "redis.conf"

    def _write_redis_config(self) -> None:
        self.redis_config.parent.mkdir(parents=True, exist_ok=True)
        self.redis_config.touch(mode=0o600)
        self.redis_config.chmod(0o600)
        self.redis_config.write_text(f"requirepass {self.redis_password}\n")

    @staticmethod
    def redis_url_for(port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    @property
    def serves_ucx(self) -> bool:
        """Whether shards get a UCX listener: asked for, or "auto" where ucxx is installed."""
        return self.transport == "ucx" or (self.transport == "auto" and importlib.util.find_spec("ucxx") is not None)

    @property
    def model_processes(self) -> int:
        """Shard replicas and attention workers: the processes that compute."""
        return self.shards * self.replicas + self.attention_workers

    @property
    def torch_threads(self) -> int:
        """Torch threads per model process unless OMP_NUM_THREADS says otherwise: the launcher's
        CPUs shared among the shard replicas and attention workers."""
        return max(1, len(available_cpus()) // self.model_processes)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "MOE_CLUSTER": self.cluster, "TOKENIZERS_PARALLELISM": "false",
                    "MOE_REDIS_PASSWORD": self.redis_password})
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        pythonpath = [str(REPO_ROOT), str(REPO_ROOT / "protos")]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env.update(self.extra_env)
        return env

    # ---- endpoints --------------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        return self.redis_url_for(self._redis_port)

    @property
    def gateway_endpoint(self) -> str:
        return self.processes["gateway"].endpoint

    @property
    def router_endpoint(self) -> str:
        return self.processes["router"].endpoint

    def names(self, kind: str | None = None) -> list[str]:
        """Process names, of one kind when given, in start order."""
        return [n for n, p in self.processes.items() if kind is None or p.kind == kind]

    def worker_endpoints(self) -> list[str]:
        return [p.endpoint for p in self.processes.values() if p.kind == "attention"]

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        """Start everything and wait until it serves; on failure stop it all and raise ClusterError."""
        if self._started:
            return self
        self._started = True
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        atexit.register(self._atexit)
        try:
            self.start_process("redis")
            self.wait_serving("redis", timeout=15.0)
            for name in self.processes:
                if name != "redis":
                    self.start_process(name)
            self._wait_all_serving(time.monotonic() + self.ready_timeout)
            self.wait_ready(timeout=max(10.0, self.ready_timeout / 2))
        except BaseException:
            self.stop()
            raise
        self._status = "ready"
        self._write_state("ready")
        return self

    def start_process(self, name: str) -> ManagedProcess:
        """(Re)start one process with its original command, ports and replica id. A restarted
        expert gets a new UCX port: UCX listeners do not reuse an address still in TIME_WAIT from
        the killed process's connections (the registry carries the new endpoint to workers)."""
        proc = self.processes[name]
        if proc.running():
            return proc
        if proc.kind == "redis":
            self._write_redis_config()
        if proc.ucx_port and proc.current_pid() is not None:
            proc.ucx_port = free_ports(1)[0]
            at = proc.cmd.index("--ucx-port") + 1
            proc.cmd = proc.cmd[:at] + [str(proc.ucx_port)] + proc.cmd[at + 1:]
        proc.popen = start_child(proc.cmd, proc.log_path, env={**self._env(), **proc.env}, cwd=REPO_ROOT)
        if self._started:
            self._write_state(self._status)  # a launcher killed mid-start still leaves its PIDs
        return proc

    def stop_process(self, name: str, sig: int = signal.SIGTERM, *, wait: bool = True,
                     timeout: float | None = None) -> int | None:
        """Signal one process by PID; with wait (SIGTERM/SIGINT/SIGKILL) wait for it, SIGKILL after
        `timeout`. Returns its exit status (None when not waited for)."""
        proc = self.processes[name]
        if not proc.running():
            return proc.exit_status()
        proc.popen.send_signal(sig)
        if not wait or sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            return None
        return wait_or_kill(proc.popen, self.stop_timeout if timeout is None else timeout)

    def wait_serving(self, name: str, timeout: float = 60.0) -> None:
        """Block until `name` answers SERVING (Redis: PING); ClusterError when it exits or times out."""
        self._wait_all_serving(time.monotonic() + timeout, [name], quiet=True)

    def _wait_all_serving(self, deadline: float, names: list[str] | None = None, quiet: bool = False) -> None:
        waiting = [n for n in (names or list(self.processes))]
        channels = {n: grpc.insecure_channel(self.processes[n].endpoint) for n in waiting if n != "redis"}
        last: dict[str, str] = {}
        try:
            while waiting:
                for name in list(waiting):
                    proc = self.processes[name]
                    if not proc.running():
                        status = proc.exit_status()
                        raise ClusterError(
                            f"{proc.label} ({name}) exited with status {status} before serving; "
                            f"last lines of {proc.log_path}:\n{log_tail(proc.log_path)}")
                    if name == "redis":
                        state = "SERVING" if redis_ping(proc.port, self.redis_password) else "UNREACHABLE"
                    else:
                        state = health_status(proc.endpoint, timeout=0.3, channel=channels[name])
                    last[name] = state
                    if state == "SERVING":
                        waiting.remove(name)
                        if not quiet:
                            where = self.redis_url if name == "redis" else proc.endpoint
                            self.progress(f"{proc.label} serving at {where} (pid {proc.current_pid()})")
                if waiting and time.monotonic() > deadline:
                    culprit = self.processes[waiting[0]]
                    raise ClusterError(
                        f"{culprit.label} ({culprit.name}) not serving in time (health: {last.get(waiting[0])}); "
                        f"also waiting on: {', '.join(waiting[1:]) or 'nothing else'}; last lines of "
                        f"{culprit.log_path}:\n{log_tail(culprit.log_path)}")
                if waiting:
                    time.sleep(0.1)
        finally:
            for channel in channels.values():
                channel.close()

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Block until the router lists every replica serving and a plan with no missing expert,
        and every attention worker dispatches by that plan (workers poll for it: a request sent
        before would meet the previous plan, or none)."""
        from services.client import Client, ClientError, RouterClient

        want = {"expert": self.shards * self.replicas, "attention": self.attention_workers, "gateway": 1}
        deadline = time.monotonic() + timeout
        seen: dict = {}
        workers = [Client(endpoint) for endpoint in self.worker_endpoints()]
        with RouterClient(self.router_endpoint, timeout=2.0) as router:
            try:
                while True:
                    try:
                        status = router.cluster_status()
                        counts = {k: sum(r.kind == k and r.state == "serving" for r in status.replicas) for k in want}
                        seen = {"registered": counts, "missing": len(status.missing), "plan_version": status.plan_version}
                        if counts == want and not status.missing and status.plan_version > 0:
                            versions = [w.load().plan_version for w in workers]
                            seen["workers' plan versions"] = versions
                            if min(versions, default=status.plan_version) >= status.plan_version:
                                self.progress(f"plan version {status.plan_version}: every expert served")
                                return seen
                    except ClientError as err:
                        seen = {**seen, "error": str(err)}
                    for proc in self.processes.values():
                        if not proc.running():
                            raise ClusterError(f"{proc.label} ({proc.name}) exited with status {proc.exit_status()}; "
                                               f"last lines of {proc.log_path}:\n{log_tail(proc.log_path)}")
                    if time.monotonic() > deadline:
                        raise ClusterError(f"cluster not ready after {timeout:.0f}s: want {want}, router says {seen}")
                    time.sleep(0.1)
            finally:
                for worker in workers:
                    worker.close()

    def stop(self) -> None:
        """Stop every process (SIGTERM all services, wait, SIGKILL stragglers, then Redis)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a 2nd Ctrl-C must not strand any
        try:
            self._stop_all()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _stop_all(self) -> None:
        for kinds in (STOP_ORDER[:-1], ("redis",)):
            procs = {p.popen.pid: p for p in self.processes.values() if p.kind in kinds and p.running()}

            def killing(popen) -> None:
                proc = procs[popen.pid]
                self.progress(f"{proc.label} ({proc.name}) did not stop in time; killing pid {popen.pid}")

            stop_children([p.popen for p in procs.values()], self.stop_timeout, killing)
        state = self.run_dir / STATE_FILE
        if not self.detached and state.exists():
            try:
                if json.loads(state.read_text()).get("cluster") == self.cluster:
                    state.unlink()
            except (OSError, ValueError):
                pass

    def detach(self) -> Path:
        """Leave the processes running after this object goes away; returns the cluster.json path."""
        self.detached = True
        atexit.unregister(self._atexit)
        return self._write_state("ready")

    def _atexit(self) -> None:
        if not self.detached:
            self.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self.detached:
            self.stop()
            atexit.unregister(self._atexit)

    # ---- state file -------------------------------------------------------------------------
    def state(self, status: str = "ready") -> dict:
        return {
            "cluster": self.cluster, "status": status, "model": str(self.model_dir), "run_dir": str(self.run_dir),
            "redis_url": self.redis_url, "gateway_endpoint": self.gateway_endpoint,
            "router_endpoint": self.router_endpoint, "launcher_pid": os.getpid(), "shards": self.shards,
            "replicas": self.replicas, "attention_workers": self.attention_workers, "planes": self.planes,
            "transport": self.transport, "processes": {n: p.to_json() for n, p in self.processes.items()},
        }

    def _write_state(self, status: str) -> Path:
        path = self.run_dir / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state(status), indent=2) + "\n")
        tmp.replace(path)
        return path


def read_state(run_dir: str | os.PathLike) -> dict:
    """The cluster.json of `run_dir`; ClusterError when there is none."""
    path = Path(run_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {run_dir} ({path} not found); start one with `moe up --detach`") from None
    except ValueError as err:
        raise ClusterError(f"{path} is not valid JSON: {err}") from None


def stop_from_state(run_dir: str | os.PathLike, timeout: float = DEFAULT_GRACE_S,
                    progress: Callable[[str], None] | None = None) -> dict:
    """`moe down`: stop the processes listed in run_dir/cluster.json by PID, then remove the file."""
    progress = progress or (lambda line: None)
    state = read_state(run_dir)
    cluster = state["cluster"]
    procs = state.get("processes", {})
    for kinds in (STOP_ORDER[:-1], ("redis",)):
        live = {name: p["pid"] for name, p in procs.items()
                if p.get("kind") in kinds and p.get("pid") and pid_alive(p["pid"])
                and pid_belongs_to(p["pid"], cluster, p["kind"], p.get("port", 0))}
        killed = stop_pids(live.values(), timeout)
        for name, pid in live.items():
            progress(f"{name} stopped (pid {pid}{', killed' if pid in killed else ''})")
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    return state

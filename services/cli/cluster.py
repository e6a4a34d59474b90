"""`moe up`, `moe down`, `moe status`: a local cluster from the command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from services.cli import CliError, ServiceError
from services.launcher.preflight import TRANSPORT_CHOICES, check_device

DEFAULT_RUN_DIR = ".run"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "up":
        parser.add_argument("--model", required=True, help="checkpoint directory (HF format)")
        parser.add_argument("--shards", type=int, default=2, help="expert shards; experts split evenly [2]")
        parser.add_argument("--replicas", type=int, default=1, help="replicas of each shard [1]")
        parser.add_argument("--attention-workers", type=int, default=1, help="attention workers [1]")
        parser.add_argument("--port", type=int, default=50050, help="gateway gRPC port; 0 picks a free one [50050]")
        parser.add_argument("--planes", type=int, default=1, help="network planes to spread replicas over [1]")
        parser.add_argument("--transport", choices=TRANSPORT_CHOICES, default="auto",
                            help="expert data path: auto serves and uses UCX where ucxx is installed, gRPC "
                                 "otherwise [auto]")
        parser.add_argument("--dispatch-dtype", choices=("fp32", "bf16", "fp8"),
                            help="activation dtype on the wire [fp32 for fp32 models, else bf16]")
        parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                            help="compute dtype [the checkpoint's torch_dtype]")
        parser.add_argument("--device", default="cpu",
                            help="torch device of workers and shards [cpu]; cuda gives each shard replica and "
                                 "worker the next GPU in turn (of CUDA_VISIBLE_DEVICES, else all)")
        parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"logs and cluster.json [{DEFAULT_RUN_DIR}]")
        parser.add_argument("--cluster", help="Redis key prefix [moe-<random>]")
        parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every process [300]")
        parser.add_argument("--compile-decode", action="store_true",
                            help="CPU: attention workers compile decode steps before serving (minutes; faster steps)")
        parser.add_argument("--pin-cpus", action="store_true",
                            help="run each shard replica and attention worker on CPUs of its own (--cpus), dealt "
                                 "shard replicas first; with fewer CPUs than those, one each in turn (2 CPUs, 2 "
                                 "shards, 1 worker: the worker shares the first shard's CPU)")
        parser.add_argument("--detach", action="store_true", help="return once ready; stop later with `moe down`")
    elif command == "down":
        parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"where `moe up` wrote cluster.json [{DEFAULT_RUN_DIR}]")
        parser.add_argument("--timeout", type=float, default=15.0, help="seconds before SIGKILL [15]")
    else:  # status
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--endpoint", help="HOST:PORT of the router")
        where.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"a local cluster's directory [{DEFAULT_RUN_DIR}]")
        parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    return {"up": _up, "down": _down, "status": _status}[args.command](args)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- up -------------------------------------------------------------------------------------

class _Stop(Exception):
    """SIGTERM received."""


def _up(args: argparse.Namespace) -> int:
    from services.common.ports import port_is_open
    from services.common.supervisor import pid_alive
    from services.launcher.cluster import ClusterError, LocalCluster, read_state

    # What the user asked for (flags, device, model) is checked before what the machine is doing
    # (a cluster in the run directory, the gateway port), and all of it before anything starts.
    run_dir = Path(args.run_dir)
    try:
        check_device(args.device)
        cluster = LocalCluster(args.model, shards=args.shards, replicas=args.replicas,
                               attention_workers=args.attention_workers, planes=args.planes,
                               transport=args.transport, dispatch_dtype=args.dispatch_dtype, dtype=args.dtype,
                               run_dir=run_dir, gateway_port=args.port, device=args.device, cluster=args.cluster,
                               ready_timeout=args.timeout, progress=_say, compile_decode=args.compile_decode,
                               pin_cpus=args.pin_cpus)
    except ClusterError as err:
        raise CliError(str(err)) from None
    try:
        previous = read_state(run_dir)
    except ClusterError:
        previous = None
    if previous and any(p.get("pid") and pid_alive(p["pid"]) for p in previous.get("processes", {}).values()):
        raise CliError(f"a cluster is already running from {run_dir} (gateway {previous.get('gateway_endpoint')}); "
                       f"stop it with `moe down --run-dir {args.run_dir}`")
    if args.port and port_is_open("127.0.0.1", args.port):
        raise CliError(f"port {args.port} is in use; choose another gateway port with --port")

    stop_requested = threading.Event()

    def on_sigterm(_signum: int, _frame: object) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            raise _Stop()

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _say(f"starting cluster {cluster.cluster}: {args.shards} shard(s) x {args.replicas} replica(s), "
             f"{args.attention_workers} attention worker(s), {args.planes} plane(s); logs in {cluster.run_dir / 'logs'}")
        try:
            cluster.start()
        except ClusterError as err:
            # everything asked for passed the checks above; a process that then fails is an outage
            raise ServiceError(f"cluster did not start: {err}") from None
        except (KeyboardInterrupt, _Stop):
            _say("interrupted; everything started has been stopped")
            return 130
        if args.detach:
            state = cluster.detach()
            _say(f"cluster ready; state in {state}; stop it with `moe down --run-dir {args.run_dir}`")
            print(cluster.gateway_endpoint, flush=True)
            return 0
        _say("cluster ready; Ctrl-C stops it")
        print(cluster.gateway_endpoint, flush=True)
        try:
            _watch(cluster, stop_requested)
        except (KeyboardInterrupt, _Stop):
            pass
        _say("stopping cluster")
        cluster.stop()
        _say("cluster stopped")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _watch(cluster, stop_requested: threading.Event) -> None:
    """Foreground: report processes that exit until a signal arrives."""
    reported: set[str] = set()
    while not stop_requested.wait(0.5):
        for name, proc in cluster.processes.items():
            if name not in reported and not proc.running():
                reported.add(name)
                _say(f"{proc.label} ({name}) exited with status {proc.exit_status()}; log: {proc.log_path}")


# ---- down -----------------------------------------------------------------------------------

def _down(args: argparse.Namespace) -> int:
    from services.launcher.cluster import ClusterError, stop_from_state

    try:
        state = stop_from_state(args.run_dir, timeout=args.timeout, progress=_say)
    except ClusterError as err:
        raise CliError(str(err)) from None
    _say(f"cluster {state['cluster']} stopped")
    return 0


# ---- status ---------------------------------------------------------------------------------

def _status(args: argparse.Namespace) -> int:
    from services.client import ClientError, RouterClient
    from services.launcher.cluster import ClusterError, read_state

    local = None
    endpoint = args.endpoint
    if endpoint is None:
        try:
            local = read_state(args.run_dir)
        except ClusterError as err:
            raise CliError(f"{err}; or pass --endpoint ROUTER_HOST:PORT") from None
        endpoint = local["router_endpoint"]
    try:
        with RouterClient(endpoint) as router:
            status = router.cluster_status()
    except ClientError as err:
        raise ServiceError(f"router {endpoint}: {err.code}: {err.message}") from None
    summary = summarize(status, local)
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(summary))
    return 0


def summarize(status, local: dict | None = None) -> dict:
    """ClusterStatus (+ a local cluster.json) as the `moe status --json` object."""
    pids = {}
    if local:
        pids = {name: p.get("pid") for name, p in local.get("processes", {}).items()}
    replicas = []
    for r in status.replicas:
        entry = {"id": r.id, "kind": r.kind, "shard": r.shard, "plane": r.plane, "state": r.state,
                 "experts": list(r.experts), "endpoints": {"grpc": r.endpoints.grpc, "ucx": r.endpoints.ucx},
                 "host": r.host, "pid": r.pid}
        if local is not None:
            entry["local_pid"] = pids.get(r.id)
        replicas.append(entry)
    by_id = {r["id"]: r for r in replicas}
    shards = []
    for s in status.shards:
        members = [by_id[i] for i in s.replica_ids if i in by_id]
        shards.append({"name": s.name, "experts": list(s.experts), "replicas": list(s.replica_ids),
                       "planes": sorted({m["plane"] for m in members})})
    load: dict[str, dict[str, int]] = {}
    for item in status.expert_load:
        load.setdefault(str(item.layer), {})[str(item.expert)] = item.tokens
    out = {
        "plan_version": status.plan_version,
        "shards": shards,
        "replicas": replicas,
        "missing": [{"layer": m.layer, "expert": m.expert} for m in status.missing],
        "load_window_start_unix_s": status.load_window_start_unix_s,
        "load_window_s": status.load_window_s,
        "expert_load": load,   # layer -> expert -> tokens in the last complete window
    }
    if local:
        out["cluster"] = local.get("cluster")
        out["gateway_endpoint"] = local.get("gateway_endpoint")
        out["router_endpoint"] = local.get("router_endpoint")
        out["redis_url"] = local.get("redis_url")
    return out


def _ids(ids: list[int]) -> str:
    if not ids:
        return "-"
    ids = sorted(ids)
    runs, start, prev = [], ids[0], ids[0]
    for e in ids[1:] + [None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        runs.append(f"{start}-{prev}" if prev != start else f"{start}")
        if e is not None:
            start = prev = e
    return ",".join(runs)


def format_table(summary: dict) -> str:
    lines = [f"plan version {summary['plan_version']}"
             + (f", cluster {summary['cluster']}, gateway {summary['gateway_endpoint']}" if summary.get("cluster") else "")]
    rows = [("KIND", "ID", "SHARD", "EXPERTS", "PLANE", "STATE", "ENDPOINT", "UCX", "PID")]
    for r in summary["replicas"]:
        pid = r.get("local_pid") or r["pid"]
        rows.append((r["kind"], r["id"], r["shard"] or "-", _ids(r["experts"]) if r["kind"] == "expert" else "-",
                     str(r["plane"]), r["state"], r["endpoints"]["grpc"], r["endpoints"].get("ucx") or "-", str(pid)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    lines.append("SHARD" + " " * 12 + "EXPERTS   REPLICAS  PLANES")
    for s in summary["shards"]:
        lines.append(f"{s['name']:<17}{_ids(s['experts']):<10}{len(s['replicas']):<10}{','.join(map(str, s['planes']))}")
    if summary["missing"]:
        lines.append(f"missing: {len(summary['missing'])} (layer, expert) pairs with no live replica, e.g. "
                     + ", ".join(f"layer {m['layer']} expert {m['expert']}" for m in summary["missing"][:4]))
    load = summary["expert_load"]
    window = summary["load_window_s"]
    if load:
        lines.append("")
        lines.append(f"tokens per expert, window of {window}s starting at unix {summary['load_window_start_unix_s']}:")
        experts = sorted({int(e) for per in load.values() for e in per})
        lines.append("layer  " + " ".join(f"{e:>6}" for e in experts))
        for layer in sorted(load, key=int):
            lines.append(f"{layer:>5}  " + " ".join(f"{load[layer].get(str(e), 0):>6}" for e in experts))
    else:
        lines.append(f"no expert load recorded in the last {window}s window")
    return "\n".join(lines)

"""`python -m services.expert`: serve some routed experts of every MoE layer.

Loads only its (layer, expert) weights, serves ExpertShard.Exchange over gRPC (and UCX when
--ucx-port > 0 and the UCX module imports), registers in Redis (kind "expert") with a heartbeat.
SIGTERM: deregister first, then drain queued work, then stop the server after in-flight calls.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from moe.v1 import expert_pb2_grpc
from services.common.cpus import parse_cpus, pin_process
from services.common.errors import ServiceError
from services.common.logging import configure_logging, event, get_logger
from services.common.memory import keep_freed_memory
from services.common.redis_store import Keys, LoadRecorder, Registry, ReplicaRecord, connect
from services.common.server import Service
from services.common.settings import (
    DEFAULT_PORTS,
    DEFAULT_UCX_PORT,
    add_common_arguments,
    add_cpus_argument,
    add_model_arguments,
    add_plane_argument,
    add_replica_id_argument,
    advertise_host,
    default_replica_id,
    env,
    redis_password,
)
from services.expert.servicer import SERVICE_NAME, ExpertShardServicer
from services.common.expert_ids import format_id_list, parse_expert_ids
from services.expert.shard import DEFAULT_CAPACITY_TOKENS, ExpertShard
from services.transport.ucx_runtime import UcxUnavailable

log = get_logger("expert")

MAX_STREAMS = 256  # each Exchange stream holds a server thread for its lifetime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.expert", description=__doc__.splitlines()[0])
    add_common_arguments(parser, default_port=DEFAULT_PORTS["expert"])
    add_plane_argument(parser)
    add_model_arguments(parser, weights=True)
    add_replica_id_argument(parser)
    add_cpus_argument(parser)
    experts = env("MOE_EXPERTS")
    parser.add_argument("--experts", default=experts, required=experts is None,
                        help="logical expert ids held on every MoE layer: 0-7, 0,2,5 or 0-3,8-11 [MOE_EXPERTS]")
    parser.add_argument("--shard", default=env("MOE_SHARD_NAME"),
                        help="shard name; replicas of one shard hold the same experts "
                             "[MOE_SHARD_NAME, shard-<first>-<last>]")
    parser.add_argument("--ucx-port", type=int, default=int(env("MOE_UCX_PORT", "0")),
                        help=f"UCX listener port, 0 disables (the chart uses {DEFAULT_UCX_PORT}) [MOE_UCX_PORT, 0]")
    parser.add_argument("--capacity-tokens", type=int,
                        default=int(env("MOE_CAPACITY_TOKENS", str(DEFAULT_CAPACITY_TOKENS))),
                        help="most tokens merged into one per-layer computation, 0 = no limit "
                             f"[MOE_CAPACITY_TOKENS, {DEFAULT_CAPACITY_TOKENS}]")
    return parser


def start_ucx(port: int, shard: ExpertShard):
    """The UCX listener, or None when UCX is not importable (logged; gRPC still serves)."""
    try:
        from services.transport.ucx_server import serve_ucx

        # tails land where the experts run: GPU to GPU over CUDA IPC or GPUDirect RDMA, no host hop
        return serve_ucx(port, shard.submit, device=shard.device)
    except (ImportError, UcxUnavailable) as err:
        event(log, "ucx listener disabled: ucxx not importable", level=logging.WARNING, error=str(err))
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("expert", args.log_level)
    keep_freed_memory()
    from model.config import ModelConfig

    try:
        cfg = ModelConfig.from_model_dir(args.model)
        experts = parse_expert_ids(args.experts, cfg.n_routed_experts)
        if args.cpus:
            pin_process(parse_cpus(args.cpus))
            event(log, "pinned to CPUs", cpus=args.cpus)
    except (ValueError, OSError) as err:  # ModelError is a ValueError
        print(f"expert: {err}", file=sys.stderr)
        return 2
    replica_id = args.replica_id or default_replica_id()
    shard_name = args.shard or f"shard-{experts[0]}-{experts[-1]}"
    event(log, "loading experts", shard=shard_name, experts=format_id_list(experts), model=args.model,
          layers=len(cfg.moe_layers), device=args.device, dtype=args.dtype or cfg.torch_dtype)

    client = connect(args.redis_url, redis_password())
    keys = Keys(args.cluster)
    recorder = LoadRecorder(client, keys)
    started = time.monotonic()

    def progress(layer: int, index: int, count: int, size: int) -> None:
        event(log, "layer loaded", layer=layer, progress=f"{index + 1}/{count}", bytes=size,
              mb=round(size / 2**20, 2), elapsed_s=round(time.monotonic() - started, 2))

    try:
        shard = ExpertShard.load(args.model, experts, dtype=args.dtype, device=args.device, recorder=recorder,
                                 capacity_tokens=args.capacity_tokens, progress=progress)
    except (ValueError, OSError) as err:
        raise SystemExit(f"expert: cannot load experts {format_id_list(experts)} from {args.model}: {err}") from None
    event(log, "experts loaded", experts=format_id_list(experts), layers=len(shard.layers),
          bytes=shard.weight_bytes, seconds=round(time.monotonic() - started, 2))
    shard.start()
    recorder.start()

    service = Service("expert", args, [SERVICE_NAME], max_workers=MAX_STREAMS)
    servicer = ExpertShardServicer(shard)
    expert_pb2_grpc.add_ExpertShardServicer_to_server(servicer, service.server)
    # The UCX listener first: once health says SERVING, both data paths must accept connections.
    ucx = start_ucx(args.ucx_port, shard) if args.ucx_port > 0 else None
    port = service.start()
    host = advertise_host(args)
    endpoints = {"grpc": f"{host}:{port}"}
    if ucx is not None:
        endpoints["ucx"] = f"{host}:{args.ucx_port}"

    record = ReplicaRecord(kind="expert", id=replica_id, endpoints=endpoints, plane=args.plane,
                           experts=experts, shard=shard_name)
    registry = Registry(client, keys, record).start()  # best effort: the heartbeat retries
    event(log, "registered", replica=replica_id, shard=shard_name, endpoints=endpoints, plane=args.plane)

    # SIGTERM: deregister (new plans leave us out), drain queued work (later frames get UNAVAILABLE
    # and are retried elsewhere), end the open streams, close UCX, flush load; then Service stops
    # the gRPC server.
    service.on_shutdown(registry.deregister)
    service.on_shutdown(lambda: shard.drain(service.grace_s))
    service.on_shutdown(servicer.stop_streams)
    if ucx is not None and hasattr(ucx, "close"):
        service.on_shutdown(ucx.close)
    service.on_shutdown(recorder.stop)
    return service.wait()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ServiceError as err:
        raise SystemExit(f"expert: {err}") from None

"""`python -m services.attention --model DIR`: an MLA attention worker.

Holds embeddings, attention, dense layers, gates and shared experts; routed experts are served
by expert shards found through the routing plan the router publishes in Redis, except those
named by --local-experts, which the worker computes from its own copy of their weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from model.config import ModelConfig
from model.errors import ModelError
from moe.v1 import inference_pb2, inference_pb2_grpc
from services.attention.servicer import InferenceServicer, InferenceSessionServicer
from services.attention.streams import StreamHub
from services.attention.worker import AttentionWorker, PlanWatcher
from services.common import redis_store, settings
from services.common.cpus import parse_cpus, pin_process
from services.common.logging import configure_logging, event, get_logger
from services.common.memory import keep_freed_memory
from services.common.expert_ids import parse_expert_ids
from services.common.redis_store import Keys, LoadRecorder, ReplicaRecord
from services.common.server import Service
from services.transport.base import TRANSPORT_CHOICES, make_transport
from services.wire.dtypes import DISPATCH_DTYPES

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SESSION_SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceSession"].full_name
log = get_logger("attention")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.attention", description="MLA attention worker")
    settings.add_common_arguments(parser, default_port=settings.DEFAULT_PORTS["attention"])
    settings.add_model_arguments(parser, weights=True)
    settings.add_plane_argument(parser)
    settings.add_replica_id_argument(parser)
    settings.add_cpus_argument(parser)
    parser.add_argument("--transport", choices=TRANSPORT_CHOICES, default=settings.env("MOE_TRANSPORT", "auto"),
                        help="expert data path: auto takes UCX to each replica that offers it where ucxx "
                             "works, gRPC to the rest [MOE_TRANSPORT, auto]")
    parser.add_argument("--dispatch-dtype", choices=DISPATCH_DTYPES, default=settings.env("MOE_DISPATCH_DTYPE"),
                        help="hidden states on the wire [MOE_DISPATCH_DTYPE, fp32 for fp32 models, else bf16]")
    parser.add_argument("--max-batch", type=int, default=int(settings.env("MOE_MAX_BATCH", "64")),
                        help="sequences decoded together [MOE_MAX_BATCH, 64]")
    parser.add_argument("--kv-cache-tokens", type=int, default=int(settings.env("MOE_KV_CACHE_TOKENS", "65536")),
                        help="latent KV-cache pool size in tokens [MOE_KV_CACHE_TOKENS, 65536]")
    parser.add_argument("--compile-decode", action="store_true",
                        default=settings.env("MOE_COMPILE_DECODE", "0").lower() in ("1", "true", "yes"),
                        help="CPU only: compile decode steps of up to 16 sequences with torch.compile before "
                             "serving (~20-45 s per graph, three graphs; faster steps after) [MOE_COMPILE_DECODE]")
    parser.add_argument("--max-streams", type=int, default=int(settings.env("MOE_MAX_STREAMS", "4096")),
                        help="requests served at once (Generate calls and session streams), queued ones "
                             "included; past it new ones end RESOURCE_EXHAUSTED [MOE_MAX_STREAMS, 4096]")
    parser.add_argument("--local-experts", default=settings.env("MOE_LOCAL_EXPERTS", ""), metavar="IDS",
                        help="routed experts this worker computes itself from its own copy of their weights, "
                             "e.g. 0-15 or 0,4,8-11: their tokens never leave the process, and the worker "
                             "computes them while the shards compute the rest (on a host of few cores, or "
                             "for hot experts); the shards' replicas of them go unused by this worker "
                             "[MOE_LOCAL_EXPERTS, none]")
    parser.add_argument("--dispatch-timeout", type=float, default=10.0, help="seconds to wait on one expert batch")
    parser.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("attention", args.log_level)
    keep_freed_memory()
    if args.max_batch < 1 or args.kv_cache_tokens < 16 or args.max_streams < 1:
        print("attention: --max-batch and --max-streams must be >= 1 and --kv-cache-tokens >= 16", file=sys.stderr)
        return 2
    if args.cpus:
        try:
            pin_process(parse_cpus(args.cpus))
        except (ValueError, OSError) as err:
            print(f"attention: {err}", file=sys.stderr)
            return 2
        event(log, "pinned to CPUs", cpus=args.cpus)
    client = redis_store.connect(args.redis_url, settings.redis_password())
    keys = Keys(args.cluster)
    recorder = LoadRecorder(client, keys)
    try:
        cfg = ModelConfig.from_model_dir(args.model)
        local_experts = parse_expert_ids(args.local_experts, cfg.n_routed_experts) if args.local_experts else None
        dtype = args.dtype or cfg.torch_dtype
        dispatch_dtype = args.dispatch_dtype or ("fp32" if dtype == "float32" else "bf16")
        transport = make_transport(args.transport, dispatch_dtype)
        worker = AttentionWorker(
            args.model, transport, plane=args.plane, dtype=args.dtype, device=args.device,
            cache_tokens=args.kv_cache_tokens, max_batch=args.max_batch, dispatch_timeout_s=args.dispatch_timeout,
            compile_decode=args.compile_decode, local_experts=local_experts, load_recorder=recorder,
        )
    except (ModelError, RuntimeError, ValueError) as err:
        print(f"attention: {err}", file=sys.stderr)
        return 2
    watcher = PlanWatcher(client, keys, worker.plans).start()

    replica_id = args.replica_id or settings.default_replica_id()
    service = Service("attention", args, [SERVICE_NAME, SESSION_SERVICE_NAME], grace_s=args.grace, asynchronous=True)
    hub = StreamHub(worker, service.loop, args.max_streams)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(hub, replica_id, args.plane), service.server)
    inference_pb2_grpc.add_InferenceSessionServicer_to_server(InferenceSessionServicer(hub), service.server)
    worker.scheduler.start(hub.publish)
    port = service.start()
    host = settings.advertise_host(args)
    registry = redis_store.Registry(client, keys, ReplicaRecord(
        kind="attention", id=replica_id, endpoints={"grpc": f"{host}:{port}"}, plane=args.plane,
        capacity=args.max_batch)).start()
    event(log, "attention worker ready", replica=replica_id, transport=args.transport, dispatch_dtype=dispatch_dtype,
          kv_cache_tokens=worker.engine.cache.capacity_tokens, plan_version=watcher.version, pid=os.getpid())
    if watcher.version == 0:
        event(log, "no routing plan in Redis yet; MoE layers wait for the router", level=logging.WARNING)
    service.on_shutdown(registry.deregister)
    service.on_shutdown(lambda: worker.stop(args.grace))
    service.on_shutdown(watcher.stop)
    if local_experts:  # the local experts' token counts, flushed to Redis like a shard's
        recorder.start()
        service.on_shutdown(recorder.stop)
    return service.wait()


if __name__ == "__main__":
    sys.exit(main())

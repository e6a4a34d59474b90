"""`python -m services.router --model DIR`: the gating router (control plane, holds no weights)."""

from __future__ import annotations

import argparse
import os
import sys

from model.config import ModelConfig
from model.errors import ModelError
from moe.v1 import router_pb2, router_pb2_grpc
from services.common import redis_store, settings
from services.common.logging import configure_logging, event, get_logger
from services.common.redis_store import Keys, ReplicaRecord
from services.common.server import Service
from services.router.servicer import RouterServicer
from services.router.state import RouterState

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
log = get_logger("router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.router",
                                     description="gating router: live expert replicas -> placement plan")
    settings.add_common_arguments(parser, default_port=settings.DEFAULT_PORTS["router"])
    settings.add_model_arguments(parser)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="registry poll period, seconds")
    parser.add_argument("--grace", type=float, default=5.0, help="shutdown grace period, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("router", args.log_level)
    try:
        config = ModelConfig.from_model_dir(args.model)
    except ModelError as err:
        print(f"router: {err}", file=sys.stderr)
        return 2
    if not config.moe_layers:
        print(f"router: {args.model} has no MoE layers; nothing to route", file=sys.stderr)
        return 2
    client = redis_store.connect(args.redis_url, settings.redis_password())
    keys = Keys(args.cluster)
    state = RouterState(client, keys, moe_layers=config.moe_layers, n_routed_experts=config.n_routed_experts,
                        poll_s=args.poll_interval)
    state.resume_from_redis()

    service = Service("router", args, [SERVICE_NAME], max_workers=32, grace_s=args.grace)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(state), service.server)
    port = service.start()
    host = settings.advertise_host(args)
    registry = redis_store.Registry(client, keys, ReplicaRecord(
        kind="router", id=f"router-{host}-{port}-{os.getpid()}", endpoints={"grpc": f"{host}:{port}"})).start()
    state.start()
    event(log, "router ready", model=args.model, moe_layers=len(config.moe_layers),
          experts=config.n_routed_experts, cluster=args.cluster, plan_version=state.plan.version)
    service.on_shutdown(state.close)
    service.on_shutdown(registry.deregister)
    return service.wait()


if __name__ == "__main__":
    sys.exit(main())

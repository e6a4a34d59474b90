"""`python -m services.gateway`: the public moe.v1.Inference endpoint in front of the attention workers.

Loads no weights and never imports torch. Health reports NOT_SERVING until the first attention
worker is discovered, then SERVING for the rest of its life (with no worker left, Generate
answers UNAVAILABLE).
"""

from __future__ import annotations

import argparse
import os
import sys

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.common import redis_store, settings
from services.common.logging import configure_logging, event, get_logger
from services.common.redis_store import Keys, ReplicaRecord
from services.common.server import Service
from services.gateway.api_keys import ApiKeyError, ApiKeyInterceptor, read_keys
from services.gateway.servicer import GatewayServicer
from services.gateway.sessions import DEFAULT_MAX_UNREAD
from services.gateway.upstreams import Upstreams

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
log = get_logger("gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.gateway",
                                     description="public Generate endpoint: spreads requests over attention workers")
    settings.add_common_arguments(parser, default_port=settings.DEFAULT_PORTS["gateway"])
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="registry and GetLoad poll period, seconds [1.0]")
    parser.add_argument("--max-streams", type=int, default=256,
                        help="Generate streams served at once; past it new calls end RESOURCE_EXHAUSTED [256]")
    parser.add_argument("--max-unread", type=int, default=int(settings.env("MOE_MAX_UNREAD", str(DEFAULT_MAX_UNREAD))),
                        help="messages a stream may leave unread by a slow client; past it the request is "
                             f"stopped and ends RESOURCE_EXHAUSTED [MOE_MAX_UNREAD, {DEFAULT_MAX_UNREAD}]")
    parser.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds [10]")
    parser.add_argument("--api-key-file", default=settings.env("MOE_API_KEY_FILE"),
                        help="require 'authorization: Bearer <key>' with one of this file's keys (one per line) "
                             "on every Generate and GetLoad call; health checks stay open [MOE_API_KEY_FILE, off]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("gateway", args.log_level)
    for flag, value in (("--max-streams", args.max_streams), ("--max-unread", args.max_unread)):
        if value < 1:
            print(f"gateway: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    interceptors = []
    if args.api_key_file:
        try:
            interceptors.append(ApiKeyInterceptor(read_keys(args.api_key_file)))
        except ApiKeyError as err:
            print(f"gateway: {err}", file=sys.stderr)
            return 2
    client = redis_store.connect(args.redis_url, settings.redis_password())
    keys = Keys(args.cluster)

    service = Service("gateway", args, [SERVICE_NAME], grace_s=args.grace, interceptors=interceptors, asynchronous=True)
    ready = {"seen": False}

    def on_workers(count: int) -> None:
        if count and not ready["seen"]:
            ready["seen"] = True
            if service.port:
                service.set_serving(True)
                event(log, "first attention worker found, serving")

    upstreams = Upstreams(client, keys, poll_s=args.poll_interval, on_workers=on_workers,
                          max_unread=args.max_unread)
    servicer = GatewayServicer(upstreams, max_streams=args.max_streams)
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, service.server)
    port = service.start()
    if not ready["seen"]:
        service.set_serving(False)
    host = settings.advertise_host(args)
    servicer.replica_id = f"gateway-{host}-{port}-{os.getpid()}"
    upstreams.start()  # first poll now; on_workers flips health to SERVING
    if ready["seen"]:
        service.set_serving(True)
    registry = redis_store.Registry(client, keys, ReplicaRecord(
        kind="gateway", id=servicer.replica_id, endpoints={"grpc": f"{host}:{port}"})).start()
    event(log, "gateway ready", cluster=args.cluster, workers=len(upstreams.balancer.registered()),
          api_keys="required" if interceptors else "off")

    def stop_accepting() -> None:
        servicer.accepting = False

    service.on_shutdown(stop_accepting)
    service.on_shutdown(registry.deregister)
    code = service.wait()
    upstreams.close()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Common command-line flags and environment variables (docs/contracts.md).

Every flag takes its default from its environment variable, so the Helm chart and docker-compose
configure services through env and a developer overrides one value with a flag:

    parser = argparse.ArgumentParser(prog="python -m services.router")
    add_common_arguments(parser, default_port=DEFAULT_PORTS["router"])
    add_model_arguments(parser)              # --model (router, attention, expert)
    args = parser.parse_args()
    advertise = advertise_host(args)

argparse applies `type` to string defaults, so a malformed variable fails like a malformed flag.
"""

from __future__ import annotations

import argparse
import os
import socket

DEFAULT_PORTS = {"gateway": 50050, "router": 50051, "attention": 50052, "expert": 50053}
DEFAULT_UCX_PORT = 50054
DEFAULT_METRICS_PORT = 9400
LOG_LEVELS = ("debug", "info", "warning", "error")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def env(name: str, default: str | None = None) -> str | None:
    """The variable's value, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0-65535")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """Flags every service takes: cluster, Redis, bind/advertise address, ports, log level."""
    group = parser.add_argument_group("common (flag overrides env)")
    group.add_argument("--cluster", default=env("MOE_CLUSTER", "moe"),
                       help="Redis key prefix; two clusters may share one Redis [MOE_CLUSTER, moe]")
    group.add_argument("--redis-url", default=env("MOE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                       help="Redis URL; MOE_REDIS_PASSWORD overrides its password "
                            "[MOE_REDIS_URL, redis://127.0.0.1:6379/0]")
    group.add_argument("--host", default=env("MOE_HOST", "0.0.0.0"),
                       help="bind address [MOE_HOST, 0.0.0.0]")
    group.add_argument("--advertise-host", default=env("MOE_ADVERTISE_HOST"),
                       help="address peers dial [MOE_ADVERTISE_HOST, else POD_IP, else --host "
                            "when not a wildcard, else this host's address]")
    group.add_argument("--port", type=_port, default=env("MOE_PORT", str(default_port)),
                       help=f"gRPC port, 0 picks a free one [MOE_PORT, {default_port}]")
    group.add_argument("--metrics-port", type=_port,
                       default=env("MOE_METRICS_PORT", str(DEFAULT_METRICS_PORT)),
                       help=f"Prometheus /metrics port, 0 disables [MOE_METRICS_PORT, {DEFAULT_METRICS_PORT}]")
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                       default=env("MOE_LOG_LEVEL", "info"), help="[MOE_LOG_LEVEL, info]")


def add_plane_argument(parser: argparse.ArgumentParser) -> None:
    """--plane: the network plane this process sits on (attention, expert)."""
    parser.add_argument("--plane", type=_non_negative, default=env("MOE_PLANE", "0"),
                        help="network plane index [MOE_PLANE, 0]")


def add_model_arguments(parser: argparse.ArgumentParser, *, weights: bool = False) -> None:
    """--model (router, attention, expert); with weights=True also --device and --dtype."""
    model_dir = env("MOE_MODEL_DIR")
    parser.add_argument("--model", default=model_dir, required=model_dir is None,
                        help="checkpoint directory (config.json, *.safetensors) [MOE_MODEL_DIR]")
    if weights:
        parser.add_argument("--device", default=env("MOE_DEVICE", "cpu"),
                            help="torch device [MOE_DEVICE, cpu]")
        parser.add_argument("--dtype", default=env("MOE_DTYPE"),
                            choices=("float32", "bfloat16", "float16"),
                            help="compute dtype [MOE_DTYPE, the checkpoint's torch_dtype]")


def add_replica_id_argument(parser: argparse.ArgumentParser) -> None:
    """--replica-id (attention, expert): unique id in the registry."""
    parser.add_argument("--replica-id", default=env("MOE_REPLICA_ID"),
                        help="registry id [MOE_REPLICA_ID, <hostname>-<pid>]")


def add_cpus_argument(parser: argparse.ArgumentParser) -> None:
    """--cpus (attention, expert): the CPUs this process and its threads run on."""
    parser.add_argument("--cpus", default=env("MOE_CPUS"), metavar="IDS",
                        help="pin the process to these CPUs, e.g. 0 or 2-3 (`moe up --pin-cpus` gives each model "
                             "process its own); torch threads follow their count unless OMP_NUM_THREADS is set "
                             "[MOE_CPUS, unpinned]")


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def redis_password() -> str | None:
    """MOE_REDIS_PASSWORD, which overrides a password in the URL; None when unset."""
    return env("MOE_REDIS_PASSWORD")


def advertise_host(args: argparse.Namespace) -> str:
    """The address peers dial: --advertise-host, POD_IP, a non-wildcard --host, or our address."""
    if getattr(args, "advertise_host", None):
        return args.advertise_host
    pod_ip = env("POD_IP")
    if pod_ip:
        return pod_ip
    host = getattr(args, "host", "")
    if host not in WILDCARD_HOSTS:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"

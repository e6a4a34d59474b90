"""The `moe` command: one entry point, one module of this package per group of subcommands.

Each subcommand module exposes `add_arguments(parser, command)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `moe --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from model.errors import ModelError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("services.cli.generate", "generate tokens, in process (--model) or from a cluster (--endpoint)"),
    "inspect": ("services.cli.inspect", "parameter counts and KV-cache bytes per token of a model"),
    "convert": ("services.cli.convert", "write an FP8 (e4m3, 128x128 block scales) copy of a checkpoint"),
    "size": ("services.cli.size", "size a deployment: TPOT, throughput and the bound of each decode step"),
    "up": ("services.cli.cluster", "start a local cluster (Redis, router, shards, workers, gateway)"),
    "down": ("services.cli.cluster", "stop the local cluster started with --detach"),
    "status": ("services.cli.cluster", "shards, replicas, planes, routing plan version and expert load"),
}
# Other names of a subcommand, answered exactly as it is: older docs and scripts type `moe plan`,
# while "plan" otherwise means the router's routing plan.
ALIASES = {"plan": "size"}


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""

    status = 2


class ServiceError(CliError):
    """The input was fine but a service could not serve it (unreachable, deadline passed, out of
    capacity): printed as one line, exit status 1, so scripts can tell an outage from bad input."""

    status = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="moe-runtime: distributed MoE inference")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        aliases = [alias for alias, command in ALIASES.items() if command == name]
        sub.add_parser(name, help=help_text, add_help=False, aliases=aliases)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = build_parser()
    name = argv[0] if argv else ""
    command = ALIASES.get(name, name)
    if command not in SUBCOMMANDS:
        top.parse_args(argv)  # prints help or the unknown-command error and exits
        return 2
    module_name, description = SUBCOMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"moe {name}", description=description)
    module.add_arguments(parser, command)
    args = parser.parse_args(argv[1:])
    args.command = command
    try:
        return int(module.run(args) or 0)
    except CliError as err:
        print(f"moe {name}: {err}", file=sys.stderr)
        return err.status
    except ModelError as err:
        print(f"moe {name}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`moe inspect --json | head`): stop quietly, as Unix tools do, and
        # keep Python from failing again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

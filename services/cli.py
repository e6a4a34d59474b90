"""The `moe` command: one entry point whose subcommands live in their own modules.

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
    "generate": ("services.commands.generate", "generate tokens, in process (--model) or from a cluster (--endpoint)"),
    "inspect": ("services.commands.inspect", "parameter counts and KV-cache bytes per token of a model"),
    "convert": ("services.commands.convert", "write an FP8 (e4m3, 128x128 block scales) copy of a checkpoint"),
    "plan": ("services.planner.cli", "size a deployment: TPOT, throughput and the bound of each decode step"),
    "up": ("services.launcher.cli", "start a local cluster (Redis, router, shards, workers, gateway)"),
    "down": ("services.launcher.cli", "stop the local cluster started with --detach"),
    "status": ("services.launcher.cli", "shards, replicas, planes, plan version and expert load"),
}


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
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv)  # prints help or the unknown-command error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"moe {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser, name)
    args = parser.parse_args(argv[1:])
    args.command = name
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


if __name__ == "__main__":
    # `python -m services.cli` runs this file as __main__; use the importable module's main so
    # CliError raised by subcommands is the class it catches.
    from services.cli import main as package_main

    sys.exit(package_main())

"""`moe size` (also `moe plan`): size a deployment from a model config, a hardware profile and deployment flags.

Settings are layered: Deployment defaults, then `--paper`, then `--values FILE`, then flags.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from services.cli import CliError
from services.cli.inspect import add_model_arguments, model_config_from_args
from services.sizing import estimate, load, profiles, values

DTYPES = tuple(estimate.VALUE_BYTES)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--profile", default="h800", help=f"hardware: {', '.join(profiles.BUILTIN)} or a profile JSON file (default h800)")
    parser.add_argument("--paper", action="store_true", help="the ISCA 2025 paper's assumptions: 32 tokens/device, 1 expert/GPU, shared expert dispatched, comm only, no latency")
    parser.add_argument("--values", metavar="FILE", help="size the deployment of a Helm values file")
    deploy = parser.add_argument_group("deployment (flags override --paper and --values)")
    deploy.add_argument("--tokens-per-device", type=float, help="positions per EP device per micro-batch")
    deploy.add_argument("--attention-batch", type=int, help="sequences per attention worker (instead of --tokens-per-device)")
    deploy.add_argument("--experts-per-gpu", type=int)
    deploy.add_argument("--redundant-experts", type=int)
    deploy.add_argument("--ep-width", type=int, help="EP devices (default: just enough for all expert slots)")
    deploy.add_argument("--planes", type=int)
    deploy.add_argument("--max-nodes-per-token", type=int, help="node-limited routing: copies leaving a node per token")
    deploy.add_argument("--dispatch-dtype", choices=DTYPES)
    deploy.add_argument("--combine-dtype", choices=DTYPES)
    deploy.add_argument("--no-overlap", dest="two_micro_batch", action="store_false", default=None, help="one micro-batch: communication and compute add up")
    deploy.add_argument("--attention-workers", type=int, help="separate attention GPUs (default: attention on every EP device)")
    deploy.add_argument("--context-length", type=int, help="KV tokens per sequence (default 4096)")
    deploy.add_argument("--mtp-acceptance", type=float, help="decode with MTP; acceptance rate of the drafted token")
    deploy.add_argument("--hidden-override", type=int, help="hidden width on the wire (the paper uses 7000)")
    deploy.add_argument("--kernel-efficiency", type=float, help="fraction of HBM/FLOP peaks kernels reach (default 0.7)")
    skew = deploy.add_mutually_exclusive_group()
    skew.add_argument("--zipf", type=float, metavar="S", help="expert load follows Zipf with exponent S")
    skew.add_argument("--expert-load", metavar="FILE", help="JSON per-expert token counts (list, {id: n} or {layer: {id: n}})")
    parser.add_argument("--sweep", metavar="FIELD=V1,V2,..", help="e.g. tokens-per-device=8,16,32,64")
    parser.add_argument("--plot", metavar="FILE", help="with --sweep: write a PNG of the curve (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


FLAG_FIELDS = (
    "tokens_per_device", "experts_per_gpu", "redundant_experts", "ep_width", "planes", "max_nodes_per_token",
    "dispatch_dtype", "combine_dtype", "two_micro_batch", "attention_workers", "context_length",
    "mtp_acceptance", "hidden_override", "kernel_efficiency",
)


def deployment_from_args(args: argparse.Namespace, cfg) -> estimate.Deployment:
    settings: dict[str, Any] = dict(estimate.PAPER_ASSUMPTIONS) if args.paper else {}
    batch = None
    if args.values:
        from_values = values.deployment_settings(args.values, cfg)
        batch = from_values.pop("attention_batch")
        settings.update(from_values)
    settings.update({name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None})
    if args.attention_batch is not None:
        if args.tokens_per_device is not None:
            raise CliError("give --tokens-per-device or --attention-batch, not both")
        batch = args.attention_batch
    if args.zipf is not None:
        settings["expert_load"] = (tuple(load.zipf_shares(cfg.n_routed_experts, args.zipf)),)
    elif args.expert_load:
        settings["expert_load"] = tuple(tuple(layer) for layer in load.read_load_file(args.expert_load, cfg.n_routed_experts))
    deployment = estimate.Deployment(**settings)
    if batch is not None and args.tokens_per_device is None:
        deployment = replace(deployment, tokens_per_device=tokens_for_batch(cfg, deployment, batch))
    return deployment


def tokens_for_batch(cfg, d: estimate.Deployment, sequences_per_worker: int) -> float:
    """Positions per EP device per micro-batch when each attention worker decodes `sequences_per_worker`."""
    ep = d.ep_width or -(-(cfg.n_routed_experts + d.redundant_experts) // d.experts_per_gpu)
    positions = 1 + (cfg.num_nextn_predict_layers if d.mtp_acceptance is not None else 0)
    micro_batches = 2 if d.two_micro_batch else 1
    return (d.attention_workers or ep) * sequences_per_worker * positions / (ep * micro_batches)


def _parse_sweep(spec: str) -> tuple[str, list[float]]:
    name, _, raw = spec.partition("=")
    try:
        points = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        points = []
    if not name or not points:
        raise CliError(f"bad --sweep '{spec}': expected FIELD=V1,V2,... e.g. tokens-per-device=8,16,32")
    return name.strip().replace("-", "_"), points


US = 1e6


def percent(fraction: float) -> str:
    """Whole percent, with a decimal (or "<0.1%") where that would round a nonzero share to 0%."""
    if fraction == 0 or round(fraction * 100) >= 1:
        return f"{fraction:.0%}"
    if round(fraction * 100, 1) >= 0.1:
        return f"{fraction:.1%}"
    return "<0.1%"


def format_estimate(e: estimate.Estimate, omissions: dict[str, float]) -> str:
    layer, d = e.moe_layer, e.deployment
    rows = [
        ("hardware / GPUs", f"{e.profile}, {e.gpus} GPUs (EP {e.ep_width}, {e.moe_layer.fabric})"),
        ("tokens per device", f"{d.tokens_per_device:g} x {2 if d.two_micro_batch else 1} micro-batch(es)"),
        ("per MoE layer", f"slowest device carries {layer.slowest_device_factor:.3f} x the mean load"),
        ("  dispatch bytes/token", f"{layer.dispatch_bytes_per_token:,.0f} ({d.dispatch_dtype})"),
        ("  combine bytes/token", f"{layer.combine_bytes_per_token:,.0f} ({d.combine_dtype})"),
        ("  communication", f"{layer.communication_s * US:.2f} us"),
        ("  attention", f"{layer.attention_s * US:.2f} us"),
        ("  expert GEMM", f"{layer.expert_gemm_s * US:.2f} us ({percent(layer.expert_flop_utilisation)} of FP8 peak)"),
        ("  layer", f"{layer.layer_s * US:.2f} us, bound by {layer.bound}"),
        ("per step", f"{e.moe_layers_in_step} MoE + {e.dense_layers_in_step} dense layers, {e.step_s * 1e3:.2f} ms"),
        ("TPOT", f"{e.tpot_s * 1e3:.2f} ms"),
        ("output tokens/s per user", f"{e.tokens_per_s_per_user:,.1f}"),
        ("output tokens/s per GPU", f"{e.tokens_per_s_per_gpu:,.0f}"),
        ("KV bytes per token", f"{e.kv_bytes_per_token:,}"),
        ("sequences per attention worker", f"{e.sequences_per_attention_worker:,.1f} (fits: {e.max_sequences_per_attention_worker:,} at {d.context_length} tokens)"),
    ]
    if not e.batch_fits_kv_cache:
        rows.append(("WARNING", f"the batch does not fit the KV cache: {e.sequences_per_attention_worker:,.1f} sequences per attention worker, room for {e.max_sequences_per_attention_worker:,}"))
    rows += [(f"  undo {name}", f"TPOT x {ratio:.2f}") for name, ratio in omissions.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_sweep(field: str, estimates: list[estimate.Estimate]) -> str:
    header = f"{field:>18} {'TPOT ms':>9} {'tok/s/user':>11} {'tok/s/GPU':>10} {'comm us':>9} {'attn us':>9} {'GEMM us':>9}  bound"
    lines = [header]
    for e in estimates:
        m = e.moe_layer
        lines.append(
            f"{getattr(e.deployment, field):>18g} {e.tpot_s * 1e3:>9.2f} {e.tokens_per_s_per_user:>11.1f} {e.tokens_per_s_per_gpu:>10.0f} "
            f"{m.communication_s * US:>9.2f} {m.attention_s * US:>9.2f} {m.expert_gemm_s * US:>9.2f}  {m.bound}"
        )
    return "\n".join(lines)


def write_plot(path: str, field: str, estimates: list[estimate.Estimate]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    xs = [getattr(e.deployment, field) for e in estimates]
    figure, left = pyplot.subplots(figsize=(7, 4))
    left.plot(xs, [e.tokens_per_s_per_user for e in estimates], "o-", label="tokens/s per user")
    left.set_xlabel(field.replace("_", " "))
    left.set_ylabel("output tokens/s per user")
    right = left.twinx()
    right.plot(xs, [e.tokens_per_s_per_gpu for e in estimates], "s--", color="tab:orange", label="tokens/s per GPU")
    right.set_ylabel("output tokens/s per GPU")
    figure.legend(loc="upper center", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run(args: argparse.Namespace) -> int:
    if args.plot and not args.sweep:
        raise CliError("--plot draws a --sweep; add --sweep FIELD=V1,V2,...")
    try:
        cfg = model_config_from_args(args)
        profile = profiles.load_profile(args.profile)
    except OSError as err:
        raise CliError(str(err)) from None
    deployment = deployment_from_args(args, cfg)
    if args.sweep:
        field, points = _parse_sweep(args.sweep)
        results = estimate.sweep(cfg, profile, deployment, field, points)
        if args.plot:
            write_plot(args.plot, field, results)
        print(json.dumps([e.to_json() for e in results], indent=2) if args.json else format_sweep(field, results))
        return 0
    result = estimate.size_deployment(cfg, profile, deployment)
    omissions = estimate.omission_costs(cfg, profile, deployment)
    if args.json:
        print(json.dumps({**result.to_json(), "paper_omissions_tpot_ratio": omissions}, indent=2))
    else:
        print(format_estimate(result, omissions))
    return 0

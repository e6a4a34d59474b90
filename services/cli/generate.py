"""`moe generate`: in process with --model, or through a running cluster with --endpoint."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from services.cli import CliError, ServiceError
from services.common.devices import check_device

# --endpoint: HOST:PORT, [IPv6]:PORT or a unix: socket (gRPC alone would take a bare host to mean
# port 443)
ENDPOINT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):\d{1,5}|unix:.+")
# statuses that mean the request itself was wrong; any other is the cluster failing to serve it
BAD_INPUT_CODES = {"INVALID_ARGUMENT", "OUT_OF_RANGE"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="checkpoint directory (HF format) to run in this process")
    where.add_argument("--endpoint", help="HOST:PORT of a cluster's gateway")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; default: 1")
    parser.add_argument("--top-k", type=int, default=0, help="default: 0, no limit")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same tokens; default: none")
    parser.add_argument("--stop-ids", default=None, help="comma-separated stop token ids (default: the model's EOS)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens whatever comes")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="with --model; default: the checkpoint's torch_dtype")
    parser.add_argument("--device", help="cpu or cuda[:N], with --model; default: cpu")
    parser.add_argument("--fp8-experts", choices=["auto", "on", "off"], default="auto",
                        help="routed experts as block-scaled FP8 GEMMs (GPUs with FP8 tensor cores); "
                        "auto (default): when the checkpoint's experts are FP8 and the device can")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds, with --endpoint; default: 600")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"{flag} must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed is not None and args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    if args.endpoint:
        # a cluster's workers hold the model: these would be silently ignored
        for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
            if value is not None:
                raise CliError(f"{flag} applies to --model only; a cluster's workers choose their own")
        if not args.timeout > 0:
            raise CliError(f"--timeout must be > 0 seconds, got {args.timeout}")
        return _run_remote(args)
    return _run_local(args)


def _run_remote(args: argparse.Namespace) -> int:
    """Through a cluster's gateway: the same flags and output as the in-process path."""
    from services.client import Client, ClientError

    if not ENDPOINT.fullmatch(args.endpoint):
        raise CliError(f"--endpoint must be HOST:PORT, got {args.endpoint!r}")
    prompt_ids = _ids(args.prompt_ids, "--prompt-ids") if args.prompt_ids is not None else None
    stops: list[int] = []
    ignore_eos = args.ignore_eos
    if args.stop_ids is not None:
        stops = _ids(args.stop_ids, "--stop-ids")
        ignore_eos = True  # --stop-ids replaces the model's EOS, as in the in-process path
    try:
        with Client(args.endpoint, timeout=args.timeout) as client:
            result = client.generate(prompt_ids, args.prompt, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     seed=args.seed, stop_token_ids=stops, ignore_eos=ignore_eos)
    except ClientError as err:
        failure = CliError if err.code in BAD_INPUT_CODES else ServiceError
        raise failure(f"{err.code}: {err.message}") from None
    print_result(result.to_dict(), args.json)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from model.checkpoint import load_model
    from model.generate import Engine, GenerationRequest, SamplingParams
    from model.tokenizer import TextCodec, require_codec

    codec = require_codec(args.model) if args.prompt is not None else TextCodec.for_model(args.model)
    prompt = codec.encode(args.prompt) if args.prompt is not None else _ids(args.prompt_ids, "--prompt-ids")
    device = args.device or "cpu"
    try:
        check_device(device)
    except ValueError as err:
        raise CliError(str(err)) from None
    fp8_experts = {"auto": None, "on": True, "off": False}[args.fp8_experts]
    model = load_model(args.model, dtype=args.dtype, device=device, fp8_experts=fp8_experts)
    stops = () if args.ignore_eos else model.cfg.eos_token_ids
    if args.stop_ids is not None:
        stops = tuple(_ids(args.stop_ids, "--stop-ids"))
    request = GenerationRequest(
        prompt=tuple(prompt),
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(args.temperature, args.top_p, args.top_k, args.seed),
        stop_token_ids=stops,
    )
    engine = Engine(model, cache_tokens=max(1024, len(prompt) + args.max_new_tokens + 16), max_batch=1)
    started = time.monotonic()
    (seq,) = engine.generate([request])
    result = {
        "tokens": seq.tokens,
        "logprobs": seq.logprobs,
        "finish_reason": seq.finish_reason,
        "usage": {
            "prompt_tokens": len(prompt),
            "generated_tokens": len(seq.tokens),
            "time_to_first_token_ms": round((seq.first_token_at - started) * 1000, 3),
        },
    }
    if codec is not None:
        result["text"] = codec.decode(seq.tokens)
    print_result(result, args.json)
    return 0


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return
    print(result.get("text") if "text" in result else " ".join(map(str, result["tokens"])))
    usage = result["usage"]
    print(
        f"[{usage['generated_tokens']} tokens, finish: {result['finish_reason']}, "
        f"first token after {usage['time_to_first_token_ms']:.1f} ms]",
        file=sys.stderr,
    )

"""A local cluster on one device against the in-process generator on the same device: ms per
decode step at batch 1 and 16, 64 new tokens, same ~50M-parameter V3-style checkpoint as
decode_bench.py. On a GPU the in-process generator replays CUDA graphs; the cluster's attention
worker runs eagerly (its MoE layers wait on remote experts) and every process shares that GPU.
Each side's step time is (time for 2N tokens - time for N tokens) / N, best of two, so start-up,
prefill and capture cancel.

    python benchmarks/device_cluster_bench.py [--device cuda] [--transport ucx] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoints import make_checkpoint  # noqa: E402
from decode_bench import BENCH_CONFIG, PROMPT_LEN  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.generate import Engine, GenerationRequest  # noqa: E402
from services.client import Client  # noqa: E402
from services.launcher.cluster import LocalCluster  # noqa: E402

BATCHES = (1, 16)


def prompts(batch: int) -> list[tuple[int, ...]]:
    return [tuple((i * 7 + j) % 8000 for j in range(PROMPT_LEN)) for i in range(batch)]


def per_step(run, steps: int) -> float:
    """Seconds per decode step from `run(new_tokens) -> seconds`, set-up and prefill cancelled."""
    run(8)
    return min((run(2 * steps) - run(steps)) / steps for _ in range(2))


def in_process(model_dir: Path, device: str, batch: int, steps: int) -> float:
    engine = Engine(load_model(model_dir, device=device), cache_tokens=batch * (PROMPT_LEN + 2 * steps + 16),
                    max_batch=batch)

    def run(new_tokens: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate([GenerationRequest(p, new_tokens) for p in prompts(batch)])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return per_step(run, steps)


def through_cluster(endpoint: str, batch: int, steps: int) -> float:
    client = Client(endpoint, timeout=600)

    def run(new_tokens: int) -> float:
        threads = [threading.Thread(target=client.generate, kwargs=dict(
            prompt_ids=list(p), max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts(batch)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    return per_step(run, steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--transport", default="ucx", choices=["ucx", "grpc"])
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_checkpoint(model_dir, "v3", seed=0, **BENCH_CONFIG)
        ours = {batch: in_process(model_dir, args.device, batch, args.steps) for batch in BATCHES}
        with LocalCluster(model_dir, shards=2, replicas=1, attention_workers=1, transport=args.transport,
                          dispatch_dtype="fp32", device=args.device, run_dir=Path(tmp) / "run",
                          extra_args={"attention": ["--max-batch", str(max(BATCHES))]}) as cluster:
            theirs = {batch: through_cluster(cluster.gateway_endpoint, batch, args.steps) for batch in BATCHES}
    print(f"device {args.device}; cluster: 1 attention worker, 2 expert shards, {args.transport} dispatch in fp32")
    print(f"{'batch':>5} {'in-process ms/step':>19} {'cluster ms/step':>16} {'cluster / in-process':>21}")
    for batch in BATCHES:
        print(f"{batch:>5} {ours[batch] * 1e3:>19.2f} {theirs[batch] * 1e3:>16.2f} {theirs[batch] / ours[batch]:>20.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A local cluster on one device against the in-process generator on the same device: ms per
decode step at batch 1 and 16, same ~50M-parameter V3-style checkpoint as decode_bench.py. On a
GPU the in-process generator replays CUDA graphs; the cluster's attention worker runs eagerly (its
MoE layers wait on remote experts) and every process shares that GPU. Step times come from
decode_bench.per_step (N and 2N new tokens differenced, the two sides taking turns, best of the
rounds); requests go through the gateway as in cluster_bench.py.

    python benchmarks/device_cluster_bench.py [--device cuda] [--transport ucx] [--steps 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from cluster_bench import ClusterClient, prompts, time_cluster  # noqa: E402
from decode_bench import BENCH_CONFIG, PROMPT_LEN, per_step  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.generate import Engine, GenerationRequest  # noqa: E402
from services.launcher.cluster import LocalCluster  # noqa: E402

BATCHES = (1, 16)


def time_engine(engine: Engine, batch: int, new_tokens: int) -> float:
    """decode_bench.time_ours on one engine kept across calls: a new engine would capture its
    CUDA graphs again inside every timing."""
    started = time.perf_counter()
    engine.generate([GenerationRequest(tuple(p), new_tokens) for p in prompts(batch)])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--transport", default="ucx", choices=["ucx", "grpc"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_checkpoint(model_dir, "v3", seed=0, **BENCH_CONFIG)
        model = load_model(model_dir, device=args.device)
        with LocalCluster(model_dir, shards=2, replicas=1, attention_workers=1, transport=args.transport,
                          dispatch_dtype="fp32", device=args.device, run_dir=Path(tmp) / "run",
                          extra_args={"attention": ["--max-batch", str(max(BATCHES))]}) as cluster, \
                ClusterClient(cluster.gateway_endpoint) as client:
            times = {}
            for batch in BATCHES:
                engine = Engine(model, cache_tokens=batch * (PROMPT_LEN + 2 * args.steps + 16), max_batch=batch)
                times[batch] = per_step({"in process": (time_engine, engine), "cluster": (time_cluster, client)},
                                        batch, args.steps, args.rounds)
    print(f"device {args.device}; cluster: 1 attention worker, 2 expert shards, {args.transport} dispatch in fp32")
    print(f"{'batch':>5} {'in-process ms/step':>19} {'cluster ms/step':>16} {'cluster / in-process':>21}")
    for batch, t in times.items():
        print(f"{batch:>5} {t['in process'] * 1e3:>19.2f} {t['cluster'] * 1e3:>16.2f} "
              f"{t['cluster'] / t['in process']:>20.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

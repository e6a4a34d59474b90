"""Where an attention worker's decode step goes in a local cluster, at one batch size.

Against one local cluster (1 attention worker, 2 expert shards, gRPC), two measurements of the
steady decode step (no admissions in the window):
- served: B streaming requests through the gateway; the worker's Prometheus step split;
- bare: the same worker code (engine + dispatcher) in this process against the same shards, with
  no gRPC server, scheduler or response streams around it.
The difference between the two "own compute" figures is what serving adds on the worker (its
threads compete for the GIL); the bare figure against the in-process model's non-expert time is
what dispatch bookkeeping adds.

    python benchmarks/worker_split_bench.py [--batch 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from cluster_bench import EXPERT, SPLIT, prompts, split_snapshot  # noqa: E402
from decode_bench import BENCH_CONFIG  # noqa: E402
from model.generate import GenerationRequest  # noqa: E402
from services.attention.worker import AttentionWorker, PlanWatcher  # noqa: E402
from services.client import Client  # noqa: E402
from services.common.redis_store import Keys  # noqa: E402
from services.launcher.cluster import LocalCluster  # noqa: E402
from services.transport.grpc_transport import GrpcTransport  # noqa: E402

def served(cluster: LocalCluster, batch: int, seconds: float) -> dict[str, float]:
    client = Client(cluster.gateway_endpoint, timeout=600)
    stop = threading.Event()

    def keep_generating(prompt: list[int]) -> None:
        while not stop.is_set():
            try:
                client.generate(prompt_ids=prompt, max_new_tokens=400, ignore_eos=True)
            except Exception:  # noqa: BLE001 - the cluster stops under the last requests
                if not stop.is_set():
                    raise

    threads = [threading.Thread(target=keep_generating, args=(p,), daemon=True) for p in prompts(batch)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)  # every request admitted and decoding
    before = split_snapshot(cluster)
    time.sleep(seconds)
    delta = {k: v - before[k] for k, v in split_snapshot(cluster).items()}
    stop.set()
    steps = max(delta[SPLIT["steps"]], 1.0)
    return {"step": delta[SPLIT["step"]] / steps, "own compute": delta[SPLIT["attention"]] / steps,
            "dispatch wait": delta[SPLIT["dispatch wait"]] / steps, "expert compute": delta[EXPERT] / steps}


def bare(cluster: LocalCluster, model_dir: Path, batch: int, steps: int, compile_decode: bool) -> dict[str, float]:
    worker = AttentionWorker(str(model_dir), GrpcTransport("fp32"), plane=0, dtype=None, device="cpu",
                             cache_tokens=65536, max_batch=batch, compile_decode=compile_decode)
    watcher = PlanWatcher(redis.Redis.from_url(cluster.redis_url, password=cluster.redis_password), Keys(cluster.cluster), worker.plans).start()
    try:
        for prompt in prompts(batch):
            worker.engine.add(GenerationRequest(tuple(prompt), steps + 64))
        for _ in range(8):  # admissions, then a few warm decode steps
            worker.engine.step()
        waited, started = worker.dispatcher.wait_seconds, time.perf_counter()
        for _ in range(steps):
            worker.engine.step()
        step = (time.perf_counter() - started) / steps
        wait = (worker.dispatcher.wait_seconds - waited) / steps
        return {"step": step, "own compute": step - wait, "dispatch wait": wait}
    finally:
        watcher.stop()
        worker.dispatcher.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compile-decode", action="store_true", help="compiled decode steps, served and bare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_checkpoint(model_dir, "v3", seed=0, **BENCH_CONFIG)
        with LocalCluster(model_dir, shards=2, replicas=1, attention_workers=1, planes=1, transport="grpc",
                          dispatch_dtype="fp32", run_dir=Path(tmp) / "run", compile_decode=args.compile_decode,
                          ready_timeout=600.0, extra_args={"attention": ["--max-batch", str(args.batch)]}) as cluster:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", cluster.torch_threads)))  # as the cluster's worker
            # bare first: the served requests would still be decoding beside it
            rows = {"bare": bare(cluster, model_dir, args.batch, args.steps, args.compile_decode)}
            rows["served"] = served(cluster, args.batch, args.seconds)
    print(f"batch {args.batch}, steady decode{', compiled' if args.compile_decode else ''}, ms per step ({torch.get_num_threads()} torch thread(s) in the bare worker)")
    print(f"{'worker':>8} {'step':>7} {'own compute':>12} {'dispatch wait':>14} {'expert compute (shards summed)':>31}")
    for name, row in rows.items():
        expert = f"{row['expert compute'] * 1e3:.1f}" if "expert compute" in row else "-"
        print(f"{name:>8} {row['step'] * 1e3:>7.1f} {row['own compute'] * 1e3:>12.1f} {row['dispatch wait'] * 1e3:>14.1f} {expert:>31}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster decode throughput: a local cluster (separate processes over loopback gRPC), the
in-process generator and transformers' generate(), on the same checkpoint in one run.

Each side runs B concurrent greedy requests for N and for 2N new tokens; (time(2N) - time(N)) / N
is the decode time per step with prefill and start-up cancelled out. The three sides take turns
within each repeat, so a noisy minute on this shared machine hits all of them. The cluster's step
is split into attention (local compute on the worker), dispatch wait (the worker blocked on expert
replies) and expert compute (the shards' merged per-layer computations), read from the services'
Prometheus metrics around each timed call and differenced the same way, so prefill and
admission cancel out of the split too.

With --compile-decode the attention workers compile their decode steps before serving, and the
in-process generator runs both eagerly and compiled (`Engine(compile_cpu=True)`), each a side of
its own. With --attention-dtype bfloat16 the attention workers and the in-process generator run
in bf16 (the shards keep the checkpoint's fp32: their thin expert GEMMs are slower in bf16 on
CPU), and transformers runs in bf16 as well as in fp32. With --worker-local-experts IDS the
attention workers compute those routed experts themselves (`--local-experts`). With --pin-cpus
each shard and worker runs on CPUs of its own (`moe up --pin-cpus`).

    python benchmarks/cluster_bench.py [--batches 1,16,64] [--steps 16] [--dispatch-dtype fp32]
        [--compile-decode] [--attention-dtype float32|bfloat16] [--worker-local-experts 0-15] [--pin-cpus]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from decode_bench import BENCH_CONFIG, PROMPT_LEN, per_step, time_ours, time_transformers  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from services.client import AsyncClient  # noqa: E402
from services.launcher.cluster import LocalCluster  # noqa: E402


def prompts(batch: int) -> list[list[int]]:
    return [[(i * 7 + j) % 8000 for j in range(PROMPT_LEN)] for i in range(batch)]


class ClusterClient:
    """One AsyncClient on an event loop of its own: a batch's requests run as concurrent streams on
    the loop's one thread, so the benchmark's own client costs the shared cores as little as it can."""

    def __init__(self, endpoint: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._connect(endpoint))

    @staticmethod
    async def _connect(endpoint: str) -> AsyncClient:
        return AsyncClient(endpoint, timeout=600)

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_cluster(client: ClusterClient, batch: int, new_tokens: int) -> float:
    async def run() -> list:
        return await asyncio.gather(*(client.client.generate(prompt_ids=p, max_new_tokens=new_tokens, ignore_eos=True)
                                      for p in prompts(batch)), return_exceptions=True)

    start = time.perf_counter()
    outcomes = client.loop.run_until_complete(run())
    elapsed = time.perf_counter() - start
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} cluster requests failed, first: {errors[0]}")
    return elapsed


def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Sum the Prometheus samples whose name (with labels) starts with one of `names`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for name in names:
            if line.startswith(name):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


SPLIT = {
    "attention": 'moe_attention_step_seconds_sum{phase="local_compute"}',
    "dispatch wait": 'moe_attention_step_seconds_sum{phase="dispatch_wait"}',
    "steps": 'moe_attention_step_seconds_count{phase="total"}',
    "step": 'moe_attention_step_seconds_sum{phase="total"}',
}
EXPERT = "moe_expert_compute_seconds_sum"


def split_snapshot(cluster: LocalCluster) -> dict[str, float]:
    snap = {}
    for name in cluster.names("attention"):
        for key, value in scrape(cluster.processes[name].metrics_port, tuple(SPLIT.values())).items():
            snap[key] = snap.get(key, 0.0) + value
    snap[EXPERT] = sum(scrape(cluster.processes[n].metrics_port, (EXPERT,))[EXPERT] for n in cluster.names("expert"))
    return snap


class TimedCluster:
    """`time_cluster` that also records the step split's metric deltas of each call, by its
    number of new tokens, for `per_decode_step`."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.deltas: dict[int, list[dict[str, float]]] = {}

    def __call__(self, client: ClusterClient, batch: int, new_tokens: int) -> float:
        before = split_snapshot(self.cluster)
        elapsed = time_cluster(client, batch, new_tokens)
        after = split_snapshot(self.cluster)
        self.deltas.setdefault(new_tokens, []).append({k: after[k] - before[k] for k in after})
        return elapsed

    def per_decode_step(self, steps: int) -> dict[str, float]:
        """Seconds per decode step of each split metric: (mean over the calls of 2N new tokens -
        mean over those of N) / N."""
        def mean(calls: list[dict[str, float]], key: str) -> float:
            return sum(c[key] for c in calls) / len(calls)

        short, long = self.deltas.pop(steps), self.deltas.pop(2 * steps)
        self.deltas.clear()
        keys = {"attention": SPLIT["attention"], "dispatch wait": SPLIT["dispatch wait"], "expert compute": EXPERT}
        return {name: (mean(long, key) - mean(short, key)) / steps for name, key in keys.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dispatch-dtype", choices=["fp32", "bf16", "fp8"],
                        help="hidden states on the wire [the attention workers' dtype: fp32 or bf16]")
    parser.add_argument("--attention-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights of the attention workers and the in-process generator [float32]")
    parser.add_argument("--transport", default="auto", choices=["auto", "grpc", "ucx"],
                        help="expert data path, as `moe up --transport` [auto: UCX where ucxx is installed]")
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--compile-decode", action="store_true",
                        help="compiled decode steps in the attention workers, and an in-process compiled side")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="each shard and attention worker on CPUs of its own, as `moe up --pin-cpus`")
    parser.add_argument("--worker-local-experts", metavar="IDS",
                        help="routed experts the attention workers compute themselves, e.g. 0-15 (--local-experts)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        hf = make_checkpoint(model_dir, "v3", seed=0, **BENCH_CONFIG)
        ours = load_model(model_dir, dtype=args.attention_dtype)
        hf.eval()
        dispatch_dtype = args.dispatch_dtype or ("fp32" if args.attention_dtype == "float32" else "bf16")
        attention_args = ["--max-batch", str(max(batches)), "--kv-cache-tokens", "65536", "--dtype", args.attention_dtype]
        if args.worker_local_experts:
            attention_args += ["--local-experts", args.worker_local_experts]
        with LocalCluster(
            model_dir, shards=2, replicas=1, attention_workers=args.attention_workers, planes=1, transport=args.transport,
            dispatch_dtype=dispatch_dtype, run_dir=Path(tmp) / "run", compile_decode=args.compile_decode,
            ready_timeout=600.0, extra_args={"attention": attention_args}, pin_cpus=args.pin_cpus,
        ) as cluster, ClusterClient(cluster.gateway_endpoint) as client:
            print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, attention workers and "
                  f"in-process generator in {args.attention_dtype}, shards in float32; prompt {PROMPT_LEN}; "
                  f"cluster: {args.attention_workers} attention worker(s){' compiling decode' if args.compile_decode else ''}"
                  f"{' with local experts ' + args.worker_local_experts if args.worker_local_experts else ''}, "
                  f"2 expert shards, {'ucx' if cluster.serves_ucx else 'grpc'} dispatch in {dispatch_dtype}; "
                  f"{cluster.torch_threads} torch thread(s) per process{', pinned' if args.pin_cpus else ''}")
            peers = {"in-process": (time_ours, ours)}
            if args.compile_decode:
                peers["in-process compiled"] = (functools.partial(time_ours, compile_cpu=True), ours)
            peers["transformers"] = (time_transformers, hf)
            if args.attention_dtype != "float32":
                peers[f"transformers {args.attention_dtype}"] = (
                    time_transformers, copy.deepcopy(hf).to(getattr(torch, args.attention_dtype)))
            print(f"{'batch':>5} {'cluster tok/s':>14} " + " ".join(f"{name + ' tok/s':>{len(name) + 7}}" for name in peers)
                  + " " + " ".join(f"{'cluster/' + name:>{len(name) + 9}}" for name in peers))
            timed, splits = TimedCluster(cluster), []
            for batch in batches:
                step = per_step({"cluster": (timed, client), **peers}, batch, args.steps, args.repeats)
                clustered = step["cluster"]
                print(f"{batch:>5} {batch / clustered:>14.0f} "
                      + " ".join(f"{batch / step[name]:>{len(name) + 7}.0f}" for name in peers) + " "
                      + " ".join(f"{step[name] / clustered:>{len(name) + 8}.2f}x" for name in peers))
                splits.append((batch, timed.per_decode_step(args.steps)))
    print("\nwhere a cluster decode step goes (ms per decode step, differenced like the times above):")
    print(f"{'batch':>5} {'attention ms':>13} {'dispatch wait ms':>17} {'expert compute ms':>18}")
    for batch, split in splits:
        print(f"{batch:>5} {split['attention'] * 1e3:>13.2f} "
              f"{split['dispatch wait'] * 1e3:>17.2f} {split['expert compute'] * 1e3:>18.2f}")
    print("(expert compute runs inside the dispatch wait; the rest of the wait is transport and queueing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

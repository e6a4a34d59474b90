"""End to end: a real local cluster (Redis, router, expert shards, attention workers, gateway as
separate processes on loopback) against transformers and the in-process generator."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import redis
import torch

from model.checkpoint import load_model
from model.config import ModelConfig
from model.generate import Engine, GenerationRequest, SamplingParams
from moe.v1 import inference_pb2, inference_pb2_grpc
from services.client import Client, ClientError
from services.common import redis_store
from services.common.cpus import available_cpus, deal_cpus
from services.common.plan import Plan
from services.launcher.cluster import LocalCluster
from services.launcher.preflight import split_experts
from support import wait_until

pytestmark = pytest.mark.cluster

PROMPTS = [[(7 * i + 3 * j) % 300 + 1 for j in range(2 + (5 * i) % 11)] for i in range(16)]
LENGTHS = [4 + (3 * i) % 13 for i in range(16)]


@pytest.fixture(scope="module")
def reference(v3_checkpoint):
    """Greedy tokens and logprobs of the in-process generator (checked against transformers below)."""
    path, _ = v3_checkpoint
    engine = Engine(load_model(path), cache_tokens=4096, max_batch=16)
    seqs = engine.generate([GenerationRequest(tuple(p), n) for p, n in zip(PROMPTS, LENGTHS)])
    return [(s.tokens, s.logprobs) for s in seqs]


@pytest.fixture(scope="module", params=["grpc", "ucx", "grpc, compiled decode"])
def cluster(request, v3_checkpoint, tmp_path_factory):
    """Every test below runs against each transport, and once more with attention workers whose
    decode steps are compiled graphs calling the dispatcher through custom operators."""
    path, _ = v3_checkpoint
    transport, _, compiled = request.param.partition(", ")
    with LocalCluster(
        path, shards=2, replicas=2, attention_workers=2, planes=2, transport=transport,
        dispatch_dtype="fp32", run_dir=tmp_path_factory.mktemp("cluster"), compile_decode=bool(compiled),
        ready_timeout=900.0 if compiled else 180.0,
    ) as running:
        yield running


def run_concurrently(client: Client, jobs: list[dict], stagger_s: float = 0.02) -> list:
    """Start each job on its own thread, a little after the previous one, so requests join a
    running batch at different times."""
    results: list = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            results[i] = client.generate(**jobs[i])
        except ClientError as err:
            results[i] = err

    threads = []
    for i in range(len(jobs)):
        threads.append(threading.Thread(target=work, args=(i,)))
        threads[-1].start()
        time.sleep(stagger_s)
    for t in threads:
        t.join(timeout=120)
    return results


def greedy_jobs() -> list[dict]:
    return [dict(prompt_ids=p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, LENGTHS)]


def counter(metrics_port: int, metric: str, by: str, **match: str) -> dict[str, float]:
    """One process's counter `metric` summed by the value of its label `by`, over the samples
    whose labels equal `match`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in match.items()):
            key = line.split(f'{by}="')[1].split('"')[0]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def workers_counter(cluster: LocalCluster, metric: str, by: str, **match: str) -> dict[str, float]:
    """`counter` summed over the cluster's attention workers."""
    out: dict[str, float] = {}
    for name in cluster.names("attention"):
        for key, value in counter(cluster.processes[name].metrics_port, metric, by, **match).items():
            out[key] = out.get(key, 0.0) + value
    return out


def decode_steps(cluster: LocalCluster) -> dict[str, float]:
    """The attention workers' decode steps by path (graph or eager), summed."""
    return {"graph": 0.0, "eager": 0.0} | workers_counter(cluster, "moe_attention_decode_steps_total", "path")


def test_sixteen_concurrent_streams_match_transformers_and_in_process_logprobs(cluster, reference, v3_checkpoint):
    _, hf = v3_checkpoint
    before = decode_steps(cluster)
    results = run_concurrently(Client(cluster.gateway_endpoint, timeout=120), greedy_jobs())
    steps = {path: n - before[path] for path, n in decode_steps(cluster).items()}
    if cluster.compile_decode:
        assert steps["graph"] > 0 and steps["eager"] == 0, steps
    else:
        assert steps["graph"] == 0 and steps["eager"] > 0, steps
    for prompt, n, result, (tokens, logprobs) in zip(PROMPTS, LENGTHS, results, reference):
        assert not isinstance(result, Exception), result
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert result.tokens == expected[0, len(prompt) :].tolist() == tokens
        assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) <= 1e-4
        assert result.finish_reason == "length" and result.usage["generated_tokens"] == n


def test_seeded_sampling_gives_the_same_tokens_in_and_out_of_the_cluster(cluster, v3_checkpoint):
    path, _ = v3_checkpoint
    sampling = dict(temperature=0.9, top_p=0.95, top_k=40, seed=2024)
    result = Client(cluster.gateway_endpoint, timeout=60).generate(prompt_ids=[5, 6, 7], max_new_tokens=12, ignore_eos=True, **sampling)
    (local,) = Engine(load_model(path), 512).generate(
        [GenerationRequest((5, 6, 7), 12, SamplingParams(sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["seed"]))]
    )
    assert result.tokens == local.tokens


def plane_bytes(metrics_port: int) -> dict[str, float]:
    return {"same_plane": 0.0, "cross_plane": 0.0} | counter(metrics_port, "moe_dispatch_plane_bytes_total", "crossing")


def test_workers_prefer_replicas_on_their_own_plane(cluster):
    # Two planes, each shard has a replica on both: every worker finds its experts on its own
    # plane, so no dispatched byte should cross planes while all replicas are alive.
    client = Client(cluster.gateway_endpoint, timeout=60)
    before = {n: plane_bytes(cluster.processes[n].metrics_port) for n in cluster.names("attention")}
    run_concurrently(client, greedy_jobs()[:4])
    after = {n: plane_bytes(cluster.processes[n].metrics_port) for n in cluster.names("attention")}
    same = sum(after[n]["same_plane"] - before[n]["same_plane"] for n in after)
    crossed = sum(after[n]["cross_plane"] - before[n]["cross_plane"] for n in after)
    assert same > 0 and crossed == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=[1, 999999], max_new_tokens=4), "outside the vocabulary"),
        (dict(prompt_ids=[1, 2], max_new_tokens=4, stop_token_ids=[999999]), "stop token ids [999999]"),
        (dict(prompt_ids=[], max_new_tokens=4), "prompt"),
        (dict(prompt_ids=[1, 2], max_new_tokens=100000), "context limit"),
        (dict(prompt_ids=[1, 2], max_new_tokens=4, temperature=-0.5), "temperature"),
        (dict(prompt_ids=[1, 2], max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(prompt_ids=[1, 2], max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(prompt_ids=[1, 2] * 200, max_new_tokens=4), "context limit"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_cluster_keeps_serving(cluster, kwargs, message):
    client = Client(cluster.gateway_endpoint, timeout=30)
    with pytest.raises(ClientError) as info:
        client.generate(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT" and message in info.value.message
    assert len(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True).tokens) == 3


def test_negative_max_new_tokens_reaches_the_server_as_invalid_argument(cluster):
    channel = grpc.insecure_channel(cluster.gateway_endpoint)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(prompt_ids=inference_pb2.TokenIds(ids=[1, 2]), max_new_tokens=-3)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in info.value.details()


def test_redis_stopped_mid_run_generation_continues_on_the_cached_plan(cluster, reference):
    client = Client(cluster.gateway_endpoint, timeout=60)
    cluster.stop_process("redis", signal.SIGKILL)
    try:
        result = client.generate(prompt_ids=PROMPTS[1], max_new_tokens=LENGTHS[1], ignore_eos=True)
        assert result.tokens == reference[1][0]
    finally:
        cluster.start_process("redis")
        cluster.wait_serving("redis")
    store, keys = redis_store.connect(cluster.redis_url, cluster.redis_password), redis_store.Keys(cluster.cluster)
    # heartbeats re-register every replica into the empty Redis
    wait_until(lambda: len(redis_store.list_replicas(store, keys, "expert")) >= len(cluster.names("expert")), 30,
               "replicas to re-register after Redis returned", interval=0.2)
    # the router republishes a complete plan once the replicas are back
    found = wait_until(lambda: redis_store.read_plan(store, keys), 30, "a plan after Redis returned", interval=0.2)
    assert not Plan.from_json(found[1]).missing, "the router declared live experts missing"


def test_the_clusters_redis_refuses_clients_without_its_password_which_no_log_shows(cluster):
    with pytest.raises(redis.AuthenticationError):
        redis_store.connect(cluster.redis_url).ping()
    assert redis_store.connect(cluster.redis_url, cluster.redis_password).ping()
    assert cluster.redis_config.stat().st_mode & 0o077 == 0
    for proc in cluster.processes.values():
        assert cluster.redis_password not in proc.log_path.read_text(errors="replace"), proc.name


def test_replica_killed_mid_request_is_retried_elsewhere_with_the_same_tokens(cluster, v3_checkpoint):
    """The replica dies while it serves these requests (its token counter moved since they
    started), the workers' dispatch failures count it, and every request still ends with the
    in-process generator's tokens."""
    path, _ = v3_checkpoint
    prompts, length = PROMPTS[:8], 160  # long enough that the requests outlive the kill
    engine = Engine(load_model(path), cache_tokens=4096, max_batch=8)
    expected = [s.tokens for s in engine.generate([GenerationRequest(tuple(p), length) for p in prompts])]
    client = Client(cluster.gateway_endpoint, timeout=120)
    victim = cluster.names("expert")[0]

    def victim_tokens() -> float:
        return sum(counter(cluster.processes[victim].metrics_port, "moe_expert_tokens_total", "expert").values())

    def dispatch_failures() -> float:
        return sum(workers_counter(cluster, "moe_dispatch_failures_total", "reason").values())

    served_before, failures_before = victim_tokens(), dispatch_failures()
    outcome: dict = {}
    jobs = [dict(prompt_ids=p, max_new_tokens=length, ignore_eos=True) for p in prompts]
    worker = threading.Thread(target=lambda: outcome.setdefault("results", run_concurrently(client, jobs, 0.01)))
    worker.start()
    wait_until(lambda: victim_tokens() > served_before, timeout=60, what=f"{victim} to serve these requests")
    cluster.stop_process(victim, signal.SIGKILL)
    killed_mid_request = worker.is_alive()
    worker.join(timeout=180)
    assert killed_mid_request, "the requests finished before the kill; nothing was failed over"
    for result, tokens in zip(outcome["results"], expected):
        assert not isinstance(result, Exception), result
        assert result.tokens == tokens
    assert dispatch_failures() > failures_before
    cluster.start_process(victim)
    cluster.wait_serving(victim)


def test_all_replicas_of_a_shard_gone_fails_fast_naming_the_experts_then_recovers(cluster, reference):
    client = Client(cluster.gateway_endpoint, timeout=60)
    shard = cluster.processes[cluster.names("expert")[0]].shard
    replicas = [name for name in cluster.names("expert") if cluster.processes[name].shard == shard]
    for name in replicas:
        cluster.stop_process(name, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.generate(prompt_ids=PROMPTS[0], max_new_tokens=LENGTHS[0], ignore_eos=True, timeout=30)
    assert info.value.code == "UNAVAILABLE" and "expert" in info.value.message
    assert time.monotonic() - started < 30
    for name in replicas:
        cluster.start_process(name)
    for name in replicas:
        cluster.wait_serving(name)
    deadline = time.monotonic() + 60
    while True:  # the router republishes the plan within a poll period or two
        try:
            result = client.generate(prompt_ids=PROMPTS[0], max_new_tokens=LENGTHS[0], ignore_eos=True)
            break
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert result.tokens == reference[0][0]


def test_the_default_transport_takes_ucx_where_a_shard_offers_it_and_grpc_elsewhere(v3_checkpoint, reference, tmp_path):
    """`moe up`'s default (auto): shards listen on UCX where ucxx is installed and workers use it;
    a replica started without a UCX listener is still served over gRPC, with the same tokens."""
    from services.transport.ucx_transport import ucx_available

    if not ucx_available()[0]:
        pytest.skip(f"ucxx cannot be imported: {ucx_available()[1]}")
    path, _ = v3_checkpoint
    first, last = split_experts(ModelConfig.from_model_dir(path).n_routed_experts, 2)[1]
    plain = f"shard-{first}-{last}.r0"  # told to open no UCX listener (flags given last win)
    with LocalCluster(path, shards=2, replicas=1, attention_workers=1, dispatch_dtype="fp32", run_dir=tmp_path,
                      transport="auto", extra_args={plain: ["--ucx-port", "0"]}) as running:
        assert running.serves_ucx
        store, keys = redis_store.connect(running.redis_url, running.redis_password), redis_store.Keys(running.cluster)
        endpoints = {r.id: r.endpoints for r in redis_store.list_replicas(store, keys, "expert")}
        assert set(endpoints) == set(running.names("expert")) and "ucx" not in endpoints[plain], endpoints
        assert all("ucx" in e for name, e in endpoints.items() if name != plain), endpoints
        results = run_concurrently(Client(running.gateway_endpoint, timeout=120), greedy_jobs()[:4])
        sent = workers_counter(running, "moe_dispatch_bytes_total", "transport", direction="dispatch")
    for result, (tokens, logprobs) in zip(results, reference):
        assert not isinstance(result, Exception), result
        assert result.tokens == tokens
        assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) <= 1e-4
    assert sent.get("ucx", 0) > 0 and sent.get("grpc", 0) > 0, sent


def thread_cpus(pid: int) -> dict[int, list[int]]:
    """The CPUs each thread of process `pid` may run on (threads that end meanwhile left out)."""
    cpus = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus[int(tid)] = sorted(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            continue
    return cpus


def test_a_worker_with_local_experts_computes_them_itself_with_the_same_tokens(v3_checkpoint, reference, tmp_path):
    """`--local-experts` naming the first shard's experts: the worker computes them from its own
    copy, that shard gets no token, the other shard serves the rest, the tokens and logprobs are
    the in-process generator's, and the local experts' tokens reach the load statistics. The
    cluster is pinned (`pin_cpus`, the layout `cluster_bench.py --pin-cpus` measures): every
    thread of each shard and of the worker runs on the CPUs dealt to it, shards first."""
    path, _ = v3_checkpoint
    cfg = ModelConfig.from_model_dir(path)
    first, last = split_experts(cfg.n_routed_experts, 2)[0]
    with LocalCluster(path, shards=2, replicas=1, attention_workers=1, transport="grpc", dispatch_dtype="fp32",
                      run_dir=tmp_path, extra_args={"attention": ["--local-experts", f"{first}-{last}"]},
                      pin_cpus=True) as running:
        results = run_concurrently(Client(running.gateway_endpoint, timeout=120), greedy_jobs())
        # after serving: the threads started for requests (gRPC, UCX, torch) are pinned too
        pinned = {name: thread_cpus(running.processes[name].current_pid())
                  for name in running.names("expert") + running.names("attention")}
        served = {name: sum(counter(running.processes[name].metrics_port, "moe_expert_tokens_total", "expert").values())
                  for name in running.names("expert")}
        worker_metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{running.processes['attention-0'].metrics_port}/metrics", timeout=5).read().decode()
        local_tokens = sum(float(line.rsplit(" ", 1)[1]) for line in worker_metrics.splitlines()
                           if line.startswith("moe_attention_local_expert_tokens_total "))
        store, keys = redis_store.connect(running.redis_url, running.redis_password), redis_store.Keys(running.cluster)

        def local_load() -> int:  # over the last three load windows: the requests may span two
            now = redis_store.window_start()
            windows = [now - k * redis_store.LOAD_WINDOW_S for k in range(3)]
            return sum(n for w in windows for (_, expert), n in redis_store.read_load(store, keys, w, cfg.moe_layers).items()
                       if first <= expert <= last)

        deadline = time.monotonic() + 10.0
        while local_load() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        recorded = local_load()
    for result, (tokens, logprobs) in zip(results, reference):
        assert not isinstance(result, Exception), result
        assert result.tokens == tokens
        assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs)) <= 1e-4
    assert served[f"shard-{first}-{last}.r0"] == 0 and local_tokens > 0, (served, local_tokens)
    assert all(n > 0 for name, n in served.items() if name != f"shard-{first}-{last}.r0"), served
    assert recorded > 0
    dealt = deal_cpus(available_cpus(), 3)
    for name, cpus in zip(pinned, dealt):
        assert all(allowed == cpus for allowed in pinned[name].values()), (name, cpus, pinned[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the cluster on a GPU)")
def test_a_cluster_on_a_gpu_over_ucx_gives_the_in_process_tokens_there(v3_checkpoint, tmp_path):
    """Workers and shards on the GPU, expert traffic over UCX from GPU memory to GPU memory:
    sixteen concurrent streams give the greedy tokens of the in-process generator on that GPU."""
    from services.transport.ucx_transport import ucx_available

    if not ucx_available()[0]:
        pytest.skip(f"ucxx cannot be imported: {ucx_available()[1]}")
    path, _ = v3_checkpoint
    engine = Engine(load_model(path, device="cuda"), cache_tokens=4096, max_batch=16, cuda_graphs=False)
    want = engine.generate([GenerationRequest(tuple(p), n) for p, n in zip(PROMPTS, LENGTHS)])
    with LocalCluster(path, shards=2, replicas=1, attention_workers=1, transport="ucx", dispatch_dtype="fp32",
                      device="cuda", run_dir=tmp_path) as running:
        results = run_concurrently(Client(running.gateway_endpoint, timeout=120), greedy_jobs())
    for result, seq in zip(results, want):
        assert not isinstance(result, Exception), result
        assert result.tokens == seq.tokens
        assert max(abs(a - b) for a, b in zip(result.logprobs, seq.logprobs)) <= 1e-4

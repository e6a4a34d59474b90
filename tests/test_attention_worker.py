"""An attention worker's own Generate contract, called directly (no gateway in between): KV-cache
admission, cancellation and deadlines freeing the cache at once, and the cap on calls served at
once. The worker runs in a real local cluster with a deliberately small cache (192 tokens; the model's context is 256)."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.client import build_request
from services.launcher.cluster import LocalCluster

pytestmark = pytest.mark.cluster

CACHE_TOKENS = 192
MAX_STREAMS = 6


class Worker:
    def __init__(self, stub: inference_pb2_grpc.InferenceStub, metrics_port: int):
        self.stub, self.metrics_port = stub, metrics_port

    def __getattr__(self, name: str):
        return getattr(self.stub, name)

    def counters(self) -> dict[str, float]:
        """Requests by outcome, and "tokens": every token the worker generated."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {"tokens": 0.0}
        for line in text.splitlines():
            if line.startswith("moe_attention_requests_total{"):
                out[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("moe_attention_generated_tokens_total "):
                out["tokens"] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def worker(v3_checkpoint, tmp_path_factory):
    """The cluster's one attention worker: its Inference stub and its metrics."""
    path, _ = v3_checkpoint
    with LocalCluster(
        path, shards=1, replicas=1, attention_workers=1, planes=1, transport="grpc", dispatch_dtype="fp32",
        run_dir=tmp_path_factory.mktemp("worker"),
        extra_args={"attention": ["--kv-cache-tokens", str(CACHE_TOKENS), "--max-streams", str(MAX_STREAMS)]},
    ) as cluster:
        channel = grpc.insecure_channel(cluster.worker_endpoints()[0])
        yield Worker(inference_pb2_grpc.InferenceStub(channel), cluster.processes["attention-0"].metrics_port)
        channel.close()


def request(prompt_len: int, max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return build_request(prompt_ids=[(5 * i) % 200 + 1 for i in range(prompt_len)],
                         max_new_tokens=max_new_tokens, ignore_eos=True)


def kv_used_settles_to_zero(stub, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=5).kv_cache_used_tokens == 0:
            return True
        time.sleep(0.05)
    return False


def tokens_of(call) -> tuple[int, inference_pb2.Final]:
    tokens, final = 0, None
    for message in call:
        if message.WhichOneof("event") == "token":
            tokens += 1
        elif message.WhichOneof("event") == "final":
            final = message.final
    return tokens, final


def test_a_request_larger_than_the_whole_cache_is_refused_at_once(worker):
    with pytest.raises(grpc.RpcError) as err:
        tokens_of(worker.Generate(request(8, 200), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"holds {CACHE_TOKENS}" in err.value.details()


def test_requests_that_fit_only_one_at_a_time_wait_their_turn_and_all_complete(worker):
    # each needs 108 of the 192 tokens: two cannot be resident together
    calls = [worker.Generate(request(8, 100), timeout=120) for _ in range(3)]
    assert [tokens_of(call)[0] for call in calls] == [100, 100, 100]
    assert kv_used_settles_to_zero(worker)


def test_a_cancelled_stream_frees_its_cache_at_once(worker):
    before = worker.counters()
    call = worker.Generate(request(4, 180), timeout=120)
    next(call)  # admitted and decoding
    assert worker.GetLoad(inference_pb2.GetLoadRequest(), timeout=5).kv_cache_used_tokens > 0
    call.cancel()
    assert kv_used_settles_to_zero(worker)
    after = worker.counters()
    # dropped, not decoded to its end with nobody listening
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("ok", 0) == before.get("ok", 0)
    assert after["tokens"] - before["tokens"] < 180
    # the whole cache is free again: a request needing nearly all of it is served
    assert tokens_of(worker.Generate(request(4, 180), timeout=120))[0] == 180


def test_a_deadline_passing_mid_stream_ends_the_call_and_frees_its_cache(worker):
    before = worker.counters()
    call = worker.Generate(request(4, 180), timeout=0.3)
    with pytest.raises(grpc.RpcError) as err:
        tokens_of(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert kv_used_settles_to_zero(worker)
    after = worker.counters()
    assert after.get("ok", 0) == before.get("ok", 0)
    assert after["tokens"] - before["tokens"] < 180


def test_calls_past_max_streams_are_refused_not_left_waiting_while_load_polls_are_answered(worker):
    # the cache admits one such request at a time, so the first calls stay open while more arrive
    outcomes: list = []
    lock = threading.Lock()

    def one() -> None:
        try:
            result = tokens_of(worker.Generate(request(4, 100), timeout=180))[0]
        except grpc.RpcError as err:
            result = err.code()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(MAX_STREAMS + 3)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    # the streams are at their cap: a load poll is still answered
    assert worker.GetLoad(inference_pb2.GetLoadRequest(), timeout=5).queued_sequences >= 1
    for thread in threads:
        thread.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    refused = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if o == 100]
    assert len(refused) + len(served) == len(outcomes), outcomes
    # a served stream lasts ~100 steps, far longer than the calls take to arrive
    assert len(served) >= MAX_STREAMS and len(refused) >= 1, outcomes
    assert kv_used_settles_to_zero(worker)

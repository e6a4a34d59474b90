"""An attention worker's own contracts, called directly (no gateway in between): Generate's
KV-cache admission, cancellation and deadlines freeing the cache at once, the cap on requests
served at once, and the InferenceSession stream the gateway multiplexes requests on. The worker
runs in a real local cluster with a deliberately small cache (192 tokens; the model's context
is 256)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.client import build_request
from services.launcher.cluster import REPO_ROOT as ROOT, LocalCluster
from support import wait_until

pytestmark = pytest.mark.cluster

CACHE_TOKENS = 192
MAX_STREAMS = 6


class Worker:
    def __init__(self, channel: grpc.Channel, metrics_port: int):
        self.stub, self.metrics_port = inference_pb2_grpc.InferenceStub(channel), metrics_port
        self.sessions = inference_pb2_grpc.InferenceSessionStub(channel)

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
        yield Worker(channel, cluster.processes["attention-0"].metrics_port)
        channel.close()


def request(prompt_len: int, max_new_tokens: int) -> inference_pb2.GenerateRequest:
    return build_request(prompt_ids=[(5 * i) % 200 + 1 for i in range(prompt_len)],
                         max_new_tokens=max_new_tokens, ignore_eos=True)


def kv_used_settles_to_zero(stub, within_s: float = 10.0) -> bool:
    return wait_until(lambda: stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=5).kv_cache_used_tokens == 0,
                      within_s, "the KV cache to be free", interval=0.05)


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


def test_load_names_the_plan_version_the_worker_dispatches_by(worker):
    # the local cluster was ready only once the worker held the router's complete plan
    assert worker.GetLoad(inference_pb2.GetLoadRequest(), timeout=5).plan_version >= 1


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


# ---- InferenceSession: many requests on one stream ---------------------------------------

class Session:
    """A client of one InferenceSession.Open call, sending from a queue."""

    def __init__(self, worker: Worker, timeout: float = 120):
        self.requests: queue.Queue = queue.Queue()
        self.call = worker.sessions.Open(iter(self.requests.get, None), timeout=timeout)

    def start(self, stream: int, req: inference_pb2.GenerateRequest, timeout_s: float = 0.0) -> None:
        self.requests.put(inference_pb2.SessionRequest(stream=stream, start=req, timeout_s=timeout_s))

    def cancel(self, stream: int) -> None:
        self.requests.put(inference_pb2.SessionRequest(stream=stream, cancel=True))

    def close(self) -> None:
        self.requests.put(None)  # half-close: the worker ends the call once its streams have

    def collect(self, until_done: set[int]) -> tuple[dict[int, list], list[set[int]]]:
        """Events per stream until every stream in `until_done` got its final or error; and
        which streams each message carried."""
        events: dict[int, list] = {}
        carried: list[set[int]] = []
        for message in self.call:
            carried.append({e.stream for e in message.events})
            for e in message.events:
                events.setdefault(e.stream, []).append(e.response)
                if e.response.WhichOneof("event") in ("final", "error"):
                    until_done.discard(e.stream)
            if not until_done:
                break
        return events, carried


def tokens(responses: list) -> list[int]:
    return [r.token.id for r in responses if r.WhichOneof("event") == "token"]


def test_a_session_serves_many_requests_with_generates_tokens_and_one_message_per_step(worker):
    prompts = [[(11 * i + j) % 150 + 1 for j in range(3 + i)] for i in range(4)]
    alone = [tokens_of_generate(worker, p, 12) for p in prompts]
    session = Session(worker)
    for stream, prompt in enumerate(prompts, start=7):
        session.start(stream, build_request(prompt_ids=prompt, max_new_tokens=12, ignore_eos=True,
                                            request_id=f"r{stream}"))
    events, carried = session.collect({7, 8, 9, 10})
    session.close()
    assert [tokens(events[s]) for s in (7, 8, 9, 10)] == alone
    for s in (7, 8, 9, 10):
        assert {r.request_id for r in events[s]} == {f"r{s}"}
        assert events[s][-1].WhichOneof("event") == "final"
        assert events[s][-1].final.usage.generated_tokens == 12
    assert max(len(streams) for streams in carried) >= 2  # one step's tokens of several streams, together
    assert list(session.call) == []  # half-closed with nothing open: the worker ends the call
    assert kv_used_settles_to_zero(worker)


def tokens_of_generate(worker: Worker, prompt: list[int], n: int) -> list[int]:
    call = worker.Generate(build_request(prompt_ids=prompt, max_new_tokens=n, ignore_eos=True), timeout=60)
    return [m.token.id for m in call if m.WhichOneof("event") == "token"]


@pytest.mark.parametrize("start, code, fragment", [
    (dict(prompt_ids=[1, 99999], max_new_tokens=4, request_id="bad"), "INVALID_ARGUMENT", "vocab"),
    (dict(prompt_ids=[1, 2], max_new_tokens=4), "INVALID_ARGUMENT", "request_id"),
    (dict(prompt_ids=[1, 2], max_new_tokens=200, request_id="big"), "RESOURCE_EXHAUSTED", "KV-cache"),
])
def test_a_bad_start_fails_only_its_own_stream(worker, start, code, fragment):
    session = Session(worker)
    session.start(1, build_request(prompt_ids=[3, 4, 5], max_new_tokens=20, ignore_eos=True, request_id="good"))
    session.start(2, build_request(**start))
    events, _ = session.collect({1, 2})
    session.close()
    assert [r.WhichOneof("event") for r in events[2]] == ["error"]
    assert events[2][0].error.code == code and fragment in events[2][0].error.message
    assert len(tokens(events[1])) == 20 and events[1][-1].WhichOneof("event") == "final"


def test_a_stream_number_already_open_is_refused_and_the_open_one_goes_on(worker):
    session = Session(worker)
    session.start(5, build_request(prompt_ids=[3, 4], max_new_tokens=30, ignore_eos=True, request_id="first"))
    session.start(5, build_request(prompt_ids=[6, 7], max_new_tokens=4, ignore_eos=True, request_id="second"))
    events, _ = session.collect({5})
    error = next(r for r in events[5] if r.WhichOneof("event") == "error")
    assert error.error.code == "INVALID_ARGUMENT" and "already open" in error.error.message
    session.close()
    rest = [r for batch in session.call for e in batch.events for r in [e.response]]
    assert len(tokens(events[5] + rest)) == 30 and rest[-1].WhichOneof("event") == "final"


def test_cancelling_one_stream_frees_its_cache_and_the_others_complete(worker):
    before = worker.counters()
    session = Session(worker)
    session.start(1, build_request(prompt_ids=[3, 4], max_new_tokens=170, ignore_eos=True, request_id="long"))
    messages = iter(session.call)
    while not any(e.stream == 1 for e in next(messages).events):
        pass
    session.cancel(1)
    session.start(2, build_request(prompt_ids=[5, 6], max_new_tokens=10, ignore_eos=True, request_id="after"))
    seen: dict[int, list] = {}
    for message in messages:
        for e in message.events:
            seen.setdefault(e.stream, []).append(e.response)
        if seen.get(2) and seen[2][-1].WhichOneof("event") == "final":
            break
    session.close()
    # a token already on its way may follow the cancel, then nothing: no final, no error
    assert all(r.WhichOneof("event") == "token" for r in seen.get(1, []))
    assert len(tokens(seen[2])) == 10
    assert kv_used_settles_to_zero(worker)
    after = worker.counters()
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after["tokens"] - before["tokens"] < 170


def test_a_session_call_that_ends_with_streams_open_frees_their_caches(worker):
    before = worker.counters()
    session = Session(worker)
    for stream in (1, 2):
        session.start(stream, build_request(prompt_ids=[3, stream], max_new_tokens=80, ignore_eos=True,
                                            request_id=f"s{stream}"))
    next(iter(session.call))
    session.call.cancel()  # the gateway went away
    assert kv_used_settles_to_zero(worker)
    after = worker.counters()
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 2
    assert after.get("ok", 0) == before.get("ok", 0)


def test_a_session_streams_deadline_ends_it_deadline_exceeded(worker):
    session = Session(worker)
    session.start(1, build_request(prompt_ids=[3, 4], max_new_tokens=180, ignore_eos=True, request_id="late"),
                  timeout_s=0.3)
    events, _ = session.collect({1})
    session.close()
    assert events[1][-1].WhichOneof("event") == "error"
    assert events[1][-1].error.code == "DEADLINE_EXCEEDED"
    assert len(tokens(events[1])) < 180
    assert kv_used_settles_to_zero(worker)


@pytest.mark.parametrize("spec, fragment", [("40-50", "outside [0, 8)"), ("3-x", "'3-x' is not an id")])
def test_bad_local_experts_are_refused_in_one_line_before_loading(v3_checkpoint, spec, fragment):
    path, _ = v3_checkpoint
    done = subprocess.run([sys.executable, "-m", "services.attention", "--model", str(path), "--local-experts", spec,
                           "--redis-url", "redis://127.0.0.1:9/0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and fragment in done.stderr, done.stderr

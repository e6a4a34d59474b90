"""Gateway: least-loaded choice (pure) and the Generate proxy against fake workers."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from fake_workers import FakeWorker
from moe.v1 import inference_pb2_grpc
from services.client import Client, ClientError, build_request
from services.gateway.api_keys import REFUSAL, ApiKeyError, bearer_key, key_matches, read_keys
from services.gateway.balancer import Balancer, WorkerInfo
from support import wait_until

W = [WorkerInfo(f"w{i}", f"127.0.0.1:{1000 + i}") for i in range(3)]


# ---- balancer (pure) --------------------------------------------------------------------

def test_ties_are_broken_round_robin_so_a_burst_spreads_evenly():
    balancer = Balancer()
    balancer.update_workers(W)
    leases = [balancer.acquire() for _ in range(6)]
    assert sorted(lease.worker.id for lease in leases) == ["w0", "w0", "w1", "w1", "w2", "w2"]


def test_least_in_flight_wins_and_release_frees_the_slot():
    balancer = Balancer()
    balancer.update_workers(W[:2])
    a, b = balancer.acquire(), balancer.acquire()
    assert {a.worker.id, b.worker.id} == {"w0", "w1"}
    balancer.release(a)
    assert balancer.acquire().worker.id == a.worker.id


def test_reported_load_beyond_our_streams_counts():
    balancer = Balancer()
    balancer.update_workers(W[:2])
    balancer.report_load("w0", active=5, queued=2)  # another gateway keeps w0 busy
    assert [balancer.acquire().worker.id for _ in range(3)] == ["w1"] * 3
    # our own streams are not counted twice: w0 reports exactly what we sent it
    balancer2 = Balancer()
    balancer2.update_workers(W[:2])
    lease = balancer2.acquire()
    balancer2.report_load(lease.worker.id, active=1, queued=0)
    assert balancer2.workers()[int(lease.worker.id[1])].score == 1


def test_draining_and_excluded_workers_get_nothing_and_unreachable_ones_only_as_last_resort():
    balancer = Balancer()
    balancer.update_workers(W)
    balancer.report_load("w0", active=0, queued=0, accepting=False)
    balancer.report_unreachable("w1")
    assert {balancer.acquire().worker.id for _ in range(4)} == {"w2"}
    assert balancer.acquire(exclude={"w2"}).worker.id == "w1"
    assert balancer.acquire(exclude={"w1", "w2"}) is None


def test_worker_leaving_the_registry_keeps_its_streams_until_they_end():
    balancer = Balancer()
    balancer.update_workers(W[:2])
    lease = next(l for l in (balancer.acquire() for _ in range(2)) if l.worker.id == "w0")
    assert balancer.update_workers([W[1]]) == []          # w0 still has a stream open
    assert {balancer.acquire().worker.id for _ in range(3)} == {"w1"}
    assert balancer.release(lease) == W[0]                  # now idle and gone: close its channel
    assert [w.info.id for w in balancer.workers()] == ["w1"]


# ---- proxy against fake workers ---------------------------------------------------------

def _count(code: str) -> float:
    return REGISTRY.get_sample_value("moe_gateway_requests_total", {"code": code}) or 0.0



def test_generate_streams_through_with_request_id_and_deadline_kept(gateway):
    fake = FakeWorker(tokens=4)
    client, _ = gateway(fake)
    items = list(client.stream(prompt_ids=[1, 2, 3], max_new_tokens=4, request_id="req-42", timeout=7.0))
    assert [t.id for t in items[:-1]] == [10, 11, 12, 13]
    result = items[-1]
    assert result.tokens == [10, 11, 12, 13] and result.finish_reason == "length"
    assert result.request_id == "req-42" and result.usage["prompt_tokens"] == 3
    rid, timeout_s = fake.seen[0]
    assert rid == "req-42" and 5.0 < timeout_s <= 7.05  # gRPC's deadline arithmetic can add a few ms
    assert fake.opens == 1 and fake.calls == 1


def test_no_client_deadline_is_timeout_s_zero(gateway):
    fake = FakeWorker(tokens=1)
    client, _ = gateway(fake)
    client.timeout = None
    assert client.generate(prompt_ids=[1], max_new_tokens=1).tokens == [10]
    assert fake.seen[0][1] == 0.0


def test_unavailable_before_any_token_is_retried_once_on_another_worker(gateway):
    down, up = FakeWorker("unavailable"), FakeWorker(tokens=2)
    client, upstreams = gateway(down, up)
    for _ in range(2):  # whichever is picked first, both requests succeed
        assert client.generate(prompt_ids=[1], max_new_tokens=2).tokens == [10, 11]
    assert down.calls >= 1 and up.calls == 2


def test_retry_happens_only_once(gateway):
    client, _ = gateway(FakeWorker("unavailable"), FakeWorker("unavailable"), FakeWorker("unavailable"))
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=2)
    assert err.value.code == "UNAVAILABLE" and "worker is down" in err.value.message


def test_a_lone_worker_failing_before_any_token_is_named_with_its_message(gateway):
    client, _ = gateway(FakeWorker("unavailable"))
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=2)
    assert err.value.code == "UNAVAILABLE"
    assert err.value.message == "attention worker w0: worker is down; no other attention worker to retry on"


def test_worker_status_and_message_pass_through_unchanged(gateway):
    fake = FakeWorker("invalid")
    client, _ = gateway(fake, FakeWorker())
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[999], max_new_tokens=2)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.message == "prompt_ids: token 999 is outside the vocabulary"


def test_failure_after_tokens_is_not_retried(gateway):
    dying, healthy = FakeWorker("die-mid-stream"), FakeWorker()
    client, upstreams = gateway(dying, healthy)
    upstreams.balancer.report_load("w1", active=50, queued=0)  # make the dying worker the choice
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=3)
    assert err.value.code == "UNAVAILABLE" and healthy.calls == 0


def test_client_cancel_cancels_the_upstream_call(gateway):
    fake = FakeWorker(tokens=200, delay=0.02)
    client, upstreams = gateway(fake)
    cancelled_before = _count("CANCELLED")
    stream = client.stream(prompt_ids=[1], max_new_tokens=200)
    next(stream)
    stream.close()  # the application stops reading
    assert fake.cancelled.wait(5.0)  # the worker got a cancel for the stream before its last token
    assert fake.cancels == [1] and fake.opens == 1  # that stream alone; the session stays open
    deadline = time.monotonic() + 5.0
    while upstreams.balancer.in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstreams.balancer.in_flight() == 0
    wait_until(lambda: _count("CANCELLED") == cancelled_before + 1, what="the cancel counted")


def test_client_cancel_while_the_worker_is_silent_cancels_the_upstream_call(gateway):
    # the gateway's handler waits on the worker (no token in flight), not on its client
    fake = FakeWorker(tokens=3, hold=True)
    client, upstreams = gateway(fake)
    stream = client.stream(prompt_ids=[1], max_new_tokens=3)
    next(stream)
    stream.close()
    assert fake.cancelled.wait(5.0)
    wait_until(lambda: upstreams.balancer.in_flight() == 0, what="no call in flight")
    fake.gate.set()


def test_streams_past_max_streams_end_resource_exhausted_while_the_first_ones_run_to_the_end(gateway):
    fake = FakeWorker(tokens=3, hold=True)
    client, _ = gateway(fake, max_streams=2)
    first = [client.stream(prompt_ids=[1], max_new_tokens=3) for _ in range(2)]
    assert [next(stream).id for stream in first] == [10, 10]  # both streams are open at the gateway
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=3, timeout=5.0)  # waiting would end DEADLINE_EXCEEDED
    assert err.value.code == "RESOURCE_EXHAUSTED" and "--max-streams" in err.value.message
    assert fake.calls == 2  # the third call never reached a worker
    # at the cap, load polls and health checks (a pod's probes) are still answered
    assert client.load().active_sequences == 2
    with grpc.insecure_channel(client.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    fake.gate.set()
    for stream in first:
        result = list(stream)[-1]
        assert result.tokens == [10, 11, 12] and result.finish_reason == "length"


def test_a_client_that_stops_reading_is_stopped_past_max_unread_and_keeps_what_was_sent(gateway):
    fake = FakeWorker(tokens=1_000_000)
    client, upstreams = gateway(fake, max_unread=64)
    # a client whose receive window stays at HTTP/2's initial size, so the gateway's writes block soon
    with grpc.insecure_channel(client.endpoint, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            build_request(prompt_ids=[1], max_new_tokens=1_000_000), timeout=120)
        ids = [next(call).token.id]
        # the client reads nothing more: tokens pile up at the gateway until it stops the stream
        assert fake.cancelled.wait(60.0) and fake.cancels == [1]
        with pytest.raises(grpc.RpcError) as err:
            for message in call:
                ids.append(message.token.id)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "read too slowly" in err.value.details() and "--max-unread 64" in err.value.details()
    assert 64 < len(ids) < 1_000_000 and ids == list(range(10, 10 + len(ids)))  # in order, none dropped
    wait_until(lambda: upstreams.balancer.in_flight() == 0, what="no call in flight")
    stream = client.stream(prompt_ids=[1], max_new_tokens=3)  # the session serves on
    assert next(stream).id == 10
    stream.close()


def test_no_worker_is_unavailable_with_a_message(gateway):
    client, _ = gateway()
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code == "UNAVAILABLE" and "no attention worker" in err.value.message


def test_concurrent_streams_share_one_session_and_each_gets_its_own_tokens(gateway):
    fake = FakeWorker(tokens=4, hold=True, prompt_tokens=True)
    client, _ = gateway(fake)
    n = 8
    streams = [client.stream(prompt_ids=[i + 1], max_new_tokens=4) for i in range(n)]
    assert [next(stream).id for stream in streams] == [(i + 1) * 100 for i in range(n)]
    fake.gate.set()  # from now on every step of the fake carries an event of each running stream
    with futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda stream: list(stream)[-1], streams))
    for i, result in enumerate(results):
        assert result.tokens == [(i + 1) * 100 + k for k in range(4)] and result.finish_reason == "length"
    assert fake.opens == 1 and fake.calls == n
    assert max(fake.batches) == n  # one SessionEvents carried a step of all of them


@pytest.mark.parametrize("how, message", [("abort", "worker died"), ("return", "closed the session")])
def test_worker_ending_its_session_fails_its_streams_and_the_next_request_opens_a_new_one(gateway, how, message):
    fake = FakeWorker(tokens=3, hold=True)
    client, upstreams = gateway(fake)
    streams = [client.stream(prompt_ids=[1], max_new_tokens=3) for _ in range(3)]
    assert [next(stream).id for stream in streams] == [10, 10, 10]
    before = _count("UNAVAILABLE")
    fake.kill_how = how
    fake.kill.set()
    for stream in streams:
        with pytest.raises(ClientError) as err:
            list(stream)
        assert err.value.code == "UNAVAILABLE" and message in err.value.message
    wait_until(lambda: upstreams.balancer.in_flight() == 0, what="no call in flight")
    assert _count("UNAVAILABLE") == before + 3
    fake.gate.set()
    assert client.generate(prompt_ids=[1], max_new_tokens=3).tokens == [10, 11, 12]
    assert fake.opens == 2 and fake.cancels == []


def test_a_worker_leaving_the_registry_ends_its_session(gateway):
    fake = FakeWorker(tokens=1)
    client, upstreams = gateway(fake)
    assert client.generate(prompt_ids=[1], max_new_tokens=1).tokens == [10]
    assert fake.opens == 1 and not fake.ended.is_set()  # the session outlives the request
    upstreams.set_workers([])
    assert fake.ended.wait(5.0)


def test_a_worker_that_cannot_be_reached_is_retried_on_another(gateway):
    fake = FakeWorker(tokens=2)
    client, upstreams = gateway(fake)
    upstreams.set_workers([WorkerInfo("dead", "127.0.0.1:1"), *upstreams.balancer.registered()])
    retries = REGISTRY.get_sample_value("moe_gateway_retries_total") or 0.0
    for _ in range(3):  # the dead one's session fails to open: UNAVAILABLE before any token
        assert client.generate(prompt_ids=[1], max_new_tokens=2).tokens == [10, 11]
    assert fake.calls == 3 and fake.opens == 1
    assert (REGISTRY.get_sample_value("moe_gateway_retries_total") or 0.0) >= retries + 1


# ---- API keys -----------------------------------------------------------------------------

def test_with_api_keys_only_a_known_bearer_key_gets_through_and_every_refusal_reads_the_same(gateway):
    fake = FakeWorker(tokens=2)
    client, _ = gateway(fake, api_keys=[b"first-key", b"second-key"])
    refusals = []
    for key in (None, "", "wrong-key", "first-ke", "first-key-and-more"):
        caller = Client(client.endpoint, timeout=10, api_key=key or "")
        with pytest.raises(ClientError) as info:
            caller.generate(prompt_ids=[1], max_new_tokens=2)
        refusals.append((info.value.code, info.value.message))
        with pytest.raises(ClientError):
            caller.load()
        caller.close()
    assert set(refusals) == {("UNAUTHENTICATED", REFUSAL)}
    assert fake.calls == 0  # nothing reached a worker
    for key in ("first-key", "second-key"):
        with Client(client.endpoint, timeout=10, api_key=key) as caller:
            assert caller.generate(prompt_ids=[1], max_new_tokens=2).tokens == [10, 11]
    assert fake.calls == 2


def test_with_api_keys_health_checks_need_no_key(gateway):
    client, _ = gateway(FakeWorker(), api_keys=[b"k"])
    with grpc.insecure_channel(client.endpoint) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_bearer_header_is_read_exactly_and_the_key_file_refuses_to_be_empty(tmp_path):
    assert bearer_key([("authorization", "Bearer abc")]) == b"abc"
    assert bearer_key([("authorization", "bearer  abc ")]) == b"abc"
    assert bearer_key([("authorization", "Basic abc")]) is None
    assert bearer_key([("authorization", "Bearer ")]) is None
    assert bearer_key([("x-other", "Bearer abc")]) is None
    assert not key_matches(None, [b"abc"]) and not key_matches(b"", [b"abc"]) and key_matches(b"abc", [b"x", b"abc"])
    keys = tmp_path / "keys"
    keys.write_text("# operators\n\nalpha\n  beta  \n")
    assert read_keys(keys) == [b"alpha", b"beta"]
    keys.write_text("# nothing but a comment\n\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        read_keys(keys)
    with pytest.raises(ApiKeyError, match="cannot read the API key file"):
        read_keys(tmp_path / "missing")


def test_a_gateway_given_an_unusable_key_file_stops_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "services.gateway", "--api-key-file", str(tmp_path / "missing"),
                           "--redis-url", "redis://127.0.0.1:1/0", "--port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("gateway: cannot read the API key file") and done.stderr.count("\n") == 1

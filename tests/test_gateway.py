"""Gateway: least-loaded choice (pure), the Generate proxy against fake workers, client errors."""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from moe.v1 import inference_pb2, inference_pb2_grpc
from services.client import Client, ClientError, build_request
from services.common.server import Service
from services.gateway.__main__ import SERVICE_NAME
from services.gateway.balancer import Balancer, WorkerInfo
from services.gateway.servicer import GatewayServicer, Upstreams

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

class FakeWorker(inference_pb2_grpc.InferenceServicer):
    """A sync worker. `hold`: after its first token each stream waits until `gate` is set."""

    def __init__(self, mode: str = "ok", tokens: int = 3, delay: float = 0.0, hold: bool = False):
        self.mode, self.tokens, self.delay = mode, tokens, delay
        self.calls = 0
        self.seen: list[tuple[str, float | None]] = []
        self.cancelled = threading.Event()  # a stream ended before its last message was taken
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def GetLoad(self, request, context):
        return inference_pb2.WorkerLoad(replica_id="fake", accepting=True, max_batch=8)

    def Generate(self, request, context):
        self.calls += 1
        self.seen.append((request.request_id, context.time_remaining()))
        finished = threading.Event()
        context.add_callback(lambda: None if finished.is_set() else self.cancelled.set())
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is down")
        if self.mode == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids: token 999 is outside the vocabulary")
        for i in range(self.tokens):
            if self.delay:
                time.sleep(self.delay)
            yield inference_pb2.GenerateResponse(request_id=request.request_id,
                                                 token=inference_pb2.TokenChunk(id=10 + i, logprob=-1.0, index=i))
            if self.mode == "die-mid-stream":
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
            self.gate.wait(10.0)
        yield inference_pb2.GenerateResponse(request_id=request.request_id, final=inference_pb2.Final(
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=len(request.prompt_ids.ids), generated_tokens=self.tokens)))
        finished.set()  # the server asked for the message after the last one: the stream ran to its end


def _serve(servicer, add):
    server = grpc.server(futures.ThreadPoolExecutor(8))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def gateway():
    """make(*fakes, max_streams=16) -> (client, upstreams): sync fake workers, and the gateway
    served as in production (grpc.aio Service on a free loopback port); no Redis."""
    servers, made, services = [], [], []

    def make(*fakes, max_streams=16):
        workers = []
        for i, fake in enumerate(fakes):
            server, endpoint = _serve(fake, inference_pb2_grpc.add_InferenceServicer_to_server)
            servers.append(server)
            workers.append(WorkerInfo(f"w{i}", endpoint))
        upstreams = Upstreams(None, None)
        upstreams.set_workers(workers)
        args = argparse.Namespace(host="127.0.0.1", port=0, metrics_port=0)
        service = Service("gateway", args, [SERVICE_NAME], grace_s=1.0, asynchronous=True)
        inference_pb2_grpc.add_InferenceServicer_to_server(GatewayServicer(upstreams, max_streams=max_streams),
                                                           service.server)
        services.append(service)
        client = Client(f"127.0.0.1:{service.start()}", timeout=10)
        made.append((client, upstreams))
        return client, upstreams

    yield make
    for client, upstreams in made:
        client.close()
        upstreams.close()
    for service in services:
        service.shutdown()
    for server in servers:
        server.stop(0)


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("moe_gateway_requests_total", {"code": code}) or 0.0


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_generate_streams_through_with_request_id_and_deadline_kept(gateway):
    fake = FakeWorker(tokens=4)
    client, _ = gateway(fake)
    items = list(client.stream(prompt_ids=[1, 2, 3], max_new_tokens=4, request_id="req-42", timeout=7.0))
    assert [t.id for t in items[:-1]] == [10, 11, 12, 13]
    result = items[-1]
    assert result.tokens == [10, 11, 12, 13] and result.finish_reason == "length"
    assert result.request_id == "req-42" and result.usage["prompt_tokens"] == 3
    rid, remaining = fake.seen[0]
    assert rid == "req-42" and remaining is not None and 5.0 < remaining <= 7.0


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
    assert fake.cancelled.wait(5.0)  # the worker's call ended before its last token: cancelled
    deadline = time.monotonic() + 5.0
    while upstreams.balancer.in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstreams.balancer.in_flight() == 0
    assert _wait_for(lambda: _count("CANCELLED") == cancelled_before + 1)


def test_client_cancel_while_the_worker_is_silent_cancels_the_upstream_call(gateway):
    # the gateway's handler waits on the worker (no token in flight), not on its client
    fake = FakeWorker(tokens=3, hold=True)
    client, upstreams = gateway(fake)
    stream = client.stream(prompt_ids=[1], max_new_tokens=3)
    next(stream)
    stream.close()
    assert fake.cancelled.wait(5.0)
    assert _wait_for(lambda: upstreams.balancer.in_flight() == 0)
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


def test_no_worker_is_unavailable_with_a_message(gateway):
    client, _ = gateway()
    with pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code == "UNAVAILABLE" and "no attention worker" in err.value.message


# ---- client -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt_ids=[1], max_new_tokens=-3), "max_new_tokens must be >= 1, got -3"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt_ids=[-1], max_new_tokens=2), "prompt_ids must be in"),
    (dict(prompt_ids=[1], max_new_tokens=2, seed=-5), "seed must be in"),
    (dict(max_new_tokens=2), "exactly one of prompt_ids or text"),
])
def test_client_rejects_values_the_wire_cannot_carry(kwargs, fragment):
    with pytest.raises(ClientError) as err:
        build_request(**kwargs)
    assert err.value.code == "INVALID_ARGUMENT" and fragment in err.value.message


def test_unreachable_endpoint_is_a_client_error_not_a_grpc_exception():
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 1, got -2"),
        (["--timeout", "-1"], "--timeout must be > 0 seconds, got -1.0"),
        (["--device", "cuda"], "--device applies to --model only; a cluster's workers choose their own"),
        (["--dtype", "bfloat16"], "--dtype applies to --model only; a cluster's workers choose their own"),
    ],
)
def test_generate_cli_reports_bad_input_in_one_line_and_exit_2(capsys, argv, message):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1:1", "--prompt-ids", "1,2", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"moe generate: {message}"


def test_generate_cli_wants_a_port_rather_than_grpcs_default_443(capsys):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1", "--prompt-ids", "1"]) == 2
    assert capsys.readouterr().err.strip() == "moe generate: --endpoint must be HOST:PORT, got '127.0.0.1'"


def test_generate_cli_tells_an_outage_from_bad_input_by_exit_status(capsys):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1:1", "--prompt-ids", "1", "--timeout", "2"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("moe generate: UNAVAILABLE: ") and "\n" not in line

"""services/common: Redis poller, registry, load recorder, tensor codec, error interceptor, bootstrap."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
import torch

from model.errors import InputError
from services.common import errors, healthcheck, redis_store, settings, tensors
from services.common.plan import Plan, PlanReplica
from services.common.ports import free_port
from services.common.redis_poller import REDIS_ERRORS, RedisPoller
from services.common.redis_server import RedisServer
from services.common.server import Service
from support import wait_until


@pytest.fixture
def store(redis_server, request):
    client = redis_store.connect(redis_server.url, timeout_s=0.5)
    keys = redis_store.Keys(f"t{abs(hash(request.node.name)) % 10**8}")
    yield client, keys
    client.close()


def expert_record(rid: str = "e0", experts=(0, 1)) -> redis_store.ReplicaRecord:
    return redis_store.ReplicaRecord(kind="expert", id=rid, endpoints={"grpc": "127.0.0.1:1"},
                                     experts=list(experts), shard="shard-0-1")


# ---- redis poller -------------------------------------------------------------------------

def test_redis_poller_logs_an_outage_once_each_way_and_counts_every_failed_call(caplog):
    down = threading.Event()
    down.set()
    failures, successes = [], []

    def poll():
        with poller.attempt():
            if down.is_set():
                failures.append(1)
                raise redis.ConnectionError("connection refused")
            successes.append(1)

    poller = RedisPoller("test-outage", poll, interval_s=0.01, while_down="testing")
    counted_before = REDIS_ERRORS.labels("test-outage")._value.get()
    caplog.set_level(logging.INFO, logger="moe.redis")
    poller.start(immediately=True)
    try:
        wait_until(lambda: len(failures) >= 5, what="several failed polls")
        assert poller.outage
        down.clear()
        wait_until(lambda: len(successes) >= 3, what="polls after recovery")
        assert not poller.outage
    finally:
        poller.close()
    lines = [r for r in caplog.records if r.name == "moe.redis"]
    assert [r.getMessage() for r in lines] == ["redis unreachable", "redis reachable again"]
    assert lines[0].kv["loop"] == "test-outage" and lines[0].kv["meanwhile"] == "testing"
    assert lines[0].kv["error"] == "connection refused" and lines[1].kv["loop"] == "test-outage"
    assert REDIS_ERRORS.labels("test-outage")._value.get() - counted_before == len(failures)


def test_redis_poller_outlives_a_bug_in_its_poll_and_stops_at_once_on_close(caplog):
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug")

    poller = RedisPoller("test-bug", poll, interval_s=0.01, while_down="testing")
    caplog.set_level(logging.INFO, logger="moe.redis")
    poller.start(immediately=True)
    wait_until(lambda: len(calls) >= 3, what="polls after the failing one")
    poller.close()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["poll failed"]
    assert not poller.outage  # a bug is not a Redis outage

    idle = RedisPoller("test-close", lambda: None, interval_s=60, while_down="testing").start()
    started = time.monotonic()
    idle.close()
    assert time.monotonic() - started < 1.0
    assert "test-close" not in [t.name for t in threading.enumerate()]


# ---- registry ---------------------------------------------------------------------------

def test_registry_record_lives_while_heartbeat_runs_and_expires_after_it_stops(store):
    client, keys = store
    registry = redis_store.Registry(client, keys, expert_record(), ttl_s=0.6, interval_s=0.1).start()
    try:
        listed = redis_store.list_replicas(client, keys, "expert")
        assert [r.id for r in listed] == ["e0"] and listed[0].experts == [0, 1]
        time.sleep(1.0)  # longer than the TTL: only the heartbeat keeps it alive
        assert [r.id for r in redis_store.list_replicas(client, keys)] == ["e0"]
    finally:
        registry.stop()
    wait_until(lambda: not redis_store.list_replicas(client, keys), timeout=3, what="record expiry")


def test_deregister_deletes_record_at_once(store):
    client, keys = store
    registry = redis_store.Registry(client, keys, expert_record(), ttl_s=30, interval_s=5).start()
    registry.deregister()
    assert redis_store.list_replicas(client, keys) == []


def test_a_restarted_replica_replaces_the_record_its_dead_predecessor_left(store):
    client, keys = store
    dead = expert_record()
    dead.endpoints = {"grpc": "127.0.0.1:1111", "ucx": "127.0.0.1:2222"}
    client.set(keys.replica("expert", dead.id), dead.to_json(), px=30_000)  # killed, never deregistered
    successor = expert_record()
    successor.endpoints = {"grpc": "127.0.0.1:1111", "ucx": "127.0.0.1:3333"}
    registry = redis_store.Registry(client, keys, successor, ttl_s=30, interval_s=5).start()
    try:
        (live,) = redis_store.list_replicas(client, keys)
        assert live.endpoints["ucx"] == "127.0.0.1:3333" and live.pid == successor.pid
    finally:
        registry.stop()


def test_draining_mark_written_by_router_survives_heartbeats(store):
    client, keys = store
    registry = redis_store.Registry(client, keys, expert_record(), ttl_s=5, interval_s=5).start()
    try:
        assert redis_store.set_replica_state(client, keys, "expert", "e0", redis_store.DRAINING)
        assert registry.heartbeat()
        assert redis_store.list_replicas(client, keys)[0].state == redis_store.DRAINING
        assert client.pttl(keys.replica("expert", "e0")) > 4000
        assert not redis_store.set_replica_state(client, keys, "expert", "nope", redis_store.DRAINING)
    finally:
        registry.deregister()


def test_heartbeat_reregisters_after_redis_restart_and_logs_outage_once(caplog):
    server = RedisServer().start()
    client = redis_store.connect(server.url, timeout_s=0.3)
    keys = redis_store.Keys("restart")
    registry = redis_store.Registry(client, keys, expert_record(), ttl_s=2, interval_s=0.05).start()
    try:
        assert redis_store.list_replicas(client, keys)
        caplog.set_level(logging.INFO, logger="moe.redis")
        server.stop()
        wait_until(lambda: registry.poller.outage, what="outage detected")
        beats_failed_from = time.monotonic()
        wait_until(lambda: time.monotonic() - beats_failed_from > 0.4, what="several failed beats")
        server.start()  # same port, empty data
        wait_until(lambda: redis_store.list_replicas(client, keys), what="re-registration")
        messages = [r.getMessage() for r in caplog.records if r.name == "moe.redis"]
        assert messages.count("redis unreachable") == 1
        assert messages.count("redis reachable again") == 1
    finally:
        registry.stop()
        client.close()
        server.stop()


def test_keys_carry_cluster_prefix():
    keys = redis_store.Keys("blue")
    assert keys.replica("expert", "a") == "blue:replica:expert:a"
    assert keys.plan(3) == "blue:plan:3" and keys.plan_version == "blue:plan:version"
    assert keys.load(1700000000, 2) == "blue:load:1700000000:2"
    with pytest.raises(ValueError):
        redis_store.Keys("a:b")


def test_plan_write_read_and_announce(store):
    client, keys = store
    pubsub = client.pubsub()
    pubsub.subscribe(keys.plan_channel)
    wait_until(lambda: pubsub.get_message(timeout=0.1), what="subscribe ack")
    plan = Plan(version=1, n_routed_experts=2, layers={1: [["a"], []]},
                replicas={"a": PlanReplica("a", "h:1", "", 0, "s")}, missing=[(1, 1)], created_unix_ms=5)
    redis_store.write_plan(client, keys, 1, plan.to_json())
    version, payload = redis_store.read_plan(client, keys)
    assert version == 1 and Plan.from_json(payload) == plan
    msg = wait_until(lambda: pubsub.get_message(timeout=0.1), what="plan announcement")
    assert msg["data"] == "1"
    pubsub.close()


# ---- load recorder -----------------------------------------------------------------------

def test_load_recorder_flushes_counts_into_window_hashes(store):
    client, keys = store
    recorder = redis_store.LoadRecorder(client, keys, flush_interval_s=0.05)
    now = 1_700_000_003.0
    recorder.add(1, {0: 3, 5: 2}, now=now)
    recorder.add(1, [1, 0, 0, 0, 0, 4], now=now)
    recorder.add(2, {7: 1}, now=now)
    assert recorder.flush(now=now)
    window = redis_store.window_start(now)
    assert window == 1_700_000_000
    assert redis_store.read_load(client, keys, window, [1, 2]) == {(1, 0): 4, (1, 5): 6, (2, 7): 1}
    assert 0 < client.ttl(keys.load(window, 1)) <= redis_store.LOAD_EXPIRE_S


def test_load_recorder_keeps_counting_through_outage_and_flushes_later():
    server = RedisServer().start()
    client = redis_store.connect(server.url, timeout_s=0.3)
    keys = redis_store.Keys("loadout")
    recorder = redis_store.LoadRecorder(client, keys, flush_interval_s=0.05).start()
    try:
        server.stop()
        recorder.add(3, {1: 10})
        wait_until(lambda: recorder.poller.outage, what="failed flush")
        recorder.add(3, {1: 5})
        assert recorder.pending_tokens() == 15
        server.start()
        wait_until(lambda: not recorder.poller.outage and recorder.pending_tokens() == 0, what="late flush")
        window = redis_store.window_start()
        got = redis_store.read_load(client, keys, window, [3]) or redis_store.read_load(client, keys, window - 10, [3])
        assert got == {(3, 1): 15}
    finally:
        recorder.stop(flush=False)
        client.close()
        server.stop()


def test_load_recorder_drops_counts_older_than_key_expiry():
    client = redis_store.connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nothing listens
    recorder = redis_store.LoadRecorder(client, redis_store.Keys("drop"), expire_s=60)
    before = redis_store.LOAD_DROPPED._value.get()
    recorder.add(1, {0: 7}, now=1000.0)
    assert not recorder.flush(now=1000.0)
    assert recorder.pending_tokens() == 7
    assert not recorder.flush(now=2000.0)
    assert recorder.pending_tokens() == 0
    assert redis_store.LOAD_DROPPED._value.get() - before == 7


# ---- tensor codec ------------------------------------------------------------------------

@dataclass
class TensorMsg:
    data: bytes = b""
    dtype: str = ""
    shape: list = field(default_factory=list)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64])
def test_codec_round_trips_each_wire_dtype(dtype):
    source = (torch.randn(3, 4) * 4).to(dtype)
    msg = tensors.encode(source, TensorMsg())
    assert msg.shape == [3, 4] and msg.dtype == tensors.NAMES[dtype]
    back = tensors.decode(msg)
    assert back.dtype == dtype and back.shape == (3, 4)
    assert torch.equal(back.view(torch.uint8), source.contiguous().view(torch.uint8))


def test_codec_encodes_non_contiguous_tensors():
    source = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(tensors.decode(tensors.encode(source, TensorMsg())), source)


def test_codec_rejects_byte_length_that_does_not_match_shape():
    msg = tensors.encode(torch.zeros(2, 3), TensorMsg())
    msg.shape = [2, 4]
    with pytest.raises(errors.InvalidArgument, match=r"hidden: 24 bytes do not match shape \[2, 4\] of float32"):
        tensors.decode(msg, field="hidden")


def test_codec_rejects_unknown_or_disallowed_dtype_and_wrong_shape():
    msg = tensors.encode(torch.zeros(2, 3), TensorMsg())
    with pytest.raises(errors.InvalidArgument, match="dtype 'float32' is not accepted"):
        tensors.decode(msg, allowed={"bfloat16"})
    with pytest.raises(errors.InvalidArgument, match="shape"):
        tensors.decode(msg, expect_shape=(None, 4))
    msg.dtype = "complex64"
    with pytest.raises(errors.InvalidArgument, match="complex64"):
        tensors.decode(msg)
    msg.dtype, msg.shape = "float32", [-2, -3]
    with pytest.raises(errors.InvalidArgument, match="negative"):
        tensors.decode(msg)


# ---- error interceptor -------------------------------------------------------------------

def _raise(kind: str, context):
    if kind == "invalid":
        raise errors.InvalidArgument("prompt is empty")
    if kind == "model":
        raise InputError("token id 99 is outside the vocabulary")
    if kind == "notfound":
        raise errors.NotFound("no replica r9")
    if kind == "unavailable":
        raise errors.Unavailable("no live replica for layer 1 expert 3")
    if kind == "exhausted":
        raise errors.ResourceExhausted("kv cache full")
    if kind == "deadline":
        raise errors.DeadlineExceeded("deadline passed")
    if kind == "abort":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted")
    raise ZeroDivisionError("bug")


def _handlers():
    def unary(request, context):
        _raise(request.decode(), context)

    def unary_stream(request, context):
        yield b"first"
        _raise(request.decode(), context)

    def stream_stream(requests, context):
        for request in requests:
            yield b"echo"
            _raise(request.decode(), context)

    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("test.Svc", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, **ident),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, **ident),
    })


async def _raise_async(kind: str, context) -> None:
    if kind == "abort":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted")
    _raise(kind, context)


def _async_handlers():
    """The same methods as coroutines and async generators, for a grpc.aio Service."""
    async def unary(request, context):
        await _raise_async(request.decode(), context)

    async def unary_stream(request, context):
        yield b"first"
        await _raise_async(request.decode(), context)

    async def stream_stream(requests, context):
        async for request in requests:
            yield b"echo"
            await _raise_async(request.decode(), context)

    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("test.Svc", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, **ident),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, **ident),
    })


@pytest.fixture(scope="module", params=["thread pool", "grpc.aio"])
def error_channel(request):
    """The same error mapping through a thread-pool Service and an asynchronous one."""
    ns = argparse.Namespace(host="127.0.0.1", port=0, metrics_port=0)
    asynchronous = request.param == "grpc.aio"
    service = Service("errtest", ns, ["test.Svc"], max_workers=4, grace_s=0, asynchronous=asynchronous)
    service.server.add_generic_rpc_handlers((_async_handlers() if asynchronous else _handlers(),))
    port = service.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    service.shutdown()


CASES = [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ("model", grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ("notfound", grpc.StatusCode.NOT_FOUND, "no replica r9"),
    ("unavailable", grpc.StatusCode.UNAVAILABLE, "layer 1 expert 3"),
    ("exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "kv cache full"),
    ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"),
    ("abort", grpc.StatusCode.PERMISSION_DENIED, "handler aborted"),
    ("bug", grpc.StatusCode.INTERNAL, "ZeroDivisionError: bug"),
]


@pytest.mark.parametrize("kind,code,text", CASES)
def test_interceptor_maps_errors_of_unary_handlers(error_channel, kind, code, text):
    with pytest.raises(grpc.RpcError) as info:
        error_channel.unary_unary("/test.Svc/Unary")(kind.encode(), timeout=5)
    assert info.value.code() == code and text in info.value.details()


@pytest.mark.parametrize("kind,code,text", CASES[::3] + CASES[-1:])
def test_interceptor_maps_errors_raised_mid_stream(error_channel, kind, code, text):
    replies = error_channel.unary_stream("/test.Svc/UnaryStream")(kind.encode(), timeout=5)
    assert next(replies) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == code and text in info.value.details()

    replies = error_channel.stream_stream("/test.Svc/StreamStream")(iter([kind.encode()]), timeout=5)
    assert next(replies) == b"echo"
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == code and text in info.value.details()


def test_internal_errors_are_logged_with_method(error_channel, caplog):
    caplog.set_level(logging.ERROR, logger="moe.errors")
    with pytest.raises(grpc.RpcError):
        error_channel.unary_unary("/test.Svc/Unary")(b"bug", timeout=5)
    record = next(r for r in caplog.records if r.name == "moe.errors")
    assert record.kv["method"] == "/test.Svc/Unary" and record.exc_info


# ---- bootstrap, health, settings ---------------------------------------------------------

def test_healthcheck_reports_serving_then_not_serving_after_shutdown(capsys):
    ns = argparse.Namespace(host="127.0.0.1", port=0, metrics_port=0)
    service = Service("hc", ns, ["moe.v1.Router"], max_workers=2, grace_s=0)
    stopped = []
    service.on_shutdown(lambda: stopped.append(healthcheck.check("127.0.0.1", service.port, "moe.v1.Router")[0]))
    port = service.start()
    assert healthcheck.main(["--port", str(port)]) == 0
    assert healthcheck.main(["--port", str(port), "--service", "moe.v1.Router"]) == 0
    assert healthcheck.main(["--port", str(port), "--service", "moe.v1.Nope"]) == 1
    service.shutdown()
    assert stopped == [False]  # NOT_SERVING before the shutdown callbacks ran
    assert healthcheck.main(["--port", str(port), "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_settings_take_env_defaults_and_flags_override(monkeypatch):
    monkeypatch.setenv("MOE_CLUSTER", "green")
    monkeypatch.setenv("MOE_PORT", "6000")
    monkeypatch.setenv("MOE_REDIS_PASSWORD", "pw")
    monkeypatch.delenv("POD_IP", raising=False)
    parser = argparse.ArgumentParser()
    settings.add_common_arguments(parser, default_port=settings.DEFAULT_PORTS["router"])
    settings.add_plane_argument(parser)
    args = parser.parse_args(["--port", "7000", "--host", "127.0.0.2"])
    assert (args.cluster, args.port, args.metrics_port, args.plane, args.log_level) == ("green", 7000, 9400, 0, "info")
    assert settings.advertise_host(args) == "127.0.0.2"
    assert settings.redis_password() == "pw"
    monkeypatch.setenv("MOE_PORT", "http")
    parser = argparse.ArgumentParser()
    settings.add_common_arguments(parser, default_port=1)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_plan_orders_callers_plane_first_and_round_trips_proto_and_json():
    replicas = {"a": PlanReplica("a", "h:1", plane=0), "b": PlanReplica("b", "h:2", "h:3", plane=1)}
    plan = Plan(version=4, n_routed_experts=2, layers={1: [["a", "b"], ["b"]]}, replicas=replicas,
                missing=[], created_unix_ms=9)
    assert [r.id for r in plan.ordered_for_plane(1).replicas_for(1, 0)] == ["b", "a"]
    assert [r.id for r in plan.replicas_for(1, 0)] == ["a", "b"]
    assert plan.replicas_for(7, 0) == [] and plan.missing_among({(1, 1), (2, 0)}) == [(2, 0)]
    assert Plan.from_proto(plan.to_proto()) == plan
    assert Plan.from_json(plan.to_json()) == plan


def test_codec_fills_and_reads_the_moe_v1_tensor_message():
    tensor_pb2 = pytest.importorskip("moe.v1.tensor_pb2")
    source = torch.randn(2, 5).to(torch.bfloat16)
    wire = tensor_pb2.Tensor.FromString(tensors.encode(source, tensor_pb2.Tensor()).SerializeToString())
    assert torch.equal(tensors.decode(wire, allowed={"bfloat16"}, expect_shape=(None, 5)), source)


PAGE_FAULTS_PER_STEP = """
import resource, sys, threading
import torch
from services.common.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
def steps():  # like a decode step thread: buffers a little larger every step, off the main thread
    for i in range(60):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        torch.ones((1 << 18) + 4096 * i)  # 1 MiB and growing, every page touched
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=steps)
thread.start(); thread.join()
print(sum(faults[10:]) / len(faults[10:]))
"""


@pytest.mark.slow
def test_keeping_freed_memory_stops_a_step_threads_buffers_from_faulting_in_afresh():
    def faults_per_step(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], capture_output=True, text=True,
                              timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 100  # most of 1 MiB of fresh pages every step
    assert kept < default / 10

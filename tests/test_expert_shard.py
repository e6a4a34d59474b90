"""Expert shard: exact against transformers' own expert weights, merged batching, per-frame
errors on a live stream, and a real `python -m services.expert` process registered in a real
Redis whose death fails pending dispatches fast."""

from __future__ import annotations

import queue
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from moe.v1 import expert_pb2, expert_pb2_grpc
from services.common import tensors
from services.common.errors import InvalidArgument
from services.common.ports import free_ports
from services.common.redis_server import RedisServer
from services.common.redis_store import Keys, ReplicaRecord, connect, list_replicas
from services.common.server import build_server
from services.expert.servicer import ExpertShardServicer
from services.common.expert_ids import parse_expert_ids
from services.expert.shard import ExpertShard
from services.transport import make_transport
from services.transport.grpc_transport import GrpcExpertClient
from services.wire.batch import ExpertBatch
from services.wire.failures import ReplicaUnavailable
from support import start_service, stop_process, wait_until

HELD = [0, 2, 5, 7]
H, K, E = 64, 3, 8


def hf_reference(hf_model, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights * expert(x) from transformers' packed weights (gate_up_proj [E, 2I, H],
    down_proj [E, H, I]); slots with id -1 are skipped."""
    experts = hf_model.model.layers[layer].mlp.experts
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e < 0:
                    continue
                gate, up = (experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
                y = experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)
                out[t] += float(weights[t, k]) * y
    return out.float()


def random_batch(layer: int, tokens: int, seed: int, held: list[int] = HELD) -> ExpertBatch:
    """Random hidden; each slot a held expert or -1 (served elsewhere) with weight 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    choice = torch.tensor(held)[torch.randint(len(held), (tokens, K), generator=g)]
    masked = torch.rand(tokens, K, generator=g) < 0.3
    ids = torch.where(masked, -1, choice).to(torch.int32)
    weights = torch.where(masked, 0.0, torch.rand(tokens, K, generator=g)).float()
    return ExpertBatch(layer, x, ids, weights)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def shard(v3_checkpoint):
    path, _ = v3_checkpoint
    s = ExpertShard.load(path, HELD, dtype="float32").start()
    yield s
    s.drain(5.0)


@pytest.fixture(scope="module")
def server(shard):
    """An in-process gRPC server serving `shard`: (address, server)."""
    srv = build_server(max_workers=8)
    expert_pb2_grpc.add_ExpertShardServicer_to_server(ExpertShardServicer(shard), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def record(address: str, rid: str = "r-test") -> ReplicaRecord:
    return ReplicaRecord(kind="expert", id=rid, endpoints={"grpc": address}, experts=HELD)


# ---- the shard ------------------------------------------------------------------------------

def test_parse_expert_ids_accepts_ranges_and_lists():
    assert parse_expert_ids("0-3,8-11") == [0, 1, 2, 3, 8, 9, 10, 11]
    assert parse_expert_ids("5,0,2") == [0, 2, 5]
    with pytest.raises(ValueError, match="outside"):
        parse_expert_ids("0-8", 8)
    with pytest.raises(ValueError, match="'x'"):
        parse_expert_ids("0,x")


def test_shard_output_equals_transformers_experts(shard, v3_checkpoint):
    _, hf = v3_checkpoint
    assert shard.layers == [1, 2]
    for layer in shard.layers:
        batch = random_batch(layer, tokens=9, seed=layer)
        out = shard.compute(batch, timeout=10)
        assert out.dtype == torch.float32 and out.shape == (9, H)
        ref = hf_reference(hf, layer, batch.hidden, batch.expert_ids, batch.weights)
        assert (out - ref).abs().max().item() <= 1e-5


def test_shard_reads_only_its_experts(shard):
    bank = shard.banks[1]
    assert bank.expert_ids == HELD
    assert tuple(bank.w13.shape) == (len(HELD), 2 * 32, H)


def test_concurrent_submissions_for_one_layer_run_as_one_batched_compute(v3_checkpoint):
    path, hf = v3_checkpoint
    counts: list[tuple[int, dict]] = []

    class Recorder:
        def add(self, layer, per_expert):
            counts.append((layer, dict(per_expert)))

    s = ExpertShard.load(path, HELD, dtype="float32", recorder=Recorder())  # not started: work queues up
    batches = [random_batch(1, 5, seed=10), random_batch(1, 3, seed=11), random_batch(2, 4, seed=12)]
    futures = [s.submit(b) for b in batches]
    assert not any(f.done() for f in futures)
    s.start()
    results = [f.result(timeout=10) for f in futures]
    assert s.computes == 2, "the two layer-1 requests must be computed together, layer 2 apart"
    assert s.requests_done == 3
    for batch, out in zip(batches, results):
        ref = hf_reference(hf, batch.layer, batch.hidden, batch.expert_ids, batch.weights)
        assert out.shape == batch.hidden.shape
        assert (out - ref).abs().max().item() <= 1e-5
    wait_until(lambda: len(counts) == 2, 5, "load counts")
    layer1 = dict(counts)[1]
    ids1 = torch.cat([batches[0].expert_ids, batches[1].expert_ids])
    assert layer1 == {e: int((ids1 == e).sum()) for e in HELD if (ids1 == e).any()}
    assert metric("moe_expert_tokens_total", layer="1", expert=str(HELD[0])) > 0
    s.drain(5.0)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: setattr(b, "layer", 0), "layer 0 is not a MoE layer held by this shard"),
    (lambda b: b.expert_ids.__setitem__((0, 0), 3), "experts [3] are not held by this shard"),
    (lambda b: b.expert_ids.__setitem__((0, 0), 8), "outside [-1, 8)"),
    (lambda b: setattr(b, "weights", b.weights[:-1]), "weights: shape [3, 3] differs"),
    (lambda b: setattr(b, "expert_ids", b.expert_ids[:-1]), "is not [T=4, K]"),
    (lambda b: setattr(b, "hidden", b.hidden[:, :32]), "is not [T, 64]"),
    (lambda b: setattr(b, "weights", b.weights.double()), "weights: dtype float64"),
    (lambda b: setattr(b, "hidden", b.hidden.half()), "hidden: dtype float16"),
    (lambda b: b.weights.__setitem__((1, 1), float("nan")), "NaN or Inf among the routing weights"),
    (lambda b: setattr(b, "hidden", b.hidden.to(torch.float8_e4m3fn)), "hidden_scales: required"),
])
def test_bad_batches_are_rejected_with_the_culprit_named(shard, mutate, message):
    batch = random_batch(1, 4, seed=3)
    mutate(batch)
    with pytest.raises(InvalidArgument, match=__import__("re").escape(message)):
        shard.submit(batch)


def test_fp8_hidden_with_non_finite_scales_is_rejected(shard):
    batch = random_batch(1, 4, seed=4)
    batch.hidden = batch.hidden.to(torch.float8_e4m3fn)
    batch.hidden_scales = torch.ones(4, 1)
    batch.hidden_scales[2, 0] = float("inf")
    with pytest.raises(InvalidArgument, match="NaN or Inf among the fp8 scales"):
        shard.submit(batch)


# ---- the gRPC servicer and transport --------------------------------------------------------

def test_grpc_transport_round_trip_matches_transformers(server, v3_checkpoint):
    _, hf = v3_checkpoint
    sent = metric("moe_dispatch_bytes_total", transport="grpc", direction="dispatch")
    client = make_transport("grpc", "fp32").connect(record(server))
    try:
        batches = [random_batch(1 + i % 2, 2 + i, seed=20 + i) for i in range(6)]
        futures = [client.submit(b, timeout=10) for b in batches]  # pipelined on one stream
        for batch, future in zip(batches, futures):
            out = future.result(timeout=10)
            ref = hf_reference(hf, batch.layer, batch.hidden, batch.expert_ids, batch.weights)
            assert (out - ref).abs().max().item() <= 1e-5
        assert client.streams_opened == 1
    finally:
        client.close()
    assert metric("moe_dispatch_bytes_total", transport="grpc", direction="dispatch") > sent
    assert metric("moe_dispatch_wait_seconds_count", transport="grpc") >= 6


def test_bf16_and_prequantised_fp8_dispatch_stay_close(server, v3_checkpoint):
    _, hf = v3_checkpoint
    batch = random_batch(2, 6, seed=30)
    ref = hf_reference(hf, 2, batch.hidden, batch.expert_ids, batch.weights)
    client = make_transport("grpc", "bf16").connect(record(server))
    try:
        out = client.submit(batch, timeout=10).result(timeout=10)
        assert out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
        scale = batch.hidden.abs().amax(dim=1, keepdim=True) / 448.0  # one 128-block covers H=64
        fp8 = ExpertBatch(2, (batch.hidden / scale).to(torch.float8_e4m3fn), batch.expert_ids,
                          batch.weights, scale.float())
        out8 = client.submit(fp8, timeout=10).result(timeout=10)
        assert out8.dtype == torch.float32
        assert (out8 - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
    finally:
        client.close()


def test_fp8_dispatch_through_the_transport_codec(server, v3_checkpoint):
    _, hf = v3_checkpoint
    batch = random_batch(1, 6, seed=31)
    ref = hf_reference(hf, 1, batch.hidden, batch.expert_ids, batch.weights)
    client = make_transport("grpc", "fp8").connect(record(server))
    try:
        out = client.submit(batch, timeout=10).result(timeout=10)
    finally:
        client.close()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


def _frame(sequence: int, batch: ExpertBatch, **tweak) -> expert_pb2.ExpertRequest:
    request = expert_pb2.ExpertRequest(sequence=sequence, layer=batch.layer)
    tensors.encode(batch.hidden, request.hidden)
    tensors.encode(batch.expert_ids, request.expert_ids)
    tensors.encode(batch.weights, request.weights)
    for name, value in tweak.items():
        if value is None:
            request.ClearField(name)
        elif isinstance(value, torch.Tensor):
            tensors.encode(value, getattr(request, name))
        else:
            setattr(request, name, value)
    return request


def test_bad_frames_get_error_replies_and_the_stream_keeps_serving(server, v3_checkpoint):
    _, hf = v3_checkpoint
    good = random_batch(1, 3, seed=40)
    nan_scales = torch.ones(3, 1)
    nan_scales[0, 0] = float("nan")
    frames = {
        1: (_frame(1, good, layer=7), "layer 7 is not a MoE layer"),
        2: (_frame(2, good, expert_ids=torch.full((3, K), 4, dtype=torch.int32)), "experts [4] are not held"),
        3: (_frame(3, good, weights=torch.zeros(2, K)), "differs from expert_ids shape"),
        4: (_frame(4, good, hidden=torch.zeros(3, 65)), "is not [T, 64]"),
        5: (_frame(5, good, expert_ids=good.expert_ids.long()), "expert_ids: dtype 'int64' is not accepted"),
        6: (_frame(6, good, hidden=torch.zeros(3, H, dtype=torch.float8_e4m3fn), hidden_scales=nan_scales),
            "NaN or Inf among the fp8 scales"),
        7: (_frame(7, good, hidden=None), "hidden is missing"),
        8: (_frame(8, good, output_dtype="int8"), "output_dtype 'int8'"),
    }
    requests: queue.SimpleQueue = queue.SimpleQueue()
    for request, _ in frames.values():
        requests.put(request)
    requests.put(_frame(9, good))
    requests.put(None)
    with grpc.insecure_channel(server) as channel:
        replies = list(expert_pb2_grpc.ExpertShardStub(channel).Exchange(iter(requests.get, None), timeout=20))
    by_seq = {r.sequence: r for r in replies}
    assert sorted(by_seq) == list(range(1, 10))
    for seq, (_, message) in frames.items():
        reply = by_seq[seq]
        assert reply.WhichOneof("result") == "error", seq
        assert reply.error.code == "INVALID_ARGUMENT"
        assert message in reply.error.message, (seq, reply.error.message)
    out = tensors.decode(by_seq[9].output)
    ref = hf_reference(hf, 1, good.hidden, good.expert_ids, good.weights)
    assert (out - ref).abs().max().item() <= 1e-5


def test_client_raises_invalid_argument_and_keeps_its_stream(server):
    client = make_transport("grpc", "fp32").connect(record(server))
    try:
        bad = random_batch(1, 2, seed=50)
        bad.expert_ids[0, 0] = 1
        with pytest.raises(InvalidArgument, match="not held"):
            client.submit(bad, timeout=10).result(timeout=10)
        assert client.submit(random_batch(1, 2, seed=51), timeout=10).result(timeout=10).shape == (2, H)
        assert client.streams_opened == 1
    finally:
        client.close()


def test_stop_streams_ends_open_streams_and_clients_reconnect(v3_checkpoint):
    path, _ = v3_checkpoint
    local = ExpertShard.load(path, HELD, dtype="float32").start()
    servicer = ExpertShardServicer(local)
    srv = build_server(max_workers=4)
    expert_pb2_grpc.add_ExpertShardServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    client = GrpcExpertClient("stopping", f"127.0.0.1:{port}", "fp32")
    try:
        assert client.submit(random_batch(1, 2, seed=65), timeout=10).result(timeout=10).shape == (2, H)
        first = client._stream
        servicer.stop_streams()
        wait_until(lambda: first.broken is not None, 5, "the stream to end")
        assert "closed by the replica" in first.broken
        with pytest.raises(ReplicaUnavailable):  # stopping servicer refuses new streams
            client.submit(random_batch(1, 2, seed=66), timeout=5).result(timeout=6)
        assert client.streams_opened == 2
    finally:
        client.close()
        srv.stop(0)
        local.drain(1.0)


def test_no_reply_within_timeout_fails_the_future_with_replica_unavailable(v3_checkpoint):
    path, _ = v3_checkpoint
    stalled = ExpertShard.load(path, HELD, dtype="float32")  # never started: requests never finish
    srv = build_server(max_workers=4)
    expert_pb2_grpc.add_ExpertShardServicer_to_server(ExpertShardServicer(stalled), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    client = GrpcExpertClient("stalled", f"127.0.0.1:{port}", "fp32")
    try:
        started = time.monotonic()
        future = client.submit(random_batch(1, 2, seed=60), timeout=0.3)
        with pytest.raises(ReplicaUnavailable, match="no reply within"):
            future.result(timeout=5)
        assert time.monotonic() - started < 2.0
    finally:
        client.close()
        srv.stop(0)
        stalled.drain(1.0)


def test_unreachable_replica_fails_fast_and_make_transport_rejects_unknown_names():
    (port,) = free_ports(1)
    client = GrpcExpertClient("nobody", f"127.0.0.1:{port}", "fp32")
    try:
        with pytest.raises(ReplicaUnavailable):
            client.submit(random_batch(1, 2, seed=70), timeout=5).result(timeout=6)
    finally:
        client.close()
    with pytest.raises(ValueError, match="transport 'tcp'"):
        make_transport("tcp", "fp32")
    with pytest.raises(ValueError, match="dispatch dtype 'fp16'"):
        make_transport("grpc", "fp16")


# ---- a real process with a real Redis -------------------------------------------------------

def _start_expert(path, redis_url: str, port: int, replica_id: str, log: Path) -> subprocess.Popen:
    return start_service("services.expert", "--model", str(path), "--experts", "0,2,5,7",
                         "--host", "127.0.0.1", "--advertise-host", "127.0.0.1", "--port", str(port),
                         "--metrics-port", "0", "--redis-url", redis_url, "--cluster", "shardtest",
                         "--replica-id", replica_id, "--dtype", "float32", "--plane", "1", log=log)


@pytest.mark.cluster
def test_expert_process_registers_serves_and_its_death_fails_pending_dispatches(v3_checkpoint, tmp_path):
    path, hf = v3_checkpoint
    keys = Keys("shardtest")
    procs: list[subprocess.Popen] = []
    with RedisServer() as redis_server:
        rdb = connect(redis_server.url)
        ports = free_ports(2)
        try:
            procs = [_start_expert(path, redis_server.url, ports[i], f"e{i}", tmp_path / f"e{i}.log")
                     for i in range(2)]
            records = wait_until(lambda: len(list_replicas(rdb, keys, "expert")) == 2 and
                                 list_replicas(rdb, keys, "expert"), 90, "both replicas to register",
                                 log=tmp_path / "e0.log")
            by_id = {r.id: r for r in records}
            assert by_id["e0"].endpoints == {"grpc": f"127.0.0.1:{ports[0]}"}
            assert by_id["e0"].experts == HELD and by_id["e0"].shard == "shard-0-7" and by_id["e0"].plane == 1
            log0 = (tmp_path / "e0.log").read_text()
            assert "layer loaded" in log0 and "bytes=" in log0

            transport = make_transport("grpc", "fp32")
            client = transport.connect(by_id["e0"])
            batch = random_batch(2, 5, seed=80)
            out = client.submit(batch, timeout=10).result(timeout=10)
            ref = hf_reference(hf, 2, batch.hidden, batch.expert_ids, batch.weights)
            assert (out - ref).abs().max().item() <= 1e-5
            wait_until(lambda: rdb.keys("shardtest:load:*"), 10, "load counts in redis")

            # a frozen replica: the deadline fails the future, no hang
            procs[0].send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(ReplicaUnavailable, match="no reply within"):
                client.submit(batch, timeout=0.5).result(timeout=5)
            assert time.monotonic() - started < 2.0
            # killed with a dispatch pending: the broken stream fails it long before its timeout
            pending = client.submit(batch, timeout=30)
            assert not pending.done()
            started = time.monotonic()
            procs[0].send_signal(signal.SIGKILL)
            with pytest.raises(ReplicaUnavailable):
                pending.result(timeout=10)
            assert time.monotonic() - started < 5.0
            with pytest.raises(ReplicaUnavailable):  # reconnects lazily: the replica is gone
                client.submit(batch, timeout=5).result(timeout=6)
            client.close()

            # the other replica drains on SIGTERM: deregisters, ends its open streams, exits 0
            # well within the 10 s grace period
            assert {r.id for r in list_replicas(rdb, keys, "expert")} >= {"e1"}
            other = transport.connect(by_id["e1"])
            assert other.submit(batch, timeout=10).result(timeout=10).shape == (5, H)
            started = time.monotonic()
            procs[1].send_signal(signal.SIGTERM)
            assert procs[1].wait(15) == 0
            assert time.monotonic() - started < 8.0
            assert rdb.get(keys.replica("expert", "e1")) is None
            other.close()
        finally:
            for proc in procs:
                stop_process(proc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a shard on a GPU)")
def test_a_gpu_shard_keeps_ucx_traffic_in_gpu_memory(v3_checkpoint):
    """On a GPU the listener receives hidden states into GPU memory and the reply leaves from it
    (CUDA IPC / GPUDirect RDMA), with no copy through the host on the shard."""
    from services.common.plan import PlanReplica
    from services.expert.__main__ import start_ucx
    from services.transport.ucx_transport import UcxTransport, ucx_available

    if not ucx_available()[0]:
        pytest.skip(f"ucxx cannot be imported: {ucx_available()[1]}")
    path, hf = v3_checkpoint
    shard = ExpertShard.load(path, HELD, dtype="float32", device="cuda").start()
    server = start_ucx(0, shard)
    try:
        assert server.device == shard.device and shard.device.type == "cuda"
        batch = random_batch(1, tokens=64, seed=3)   # 64 x 64 fp32: more than a head carries inline
        assert shard.compute(ExpertBatch(1, batch.hidden.cuda(), batch.expert_ids, batch.weights), timeout=30).is_cuda
        client = UcxTransport("fp32").connect(PlanReplica("r-gpu", "127.0.0.1:1", ucx=f"127.0.0.1:{server.port}"))
        out = client.submit(ExpertBatch(1, batch.hidden.cuda(), batch.expert_ids, batch.weights), 30).result(30)
        client.close()
        assert out.is_cuda
        ref = hf_reference(hf, 1, batch.hidden, batch.expert_ids, batch.weights)
        assert (out.cpu() - ref).abs().max().item() <= 1e-5
    finally:
        server.close()
        shard.drain(5.0)

"""UCX dispatch against a real listener in another OS process (spawned, stopped by its PID)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from services.common.errors import InvalidArgument
from services.transport import ucx_framing as wire
from services.transport.base import make_transport
from services.wire import codec
from services.wire.batch import ExpertBatch
from services.wire.failures import ReplicaUnavailable
from services.transport.ucx_transport import UcxTransport, ucx_available

UCX_OK, UCX_REASON = ucx_available()
pytestmark = pytest.mark.skipif(not UCX_OK, reason=f"ucxx cannot be imported: {UCX_REASON}")

STARTUP_DEADLINE_S = 60.0
LAYER_THAT_REJECTS = 99        # the test compute refuses this layer as bad input
LAYER_THAT_HANGS = 98          # ... and never answers this one (until the process dies)
LAYER_THAT_IS_SLOW = 97        # ... and answers this one after SLOW_S
SLOW_S = 1.0


@dataclass
class Replica:
    id: str
    endpoints: dict[str, str] = field(default_factory=dict)


def _scaled_by_weight_sum(batch: ExpertBatch) -> torch.Tensor:
    """A stand-in expert: out = x * sum_k w_k (in the hidden's dtype; float32 for fp8)."""
    if batch.layer == LAYER_THAT_REJECTS:
        raise InvalidArgument(f"layer {batch.layer} is not held here")
    if batch.layer == LAYER_THAT_HANGS:
        threading.Event().wait()
    if batch.layer == LAYER_THAT_IS_SLOW:
        time.sleep(SLOW_S)
    out_dtype = torch.float32 if batch.hidden.dtype == torch.float8_e4m3fn else batch.hidden.dtype
    x = codec.decode_hidden(batch.hidden, batch.hidden_scales, torch.float32)
    return (x * batch.weights.sum(-1, keepdim=True)).to(out_dtype)


def _serve(conn) -> None:
    """Child process: a UCX listener on a free port; reports the port, then serves until killed."""
    from services.transport.ucx_server import run_in_threads, serve_ucx

    server = serve_ucx(0, run_in_threads(_scaled_by_weight_sum))
    conn.send(server.port)
    threading.Event().wait()


@dataclass
class Listener:
    process: multiprocessing.Process | None   # None: a listener in the test process itself
    port: int


@pytest.fixture(scope="module")
def listeners():
    """Two listener processes, started together (their start-up dominates this file's run time):
    "shared" serves the tests that leave it alive, "doomed" is for the one that kills it."""
    ctx = multiprocessing.get_context("spawn")
    started = {}
    for name in ("shared", "doomed"):
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child,), name=f"ucx-listener-{name}", daemon=True)
        process.start()
        started[name] = (process, parent)
    try:
        ready = {}
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        for name, (process, parent) in started.items():
            if not parent.poll(max(0.0, deadline - time.monotonic())):
                pytest.fail(f"UCX listener '{name}' did not report its port within {STARTUP_DEADLINE_S}s")
            ready[name] = Listener(process, parent.recv())
        yield ready
    finally:
        for process, _ in started.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(10)


@pytest.fixture
def shared(listeners) -> Listener:
    return listeners["shared"]


def _connect(listener: Listener, dispatch_dtype: str):
    return UcxTransport(dispatch_dtype).connect(Replica("r0", {"ucx": f"127.0.0.1:{listener.port}"}))


def _batch(tokens: int, hidden: int, topk: int = 3, layer: int = 1, seed: int = 0) -> ExpertBatch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, 8, (tokens, topk), generator=gen, dtype=torch.int32)
    ids[:, -1] = -1                         # a slot not for this replica
    weights = torch.rand(tokens, topk, generator=gen)
    weights[:, -1] = 0
    return ExpertBatch(layer, x, ids, weights)


def _expected(batch: ExpertBatch) -> torch.Tensor:
    return batch.hidden * batch.weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("dispatch_dtype, tolerance", [("fp32", 0.0), ("bf16", 2 ** -7), ("fp8", 2 ** -3)])
def test_batches_round_trip_in_every_dispatch_dtype(shared, dispatch_dtype, tolerance):
    client = _connect(shared, dispatch_dtype)
    try:
        # 4 tokens fit the head message; 300 tokens x 512 send the hidden states as a tail
        batches = [_batch(4, 64, seed=1), _batch(300, 512, seed=2), _batch(5, 200, seed=3)]
        futures = [client.submit(b, timeout=30.0) for b in batches]   # several in flight at once
        for batch, future in zip(batches, futures):
            out = future.result(timeout=60.0)
            want = _expected(batch)
            assert out.shape == want.shape and out.dtype == torch.float32
            # relative to each row's magnitude: bf16 keeps 8 bits, fp8 (+ bf16 reply) about 4
            scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-6)
            assert float(((out - want).abs() / scale).max()) <= tolerance
    finally:
        client.close()


def test_a_link_opened_with_the_device_inline_limit_sends_hidden_states_as_tails(shared, monkeypatch):
    """What a GPU worker does (its hidden states then go zero-copy): the listener follows the
    limit the worker's hello names, in both directions."""
    batch = _batch(40, 512, seed=4)   # 80 KiB of fp32 hidden: inline on TCP-only hosts, a tail here
    assert wire.encode_request(1, 1, batch.expert_ids, batch.weights, batch.hidden, None, torch.float32,
                               wire.DEVICE_INLINE_LIMIT).tails != []
    transport = UcxTransport("fp32")
    monkeypatch.setattr(transport.runtime, "inline_limit", wire.DEVICE_INLINE_LIMIT)
    client = transport.connect(Replica("r0", {"ucx": f"127.0.0.1:{shared.port}"}))
    try:
        batches = [batch, _batch(4, 64, seed=5)]
        futures = [client.submit(b, timeout=30.0) for b in batches]
        for b, future in zip(batches, futures):
            torch.testing.assert_close(future.result(timeout=60.0), _expected(b), rtol=0, atol=0)
    finally:
        client.close()


def test_bfloat16_caller_gets_bfloat16_back(shared):
    client = _connect(shared, "bf16")
    try:
        batch = _batch(6, 128)
        batch.hidden = batch.hidden.bfloat16()
        out = client.submit(batch, timeout=30.0).result(timeout=60.0)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), _expected(batch).float(), rtol=2 ** -7, atol=1e-3)
    finally:
        client.close()


def test_bad_batch_is_invalid_argument_and_the_endpoint_keeps_serving(shared):
    client = _connect(shared, "fp32")
    try:
        with pytest.raises(InvalidArgument, match="layer 99 is not held"):
            client.submit(_batch(2, 64, layer=LAYER_THAT_REJECTS), timeout=30.0).result(timeout=60.0)
        batch = _batch(2, 64)
        torch.testing.assert_close(client.submit(batch, timeout=30.0).result(timeout=60.0), _expected(batch))
        assert client.connections_opened == 1
    finally:
        client.close()


def test_killed_replica_mid_request_fails_the_future_within_its_timeout(listeners):
    doomed = listeners["doomed"]
    client = _connect(doomed, "fp32")
    try:
        warm = _batch(2, 64)
        torch.testing.assert_close(client.submit(warm, timeout=30.0).result(timeout=60.0), _expected(warm))
        timeout = 10.0
        started = time.monotonic()
        future = client.submit(_batch(2, 64, layer=LAYER_THAT_HANGS), timeout=timeout)
        os.kill(doomed.process.pid, signal.SIGKILL)
        with pytest.raises(ReplicaUnavailable) as caught:
            future.result(timeout=timeout + 5.0)
        assert time.monotonic() - started <= timeout + 1.0
        assert caught.value.replica_id == "r0"
        # a later submit to the dead address fails too (reconnect refused), and does not hang
        with pytest.raises(ReplicaUnavailable):
            client.submit(warm, timeout=5.0).result(timeout=10.0)
    finally:
        client.close()


def test_hung_replica_fails_the_future_at_its_timeout(shared):
    client = _connect(shared, "fp32")
    try:
        started = time.monotonic()
        future = client.submit(_batch(2, 64, layer=LAYER_THAT_HANGS), timeout=0.5)
        with pytest.raises(ReplicaUnavailable, match="no reply within"):
            future.result(timeout=10.0)
        assert 0.5 <= time.monotonic() - started <= 5.0
    finally:
        client.close()


def test_reply_after_the_timeout_is_dropped_and_the_endpoint_keeps_serving(shared):
    client = _connect(shared, "fp32")
    try:
        # 300 x 512 fp32: the late reply has a tail, which must land in the receive posted for it
        with pytest.raises(ReplicaUnavailable, match="no reply within"):
            client.submit(_batch(300, 512, layer=LAYER_THAT_IS_SLOW), timeout=0.2).result(timeout=10.0)
        time.sleep(SLOW_S)   # the late reply arrives meanwhile
        batch = _batch(300, 512, seed=5)
        torch.testing.assert_close(client.submit(batch, timeout=30.0).result(timeout=60.0), _expected(batch))
        assert client.connections_opened == 1
    finally:
        client.close()


def test_concurrent_callers_and_workers_get_their_own_replies(shared):
    """Frames from several threads of one client interleave on one endpoint, and several clients
    (workers) share the listener; every caller gets the reply to its own batch."""
    clients = [_connect(shared, "bf16") for _ in range(3)]
    failures: list[BaseException] = []

    def caller(client, seed: int) -> None:
        try:
            for i in range(5):
                batch = _batch(4 if i % 2 else 200, 256, seed=seed * 10 + i)
                out = client.submit(batch, timeout=30.0).result(timeout=60.0)
                torch.testing.assert_close(out, _expected(batch), rtol=2 ** -6, atol=1e-2)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            failures.append(err)

    threads = [threading.Thread(target=caller, args=(client, 2 * n + k)) for n, client in enumerate(clients)
               for k in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        assert [client.connections_opened for client in clients] == [1, 1, 1]
    finally:
        for client in clients:
            client.close()


def test_closed_client_fails_pending_and_new_work():
    client = UcxTransport("fp32").connect(Replica("r0", {"ucx": "127.0.0.1:9"}))   # nothing listens
    client.close()
    with pytest.raises(ReplicaUnavailable, match="client closed"):
        client.submit(_batch(1, 64), timeout=5.0).result(timeout=10.0)


def test_record_without_ucx_endpoint_is_unavailable():
    with pytest.raises(ReplicaUnavailable, match="no ucx endpoint"):
        UcxTransport("fp32").connect(Replica("r0", {"grpc": "127.0.0.1:50053"}))


def test_auto_transport_takes_ucx_where_a_replica_offers_it_and_grpc_elsewhere(shared, monkeypatch):
    from services.transport import auto
    from services.transport.grpc_transport import GrpcExpertClient
    from services.transport.ucx_transport import UcxExpertClient

    both = Replica("r0", {"grpc": "127.0.0.1:9", "ucx": f"127.0.0.1:{shared.port}"})
    grpc_only = Replica("r1", {"grpc": "127.0.0.1:9"})
    transport = make_transport("auto", "fp32")
    clients = [transport.connect(both), transport.connect(grpc_only)]
    try:
        assert isinstance(clients[0], UcxExpertClient) and isinstance(clients[1], GrpcExpertClient)
        batch = _batch(4, 64, seed=5)
        assert torch.equal(clients[0].submit(batch, timeout=30.0).result(timeout=60.0), _expected(batch))
    finally:
        for client in clients:
            client.close()
    # where ucxx cannot be found, every replica is reached over gRPC
    monkeypatch.setattr(auto, "ucx_installed", lambda: False)
    fallback = make_transport("auto", "fp32").connect(both)
    assert isinstance(fallback, GrpcExpertClient)
    fallback.close()


def test_frame_layout_puts_small_sections_inline_and_large_ones_in_tails():
    small = wire.encode_request(7, 3, torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 8),
                                torch.ones(4, 64), None, torch.float32)
    assert small.tails == [] and small.head.nbytes <= wire.HEADER.size + wire.INLINE_LIMIT
    q, scales = codec.quantize_1x128(torch.randn(100, 7168))
    big = wire.encode_request(8, 3, torch.zeros(100, 8, dtype=torch.int32), torch.ones(100, 8), q, scales,
                              torch.bfloat16)
    assert [t.numel() for t in big.tails] == [100 * 7168]
    assert big.tails[-1].data_ptr() == q.data_ptr()       # the hidden tail is the tensor itself
    header = wire.parse_header(big.head, wire.KIND_REQUEST)
    views, tails = wire.split_inline(big.head, header, wire.request_sections(header))
    assert (header.sequence, header.layer, header.tokens, header.hidden, header.topk) == (8, 3, 100, 7168, 8)
    assert len(views) == 3 and [s.shape for s in tails] == [(100, 7168)]
    torch.testing.assert_close(views[2], scales)
    # the requester's receive for a reply holds the reply's head whole, or an error in its place
    output = torch.randn(4, 64)
    reply = wire.encode_reply(7, output)
    assert reply.tails == [] and reply.head.nbytes <= wire.reply_head_size((4, 64), torch.float32)
    error = wire.encode_error(7, wire.STATUS_ERROR, "x" * 10_000)
    assert error.head.nbytes <= wire.reply_head_size((4, 64), torch.float32)
    with pytest.raises(wire.FrameError, match="not a moe.v1 UCX reply"):
        wire.parse_header(big.head, wire.KIND_REPLY)


def test_closing_the_listener_fails_the_calls_it_was_serving():
    from services.transport.ucx_server import run_in_threads, serve_ucx

    entered, release = threading.Event(), threading.Event()

    def stuck(batch: ExpertBatch) -> torch.Tensor:
        entered.set()
        release.wait(30)
        return batch.hidden

    server = serve_ucx(0, run_in_threads(stuck))
    client = _connect(Listener(None, server.port), "fp32")
    try:
        future = client.submit(_batch(2, 64), timeout=20.0)
        assert entered.wait(20.0), "the listener never started computing the request"
        server.close()
        with pytest.raises(ReplicaUnavailable):
            future.result(timeout=25.0)
    finally:
        release.set()
        client.close()
        server.close()


BUSY_MATMULS = 20   # large matmuls queued on the GPU ahead of a tensor that is then sent


def _written_late(x: torch.Tensor) -> torch.Tensor:
    """x, as written by a kernel queued behind BUSY_MATMULS large matmuls (tens of milliseconds of
    GPU work): a send that does not wait for that kernel carries whatever the memory held before."""
    a = torch.full((8192, 8192), 1 / 8192, device=x.device, dtype=torch.bfloat16)
    b = a
    for _ in range(BUSY_MATMULS):
        b = b @ a   # stays 1/8192 everywhere
    return (x.float() + 0 * b[:1, :1].float()).to(x.dtype)


def _scaled_and_written_late(batch: ExpertBatch) -> torch.Tensor:
    x = batch.hidden.to("cuda", torch.float32) * batch.weights.to("cuda").sum(-1, keepdim=True)
    return _written_late(x.to(batch.hidden.dtype))


def _serve_cuda(conn) -> None:
    from services.transport.ucx_server import run_in_threads, serve_ucx

    server = serve_ucx(0, run_in_threads(_scaled_and_written_late), device="cuda")
    conn.send(server.port)
    threading.Event().wait()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU tensors over UCX)")
def test_gpu_tensors_still_being_written_travel_complete():
    """GPU hidden states and outputs go as zero-copy tails, which UCX reads on streams of its own
    (the peer's, with CUDA IPC): both sides must wait for the kernels that write them. Without
    that wait every round trip here came back wrong (H200, 2026-11-29)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve_cuda, args=(child,), name="ucx-listener-cuda", daemon=True)
    process.start()
    try:
        assert parent.poll(STARTUP_DEADLINE_S), f"CUDA UCX listener did not report its port within {STARTUP_DEADLINE_S}s"
        client = UcxTransport("bf16").connect(Replica("r0", {"ucx": f"127.0.0.1:{parent.recv()}"}))
        for seed in range(4):
            batch = _batch(256, 7168, seed=seed)   # routing stays on the host, as the dispatcher sends it
            base = batch.hidden.to("cuda", torch.bfloat16)
            hidden = _written_late(base)
            assert hidden.nbytes > wire.DEVICE_INLINE_LIMIT   # a tail each way
            out = client.submit(ExpertBatch(batch.layer, hidden, batch.expert_ids, batch.weights), 60).result(60)
            want = (base.float() * batch.weights.cuda().sum(-1, keepdim=True)).to(torch.bfloat16)
            assert out.device.type == "cuda"
            assert torch.equal(out, want), f"seed {seed}: {int((out != want).sum())} of {out.numel()} values differ"
        client.close()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)

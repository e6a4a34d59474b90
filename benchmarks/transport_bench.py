"""UCX vs gRPC vs memcpy on one machine, plus dispatch bytes on the wire per token.

    .venv/bin/python benchmarks/transport_bench.py            # everything (a few minutes)
    .venv/bin/python benchmarks/transport_bench.py --quick    # fewer iterations and UCX variants
    .venv/bin/python benchmarks/transport_bench.py --quick --sizes 4,16,64   # only these sizes (KiB)

For message sizes 4 KiB .. 16 MiB, between two processes on this machine:
  one-way bandwidth  k messages streamed, one ack at the end        (GB/s)
  round trip         send N bytes, get the same N back, per message  (median microseconds)
for: our UCX expert path (UcxExpertClient frames against serve_ucx, echo submit, fp32; its
bandwidth counts both directions, its round trip is submit -> result), the same expert path over
our gRPC transport (GrpcExpertClient against ExpertShardServicer, same echo), raw UCX tag messages
through UCXX's asyncio API (endpoint from a listener; the variants below), a gRPC bidirectional
stream with bytes payloads (benchmark-only generic handler, no protos), and torch copy_ of the same
bytes in one process as the ceiling.

Variants (each a fresh client/server process pair, since UCX reads its settings at start).
UCXX asyncio: progress UCXPY_PROGRESS_MODE = thread with UCXPY_ENABLE_PYTHON_FUTURE=1 (its
default, what our path used before its own progress thread) | thread or blocking with UCXX's
re-polling wait | polling; UCXPY_ENABLE_DELAYED_SUBMISSION=0; rendezvous threshold
UCX_RNDV_THRESH = ucxx's 8 KiB vs 1 MiB; an endpoint created from the server's worker address
instead of the listener. Ours: default (ucx_runtime.UCX_DEFAULTS: eager up to any size, 512 KiB TCP
segments) | UCXX's 8 KiB rendezvous threshold with UCX's TCP segments | UCXPY_PROGRESS_MODE=polling
(its progress thread spins). Each reports the CPU a process burns per second while it only
waits (raw: a posted receive; ours: a request the server holds for a second, both processes).

Where copies happen: gRPC needs a Python `bytes` per message (one copy from the tensor, made
once here outside the timing, but paid on every real call) plus its own serialisation buffers;
UCX sends from and receives into the numpy views of preallocated buffers, so the only copies
are the kernel's socket copies (TCP is the only inter-process transport UCX finds here).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.wire import dtypes  # noqa: E402

# what the measured processes start from: importing ucxx (the orchestrator does, to report its
# version) puts UCXX's UCX_* defaults in os.environ, which would override ucx_runtime's own
LAUNCH_ENV = dict(os.environ)

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
SINK, ECHO, STOP, IDLE = 1, 2, 3, 4
IDLE_S = 1.0
IDLE_LAYER = 1 << 20          # expert path: the echo server holds this request IDLE_S seconds
READY_DEADLINE_S = 60.0
EXPERT_HIDDEN = 1024          # expert-path rows: tokens = bytes / (1024 * 4)
V3 = {"name": "DeepSeek-V3", "hidden": 7168, "topk": 8}
TINY = {"name": "tiny test", "hidden": 64, "topk": 3}


def iterations(size: int, quick: bool) -> tuple[int, int]:
    """(messages for bandwidth, round trips for latency) at `size` bytes."""
    streamed = max(4, min(200, (64 << 20) // size))
    trips = max(5, min(300, (16 << 20) // size))
    return (max(4, streamed // 4), max(5, trips // 4)) if quick else (streamed, trips)


# ---- UCX raw: server and client (separate processes) ----------------------------------------
async def _ucx_serve_endpoint(ucxx, ep, by_address: bool) -> None:
    control = np.zeros(3, np.int64)                         # (mode, size, count)
    if by_address:  # swap worker addresses over the listener endpoint, then use those endpoints
        size = np.zeros(1, np.int64)
        await ep.recv(size)
        peer = np.empty(int(size[0]), np.uint8)
        await ep.recv(peer)
        mine = np.frombuffer(bytes(ucxx.get_worker_address()), np.uint8)
        await ep.send(np.array([mine.size], np.int64))
        await ep.send(mine)
        data_ep = await ucxx.create_endpoint_from_worker_address(ucxx.get_ucx_address_from_buffer(peer.tobytes()))
        send = lambda buf: data_ep.send(buf, tag=2, force_tag=True)   # noqa: E731
        recv = lambda buf: ucxx.recv(buf, tag=1)                      # noqa: E731
    else:
        send, recv = ep.send, ep.recv
    while True:
        await recv(control)
        mode, size, count = (int(v) for v in control)
        if mode == STOP:
            return
        if mode == IDLE:  # keep the client waiting on a posted receive for `count` ms
            await asyncio.sleep(count / 1000)
            await send(np.array([count], np.int64))
            continue
        buf = np.empty(size, np.uint8)
        for _ in range(count):
            await recv(buf)
            if mode == ECHO:
                await send(buf)
        if mode == SINK:
            await send(np.array([count], np.int64))


async def _ucx_client(port: int, sizes: list[int], quick: bool, by_address: bool) -> dict:
    import ucxx

    ep = await ucxx.create_endpoint("127.0.0.1", port)
    if by_address:
        mine = np.frombuffer(bytes(ucxx.get_worker_address()), np.uint8)
        await ep.send(np.array([mine.size], np.int64))
        await ep.send(mine)
        size = np.zeros(1, np.int64)
        await ep.recv(size)
        peer = np.empty(int(size[0]), np.uint8)
        await ep.recv(peer)
        data_ep = await ucxx.create_endpoint_from_worker_address(ucxx.get_ucx_address_from_buffer(peer.tobytes()))
        send = lambda buf: data_ep.send(buf, tag=1, force_tag=True)   # noqa: E731
        recv = lambda buf: ucxx.recv(buf, tag=2)                      # noqa: E731
    else:
        send, recv = ep.send, ep.recv
    rows = {}
    for size in sizes:
        streamed, trips = iterations(size, quick)
        out, back, ack = np.ones(size, np.uint8), np.empty(size, np.uint8), np.empty(1, np.int64)
        await send(np.array([SINK, size, streamed], np.int64))
        start = time.perf_counter()
        for first in range(0, streamed, 4):   # four in flight: enough to keep TCP busy
            await asyncio.gather(*(send(out) for _ in range(min(4, streamed - first))))
        await recv(ack)
        bandwidth = streamed * size / (time.perf_counter() - start)
        await send(np.array([ECHO, size, trips], np.int64))
        rtts = []
        for _ in range(trips):
            start = time.perf_counter()
            await send(out)
            await recv(back)
            rtts.append(time.perf_counter() - start)
        rows[size] = (bandwidth, statistics.median(rtts))
    ack = np.empty(1, np.int64)
    await send(np.array([IDLE, 0, int(IDLE_S * 1000)], np.int64))
    cpu, wall = time.process_time(), time.perf_counter()
    await recv(ack)
    rows["idle_cpu"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
    await send(np.array([STOP, 0, 0], np.int64))
    ucxx.stop_notifier_thread()   # not a daemon thread: it would keep this process alive
    return rows


def serve_ucx_raw(by_address: bool) -> None:
    import ucxx

    async def serve_endpoint(ep):   # UCXX awaits its callback only when it is a coroutine function
        await _ucx_serve_endpoint(ucxx, ep, by_address)

    async def main():
        listener = ucxx.create_listener(serve_endpoint, 0)
        print(f"READY {listener.port}", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())


def _echo(batch, reply_dtype) -> concurrent.futures.Future:
    """Echo, which isolates the transport: the future is complete on return, as a shard's would be
    for a batch it had computed already. For IDLE_LAYER it completes IDLE_S later with the CPU
    this process burned per second meanwhile (its progress thread waiting on an open endpoint)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    if batch.layer != IDLE_LAYER:
        future.set_result(batch.hidden.to(reply_dtype))
        return future
    cpu, wall = time.process_time(), time.perf_counter()

    def report() -> None:
        burned = (time.process_time() - cpu) / (time.perf_counter() - wall)
        future.set_result(torch.full_like(batch.hidden, burned, dtype=reply_dtype))
    threading.Timer(IDLE_S, report).start()
    return future


def serve_ucx_expert() -> None:
    from services.transport.ucx_server import serve_ucx

    server = serve_ucx(0, _echo)
    print(f"READY {server.port}", flush=True)
    threading.Event().wait()


def serve_grpc_expert() -> None:
    """Our gRPC expert path's server: ExpertShardServicer over the same echo submit."""
    from moe.v1 import expert_pb2_grpc
    from services.common.server import build_server
    from services.expert.servicer import ExpertShardServicer

    class EchoShard:
        submit = staticmethod(_echo)

    server = build_server(max_workers=8)
    expert_pb2_grpc.add_ExpertShardServicer_to_server(ExpertShardServicer(EchoShard()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"READY {port}", flush=True)
    server.wait_for_termination()


def client_expert(transport: str, port: int, sizes: list[int], quick: bool) -> dict:
    """Our expert path through `transport` ("ucx" or "grpc"): ExpertBatch in, output out."""
    from services.transport.base import make_transport
    from services.wire.batch import ExpertBatch

    class Replica:
        id, endpoints = "bench", {transport: f"127.0.0.1:{port}"}

    client = make_transport(transport, "fp32").connect(Replica())
    rows = {}
    for size in sizes:
        streamed, trips = iterations(size, quick)
        tokens = max(1, size // (EXPERT_HIDDEN * 4))
        batch = ExpertBatch(1, torch.ones(tokens, EXPERT_HIDDEN), torch.zeros(tokens, 8, dtype=torch.int32),
                            torch.ones(tokens, 8))
        client.submit(batch, 60).result()                  # connect / warm up
        start = time.perf_counter()
        for first in range(0, streamed, 4):
            for f in [client.submit(batch, 60) for _ in range(min(4, streamed - first))]:
                f.result()
        bandwidth = 2 * streamed * tokens * EXPERT_HIDDEN * 4 / (time.perf_counter() - start)  # both ways
        rtts = []
        for _ in range(trips):
            start = time.perf_counter()
            client.submit(batch, 60).result()
            rtts.append(time.perf_counter() - start)
        rows[size] = (bandwidth, statistics.median(rtts))
    idle = ExpertBatch(IDLE_LAYER, torch.ones(1, EXPERT_HIDDEN), torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8))
    cpu, wall = time.process_time(), time.perf_counter()
    rows["idle_cpu_server"] = float(client.submit(idle, 60).result()[0, 0])
    rows["idle_cpu"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
    client.close()
    return rows


# ---- gRPC: benchmark-only bytes servicer ----------------------------------------------------
def _grpc_handler():
    import grpc

    def echo(requests, context):
        yield from requests

    def sink(requests, context):
        count = sum(1 for _ in requests)
        yield count.to_bytes(8, "little")

    identity = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("bench.Bytes", {
        "Echo": grpc.stream_stream_rpc_method_handler(echo, **identity),
        "Sink": grpc.stream_stream_rpc_method_handler(sink, **identity),
    })


GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def serve_grpc() -> None:
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_grpc_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"READY {port}", flush=True)
    server.wait_for_termination()


def client_grpc(port: int, sizes: list[int], quick: bool) -> dict:
    import queue

    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    echo = channel.stream_stream("/bench.Bytes/Echo")
    sink = channel.stream_stream("/bench.Bytes/Sink")
    rows = {}
    for size in sizes:
        streamed, trips = iterations(size, quick)
        payload = torch.ones(size, dtype=torch.uint8).numpy().tobytes()   # the copy every real call pays
        start = time.perf_counter()
        list(sink(iter([payload] * streamed)))
        bandwidth = streamed * size / (time.perf_counter() - start)
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        replies = echo(iter(outbox.get, None))
        rtts = []
        for _ in range(trips):
            start = time.perf_counter()
            outbox.put(payload)
            next(replies)
            rtts.append(time.perf_counter() - start)
        outbox.put(None)
        rows[size] = (bandwidth, statistics.median(rtts))
    channel.close()
    return rows


def memcpy_rows(sizes: list[int], quick: bool) -> dict:
    rows = {}
    for size in sizes:
        streamed, trips = iterations(size, quick)
        src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(streamed):
            dst.copy_(src)
        bandwidth = streamed * size / (time.perf_counter() - start)
        rtts = []
        for _ in range(trips):
            start = time.perf_counter()
            dst.copy_(src)
            src.copy_(dst)
            rtts.append(time.perf_counter() - start)
        rows[size] = (bandwidth, statistics.median(rtts))
    return rows


# ---- orchestration -------------------------------------------------------------------------
def _start_server(role: str, env: dict) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, __file__, "--role", role], stdout=subprocess.PIPE,
                               env={**LAUNCH_ENV, **env}, text=True)
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} server exited (rc {process.wait()}) before it was ready")
        if line.startswith("READY "):
            return process, int(line.split()[1])
    _stop(process)
    raise RuntimeError(f"{role} server not ready within {READY_DEADLINE_S}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


def _measure(server_role: str, client_role: str, env: dict, quick: bool, sizes: list[int]) -> dict:
    server, port = _start_server(server_role, env)
    try:
        done = subprocess.run([sys.executable, __file__, "--role", client_role, "--port", str(port)]
                              + ["--sizes", _sizes_arg(sizes)] + (["--quick"] if quick else []),
                              env={**LAUNCH_ENV, **env},
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{client_role} failed: {done.stderr[-2000:]}")
        raw = json.loads(done.stdout.strip().splitlines()[-1])
        return {(int(k) if k.isdigit() else k): (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()}
    finally:
        _stop(server)


def _sizes_arg(sizes: list[int]) -> str:
    return ",".join(str(size >> 10) for size in sizes)


def _kib(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def print_table(results: dict[str, dict], reference: str, peer: str, sizes: list[int]) -> None:
    names = list(results)
    print(f"\n{'size':>8} | " + " | ".join(f"{n[:22]:>22}" for n in names))
    for what, index, unit in (("one-way GB/s", 0, 1e-9), ("round trip us", 1, 1e6)):
        print(f"-- {what}")
        for size in sizes:
            cells = [results[n].get(size, (float("nan"),) * 2)[index] * unit for n in names]
            print(f"{_kib(size):>8} | " + " | ".join(f"{c:>22.3f}" for c in cells))
    idle = {f"{n}{' (client)' if 'idle_cpu_server' in r else ''}": r["idle_cpu"]
            for n, r in results.items() if "idle_cpu" in r}
    idle.update({f"{n} (server)": r["idle_cpu_server"] for n, r in results.items() if "idle_cpu_server" in r})
    print("-- CPU-seconds per second while waiting: " + ", ".join(f"{n}: {v:.3f}" for n, v in idle.items()))
    print_ratios(results, reference, peer, sizes)


def print_ratios(results: dict[str, dict], reference: str, peer: str, sizes: list[int]) -> None:
    print(f"\n-- {reference} / {peer} (bandwidth ratio, >1 = {reference} faster; latency ratio, <1 = lower)")
    for size in sizes:
        ref, other = results[reference][size], results[peer][size]
        print(f"{_kib(size):>8}   bandwidth x{ref[0] / other[0]:.2f}   round trip x{ref[1] / other[1]:.2f}")


def print_wire_bytes() -> None:
    print("\n-- bytes on the wire per token per MoE layer (dispatch to one replica, reply from it; a token "
          "reaches at most top-k replicas)")
    print(f"{'model':>12} {'dtype':>5} | {'activations':>11} {'+ids,weights':>12} | {'combine':>7} | "
          f"{'act. vs fp32':>12} {'dispatch vs fp32':>16} | {'x top-k replicas':>16}")
    for model in (V3, TINY):
        hidden, topk = model["hidden"], model["topk"]
        base_act = dtypes.hidden_bytes_per_token(hidden, "fp32")
        base_msg = dtypes.dispatch_bytes_per_token(hidden, topk, "fp32")
        for dtype in ("fp32", "bf16", "fp8"):
            act = dtypes.hidden_bytes_per_token(hidden, dtype)
            msg = dtypes.dispatch_bytes_per_token(hidden, topk, dtype)
            back = dtypes.combine_bytes_per_token(hidden, dtype)
            print(f"{model['name']:>12} {dtype:>5} | {act:>11} {msg:>12} | {back:>7} | {act / base_act:>12.3f} "
                  f"{msg / base_msg:>16.3f} | {topk * (msg + back):>16}")
        assert dtypes.hidden_bytes_per_token(hidden, "fp8") <= 0.27 * base_act


OURS = "ucx expert (ours)"
OURS_GRPC = "grpc expert (ours)"   # the same expert path over our gRPC transport: the fallback
DEFAULT_UCX = {"UCXPY_PROGRESS_MODE": "thread", "UCXPY_ENABLE_PYTHON_FUTURE": "1"}   # UCXX asyncio's
UCX_VARIANTS = {   # name -> environment; the first two run in --quick
    "ucxx thread+futures": DEFAULT_UCX,
    "ucxx blocking, spin wait": {"UCXPY_PROGRESS_MODE": "blocking"},
    "ucxx thread, spin wait": {"UCXPY_PROGRESS_MODE": "thread", "UCXPY_ENABLE_PYTHON_FUTURE": "0"},
    "ucxx polling": {"UCXPY_PROGRESS_MODE": "polling"},
    "ucxx no delayed submit": {**DEFAULT_UCX, "UCXPY_ENABLE_DELAYED_SUBMISSION": "0"},
    "ucxx RNDV_THRESH=1mb": {**DEFAULT_UCX, "UCX_RNDV_THRESH": "1mb"},
    "ucxx worker-address ep": {**DEFAULT_UCX, "BENCH_BY_ADDRESS": "1"},
}
EXPERT_VARIANTS = {   # name -> environment; the first is ours as deployed, the only one in --quick
    OURS: {},
    # what ucx_runtime.UCX_DEFAULTS replace: UCXX's rendezvous threshold, UCX's TCP segments
    "ours, ucxx/UCX settings": {"UCX_RNDV_THRESH": "8192", "UCX_TCP_TX_SEG_SIZE": "8K", "UCX_TCP_RX_SEG_SIZE": "64K"},
    "ours, polling": {"UCXPY_PROGRESS_MODE": "polling"},
}


def orchestrate(quick: bool, sizes: list[int]) -> None:
    from services.transport.ucx_transport import ucx_available

    ok, version = ucx_available()
    if not ok:
        sys.exit(f"transport_bench: {version}")
    print(f"transport_bench: {version}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    results: dict[str, dict] = {}
    base_env = {"UCX_WARN_UNUSED_ENV_VARS": "n"}
    for name, env in list(EXPERT_VARIANTS.items())[:1 if quick else None]:
        results[name] = _measure("serve-ucx-expert", "client-ucx-expert", {**base_env, **env}, quick, sizes)
        print(f"measured {name}", flush=True)
    for name, env in list(UCX_VARIANTS.items())[:2 if quick else None]:
        role = "serve-ucx-address" if env.get("BENCH_BY_ADDRESS") else "serve-ucx"
        results[name] = _measure(role, "client-ucx", {**base_env, **env}, quick, sizes)
        print(f"measured {name}", flush=True)
    results[OURS_GRPC] = _measure("serve-grpc-expert", "client-grpc-expert", {}, quick, sizes)
    print(f"measured {OURS_GRPC}", flush=True)
    results["grpc bidi stream"] = _measure("serve-grpc", "client-grpc", {}, quick, sizes)
    results["torch copy_ (ceiling)"] = memcpy_rows(sizes, quick)
    print("note: the expert rows' bandwidth counts both directions (echo); round trip = submit -> result")
    print_table(results, OURS, "grpc bidi stream", sizes)
    print_ratios(results, OURS, OURS_GRPC, sizes)
    print_wire_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="orchestrate")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=_sizes_arg(SIZES), help="message sizes in KiB, comma-separated")
    args = parser.parse_args()
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # one intra-op thread everywhere: on a small shared box, OpenMP workers spin-waiting for a
    # descheduled sibling turned 64 KiB copies into 20 ms stalls
    torch.set_num_threads(1)
    by_address = os.environ.get("BENCH_BY_ADDRESS") == "1"
    sizes = [int(kib) << 10 for kib in args.sizes.split(",")]
    if args.role == "orchestrate":
        orchestrate(args.quick, sizes)
    elif args.role in ("serve-ucx", "serve-ucx-address"):
        serve_ucx_raw(args.role == "serve-ucx-address")
    elif args.role == "serve-ucx-expert":
        serve_ucx_expert()
    elif args.role == "serve-grpc-expert":
        serve_grpc_expert()
    elif args.role == "serve-grpc":
        serve_grpc()
    else:
        clients = {
            "client-ucx": lambda: asyncio.run(_ucx_client(args.port, sizes, args.quick, by_address)),
            "client-ucx-expert": lambda: client_expert("ucx", args.port, sizes, args.quick),
            "client-grpc-expert": lambda: client_expert("grpc", args.port, sizes, args.quick),
            "client-grpc": lambda: client_grpc(args.port, sizes, args.quick),
        }
        print(json.dumps(clients[args.role]()))


if __name__ == "__main__":
    main()

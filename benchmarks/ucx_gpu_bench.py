"""GPU0 -> GPU1 through UCXX (CUDA IPC over NVLink) vs torch.distributed NCCL, same run, same sizes.

    python3 benchmarks/ucx_gpu_bench.py                  # 2 GPUs of one host
    python3 benchmarks/ucx_gpu_bench.py --sizes-mib 1 16 256 --ucx-tls tcp,cuda_copy,cuda_ipc

Two processes (one per GPU, started here, stopped by PID). Each measures, for 1..256 MiB CUDA
tensors: one-way bandwidth (k sends streamed, one ack) and, at 256 KiB, the round trip (send,
get the same bytes back). UCX sends straight from / receives straight into torch CUDA tensors
through their __cuda_array_interface__ (uint8 views): no RMM, no CuPy, no host staging. NCCL uses
torch.distributed send/recv on the same tensors. It prints a table and UCX/NCCL ratios, plus what
UCX saw: the transports its context activated and, with --ucx-log info, UCX's own log of which
lanes each endpoint picked (look for cuda_ipc on the rendezvous lanes; tcp there means
staging through host memory, and explains a low figure).

Environment. Each process sees both GPUs with its own first (CUDA_VISIBLE_DEVICES rotated, as
dask-cuda does), because CUDA IPC opens the peer's memory on the local device and UCXX's progress
thread makes device 0 current. UCX_TLS defaults to tcp,cuda_copy,cuda_ipc (tcp only carries the
connection set-up and small control messages); UCX_RNDV_SCHEME=get_zcopy lets the receiver pull
over NVLink. NVLink multicast stays off (NCCL_NVLS_ENABLE=0) as the shared hosts require.

Wheels for CUDA 13 (torch cu130), none of them on the GPU image, same versions as here:
  ucxx-cu13, libucxx-cu13, libucx-cu13, rmm-cu13, librmm-cu13, rapids-logger
  (ucxx imports rmm; cuda-bindings, cuda-core, nvidia-ml-py, numpy are usually present already).
  For CUDA 12 use the -cu12 names. Install with: pip install --no-index --find-links WHEELS ucxx-cu13
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time

MIB = 1 << 20
RTT_BYTES = 256 << 10
SINK, ECHO, STOP = 1, 2, 3
READY_DEADLINE_S = 120.0


def _rotated_devices(rank: int, count: int) -> str:
    return ",".join(str((rank + i) % count) for i in range(count))


def _set_env(rank: int, args) -> None:
    """Before importing torch / ucxx in the child: its GPU first, UCX transports, NVLS off."""
    os.environ["CUDA_VISIBLE_DEVICES"] = _rotated_devices(rank, args.gpus)
    os.environ.setdefault("UCX_TLS", args.ucx_tls)
    os.environ.setdefault("UCX_RNDV_SCHEME", "get_zcopy")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCXPY_PROGRESS_MODE", "thread")
    os.environ.setdefault("UCXPY_ENABLE_PYTHON_FUTURE", "1")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    if args.ucx_log:
        os.environ["UCX_LOG_LEVEL"] = args.ucx_log
        os.environ["UCX_PROTO_INFO"] = "y"    # UCX >= 1.15: prints each protocol choice (tl/dev, size ranges)


def _counts(size: int) -> int:
    return max(4, min(50, (2 << 30) // size))


async def _ucx_receiver(port_out, sizes: list[int], window: int) -> None:
    """Rank 1: listener; receives into preallocated GPU1 tensors, acks / echoes."""
    import torch
    import ucxx

    done = asyncio.Event()

    async def serve(ep):
        control = torch.zeros(3, dtype=torch.int64)
        buffers = {size: [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(window)]
                   for size in sizes + [RTT_BYTES]}
        while True:
            await ep.recv(control.numpy())
            mode, size, count = (int(v) for v in control)
            if mode == STOP:
                break
            if mode == ECHO:
                buf = buffers[size][0]
                for _ in range(count):
                    await ep.recv(buf)
                    await ep.send(buf)
            else:  # up to `window` receives posted at once, matching the sender's sends in flight
                for first in range(0, count, window):
                    await asyncio.gather(*(ep.recv(b) for b in buffers[size][: min(window, count - first)]))
            if mode == SINK:
                torch.cuda.synchronize()
                await ep.send(torch.tensor([count], dtype=torch.int64).numpy())
        done.set()

    listener = ucxx.create_listener(serve, 0)
    port_out.send(listener.port)
    await done.wait()
    listener.close()
    ucxx.stop_notifier_thread()   # not a daemon thread: it would keep the process alive


async def _ucx_sender(port: int, sizes: list[int], rtt_trips: int, window: int) -> dict:
    """Rank 0: connects, streams GPU0 tensors, times the acks and the 256 KiB echo."""
    import torch
    import ucxx

    ep = await ucxx.create_endpoint("127.0.0.1", port)
    result = {"transports": sorted(ucxx.get_active_transports()), "bandwidth": {}}
    ack = torch.empty(1, dtype=torch.int64)
    for size in sizes:
        count = _counts(size)
        src = torch.full((size,), 7, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        await ep.send(torch.tensor([SINK, size, 1], dtype=torch.int64).numpy())   # warm-up (IPC handle cache)
        await ep.send(src)
        await ep.recv(ack.numpy())
        await ep.send(torch.tensor([SINK, size, count], dtype=torch.int64).numpy())
        start = time.perf_counter()
        for first in range(0, count, window):  # `window` sends in flight, as a dispatch to many peers is
            await asyncio.gather(*(ep.send(src) for _ in range(min(window, count - first))))
        await ep.recv(ack.numpy())
        result["bandwidth"][size] = count * size / (time.perf_counter() - start)
    src = torch.full((RTT_BYTES,), 3, dtype=torch.uint8, device="cuda")
    back = torch.empty_like(src)
    await ep.send(torch.tensor([ECHO, RTT_BYTES, rtt_trips], dtype=torch.int64).numpy())
    trips = []
    for _ in range(rtt_trips):
        start = time.perf_counter()
        await ep.send(src)
        await ep.recv(back)
        trips.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    if not torch.equal(back, src):
        raise RuntimeError("UCX echo returned different bytes: the CUDA path is broken")
    await ep.send(torch.tensor([STOP, 0, 0], dtype=torch.int64).numpy())
    result["rtt"] = statistics.median(trips[len(trips) // 5:])   # drop the first fifth (warm-up)
    await ep.close()
    ucxx.stop_notifier_thread()   # not a daemon thread: it would keep the process alive
    return result


def _nccl(rank: int, sizes: list[int], rtt_trips: int, store_port: int) -> dict:
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", 0))
    peer = 1 - rank
    result = {"bandwidth": {}}
    for size in sizes:
        count = _counts(size)
        buf = torch.full((size,), 5, dtype=torch.uint8, device="cuda")
        for timed in (False, True):     # first pass warms up NCCL's P2P channel for this peer
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(count if timed else 1):
                dist.send(buf, peer) if rank == 0 else dist.recv(buf, peer)
            torch.cuda.synchronize()
            dist.barrier()              # the sender's clock stops only once the receiver has it all
            elapsed = time.perf_counter() - start
        result["bandwidth"][size] = count * size / elapsed
    buf = torch.full((RTT_BYTES,), 1, dtype=torch.uint8, device="cuda")
    dist.barrier()
    trips = []
    for _ in range(rtt_trips):
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)
        torch.cuda.synchronize()
        trips.append(time.perf_counter() - start)
    result["rtt"] = statistics.median(trips[len(trips) // 5:])
    dist.destroy_process_group()
    return result


def _rank_main(rank: int, args, port_pipe, result_pipe) -> None:
    _set_env(rank, args)
    import torch

    torch.cuda.set_device(0)
    sizes = [m * MIB for m in args.sizes_mib]
    try:
        if rank == 1:
            asyncio.run(_ucx_receiver(port_pipe, sizes, args.window))
            ucx = None
        else:
            if not port_pipe.poll(READY_DEADLINE_S):
                raise RuntimeError(f"the UCX listener did not start within {READY_DEADLINE_S}s")
            ucx = asyncio.run(_ucx_sender(port_pipe.recv(), sizes, args.rtt_trips, args.window))
        nccl = _nccl(rank, sizes, args.rtt_trips, args.store_port)
        result_pipe.send({"rank": rank, "ucx": ucx, "nccl": nccl, "gpu": torch.cuda.get_device_name(0)})
    except Exception as err:  # noqa: BLE001 - reported to the parent, which prints and fails
        result_pipe.send({"rank": rank, "error": f"{type(err).__name__}: {err}"})
        raise


def _ucx_info(args) -> str:
    """`ucx_info -d` filtered to the transports, for the record (the wheel ships the binary)."""
    import shutil
    import subprocess

    try:
        import libucx
        binary = os.path.join(os.path.dirname(libucx.__file__), "bin", "ucx_info")
    except ImportError:
        binary = shutil.which("ucx_info") or ""
    if not os.path.exists(binary):
        return "ucx_info not found"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": _rotated_devices(0, args.gpus)}
    out = subprocess.run([binary, "-d"], capture_output=True, text=True, timeout=60, env=env).stdout
    return ", ".join(sorted({line.split(":")[1].strip() for line in out.splitlines() if "Transport:" in line}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--rtt-trips", type=int, default=200)
    parser.add_argument("--window", type=int, default=1, help="UCX sends in flight at once (bandwidth runs)")
    parser.add_argument("--ucx-tls", default="tcp,cuda_copy,cuda_ipc")
    parser.add_argument("--ucx-log", default="", help="UCX_LOG_LEVEL for the ranks, e.g. info")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs on the host (the first two are used)")
    parser.add_argument("--store-port", type=int, default=29531)
    args = parser.parse_args()

    print(f"UCX transports the wheel can drive here (ucx_info -d): {_ucx_info(args)}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    port_parent, port_child = ctx.Pipe()
    results, children = ctx.Queue(), []
    for rank, pipe in ((1, port_child), (0, port_parent)):
        writer = _QueueWriter(results)
        children.append(ctx.Process(target=_rank_main, args=(rank, args, pipe, writer), name=f"rank{rank}"))
        children[-1].start()
    reports = {}
    try:
        deadline = time.monotonic() + 600
        while len(reports) < 2 and time.monotonic() < deadline:
            try:
                report = results.get(timeout=5)
            except queue.Empty:  # check that both ranks still live
                if any(c.exitcode not in (None, 0) for c in children):
                    break
                continue
            reports[report["rank"]] = report
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                os.kill(child.pid, 9)
                child.join(10)
    errors = [r["error"] for r in reports.values() if "error" in r]
    if errors or len(reports) < 2:
        print(f"FAILED: {errors or 'a rank died without a report'}", file=sys.stderr)
        return 1
    _print(reports[0], args)
    return 0


class _QueueWriter:
    """A send()-able wrapper so a rank reports through the shared queue like through a pipe."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def send(self, item) -> None:
        self.queue.put(item)


def _print(report: dict, args) -> None:
    ucx, nccl = report["ucx"], report["nccl"]
    print(f"GPU: {report['gpu']} x2; UCX_TLS={args.ucx_tls}; UCX context transports: {', '.join(ucx['transports'])}")
    print(f"{'size':>8} | {'UCX GB/s':>9} | {'NCCL GB/s':>9} | {'UCX/NCCL':>8}")
    for size in sorted(ucx["bandwidth"]):
        u, n = ucx["bandwidth"][size], nccl["bandwidth"][size]
        print(f"{size // MIB:>5} MiB | {u / 1e9:>9.2f} | {n / 1e9:>9.2f} | {u / n:>8.2f}")
    print(f"round trip {RTT_BYTES >> 10} KiB: UCX {ucx['rtt'] * 1e6:.1f} us, NCCL {nccl['rtt'] * 1e6:.1f} us, "
          f"UCX/NCCL {ucx['rtt'] / nccl['rtt']:.2f}")
    print(json.dumps({"ucx": ucx, "nccl": nccl}))


if __name__ == "__main__":
    sys.exit(main())

"""An attention worker: the non-expert weights, a latent KV-cache pool, continuous batching,
and routed experts served by remote shards through the routing plan (and any it holds itself)."""

from __future__ import annotations

import logging
import time

import redis
import torch
from torch.torch_version import TorchVersion

from model.checkpoint import load_expert_banks, load_model
from model.compiled_decode import CompiledDecoder
from model.generate import Engine
from model.moe import MoE
from model.tokenizer import TextCodec
from services.attention.dispatch import Dispatcher, LocalExperts, PlanHolder, RemoteExperts
from services.attention.scheduler import Scheduler
from services.common.expert_ids import format_id_list
from services.common.logging import event, get_logger
from services.common.plan import Plan
from services.common.redis_poller import RedisPoller
from services.common.redis_store import Keys, LoadRecorder, read_plan
from services.transport.base import Transport

log = get_logger("attention.worker")

# the first torch whose compiled graphs pass a dispatch failure on to the caller (2.13.0, pinned)
COMPILED_REMOTE_EXPERTS_TORCH = "2.13"


class PlanWatcher:
    """Reads the routing plan the router writes to Redis, every `interval_s` (a `RedisPoller`);
    while Redis is away the last plan stays in use."""

    def __init__(self, client: redis.Redis, keys: Keys, holder: PlanHolder, interval_s: float = 0.5):
        self.client, self.keys, self.holder = client, keys, holder
        self.version = 0
        self.poller = RedisPoller("plan-watch", self.poll, interval_s=interval_s, while_down="serving on the last plan")

    def poll(self) -> None:
        with self.poller.attempt():
            found = read_plan(self.client, self.keys)
        if self.poller.outage:
            return
        if found is not None and found[0] != self.version:
            self.holder.set(Plan.from_json(found[1]))
            self.version = found[0]
            event(log, "plan updated", version=self.version)

    def start(self) -> "PlanWatcher":
        """Read the plan now, then every interval on the poller's thread."""
        self.poll()
        self.poller.start()
        return self

    def stop(self) -> None:
        self.poller.close()


class AttentionWorker:
    def __init__(self, model_dir: str, transport: Transport, *, plane: int, dtype: str | None, device: str,
                 cache_tokens: int, max_batch: int, dispatch_timeout_s: float = 10.0, compile_decode: bool = False,
                 local_experts: list[int] | None = None, load_recorder: LoadRecorder | None = None):
        """compile_decode: CPU decode steps of up to 16 sequences run graphs compiled by
        torch.compile, each compiled here before serving (see `CompiledDecoder`).
        local_experts: routed experts this worker computes from its own copy of their weights
        (`LocalExperts`), their tokens counted into `load_recorder`."""
        if compile_decode and TorchVersion(torch.__version__) < COMPILED_REMOTE_EXPERTS_TORCH:
            # 2.11's C++ wrapper crashed the process when a dispatch failed inside the graph
            raise ValueError(f"--compile-decode needs torch >= {COMPILED_REMOTE_EXPERTS_TORCH} (this is {torch.__version__})")
        self.model = load_model(model_dir, dtype=dtype, device=device, with_routed_experts=False)
        self.cfg = self.model.cfg
        self.codec = TextCodec.for_model(model_dir)
        self.plans = PlanHolder(plane)
        local = None
        if local_experts:
            started = time.monotonic()
            banks = load_expert_banks(model_dir, {layer: local_experts for layer in self.cfg.moe_layers},
                                      dtype=dtype, device=device)
            local = LocalExperts(banks, self.cfg.n_routed_experts, load_recorder)
            event(log, "local experts loaded", experts=format_id_list(local_experts), layers=len(banks),
                  bytes=sum(p.numel() * p.element_size() for bank in banks.values() for p in bank.parameters()),
                  seconds=round(time.monotonic() - started, 2))
        self.dispatcher = Dispatcher(transport, self.plans, timeout_s=dispatch_timeout_s, local=local)
        for block in self.model.layers:
            if isinstance(block.ffn, MoE):
                block.ffn.experts = RemoteExperts(block.layer, self.dispatcher)
        self.engine = Engine(self.model, cache_tokens=cache_tokens, max_batch=max_batch, compile_cpu=compile_decode)
        if compile_decode and self.engine.device.type != "cpu":
            event(log, "--compile-decode applies to CPU workers only; ignored", level=logging.WARNING,
                  device=str(self.engine.device))
        if isinstance(self.engine.graphs, CompiledDecoder):
            started = time.monotonic()
            event(log, "compiling decode graphs before serving (~20-45 s each on CPU)")
            with self.dispatcher.rehearsal():
                self.engine.graphs.warm_up(max_batch)
            event(log, "decode graphs compiled", seconds=round(time.monotonic() - started, 1))
        self.scheduler = Scheduler(self.engine, step_wait_seconds=lambda: self.dispatcher.wait_seconds,
                                   step_context=self.dispatcher.failures_surfaced)

    def stop(self, grace_s: float) -> None:
        self.scheduler.stop(grace_s)
        self.dispatcher.close()

"""Generation: request validation, sampling, and a continuous-batching engine over the latent cache.

`Engine` is the single-process reference generator and also the core of an attention worker:
new requests join the running batch between steps (each is prefilled on its own through the
naive MLA path), every step decodes one token for all running sequences through the absorbed
path, and finished sequences leave and free their cache blocks at once.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig
from model.compiled_decode import CompiledDecoder
from model.cuda_graph import GraphDecoder
from model.errors import InputError
from model.kv_cache import CacheFull
from model.transformer import Transformer


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = no limit
    seed: int | None = None  # same seed, same tokens

    def validate(self) -> None:
        if not self.temperature >= 0 or self.temperature != self.temperature:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    request_id: str = ""

    def validate(self, cfg: ModelConfig) -> None:
        if not self.prompt:
            raise InputError("prompt is empty")
        bad = [t for t in self.prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        bad = [t for t in self.stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"stop token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        total = len(self.prompt) + self.max_new_tokens
        if total > cfg.max_position_embeddings:
            raise InputError(
                f"prompt ({len(self.prompt)} tokens) + max_new_tokens ({self.max_new_tokens}) = {total} "
                f"exceeds the context limit of {cfg.max_position_embeddings}"
            )
        self.sampling.validate()


@dataclass
class TokenEvent:
    """One generated token of one sequence, as produced by a step."""

    seq: "Sequence"
    token: int
    logprob: float
    finish_reason: str | None  # None while running; "stop" or "length" on the last token


@dataclass
class Sequence:
    id: int
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def cached_tokens(self) -> int:
        """Tokens in the cache: the prompt plus all generated tokens but the last (not yet fed)."""
        return len(self.request.prompt) + len(self.tokens) - 1


def _new_generator(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """logits: [V] fp32 -> (token, log-probability of that token under the unmodified model)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if sampling.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    scaled = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scaled, min(sampling.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])


def sample_rows(logits: torch.Tensor, rows: list[tuple[SamplingParams, torch.Generator | None]]) -> list[tuple[int, float]]:
    """logits: [B, V] -> `sample` of each row under its own (sampling, generator). Greedy rows
    share one log-softmax, its max and the host copies: per row, those add up over a batch on CPU
    (docs/performance.md), and cost a host synchronisation each on a GPU."""
    best, tokens = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)  # [B], [B]: the argmax and its logprob
    greedy = list(zip(tokens.tolist(), best.tolist()))
    return [greedy[i] if sampling.temperature == 0 else sample(logits[i], sampling, generator) for i, (sampling, generator) in enumerate(rows)]


class Engine:
    """Continuous batching over one model and one latent cache; single-threaded by design."""

    def __init__(
        self, model: Transformer, cache_tokens: int = 16384, max_batch: int = 64, cuda_graphs: bool = True, compile_cpu: bool = False
    ):
        """On CUDA, decode steps replay captured graphs (prefill stays eager) while the routed
        experts are local. With `compile_cpu`, CPU decode steps of up to 16 sequences run graphs
        compiled by torch.compile (`CompiledDecoder`: several times faster at small batches, see
        docs/performance.md, after ~20-45 s of compiling per graph on first use, so it suits
        long-running generators). CUDA graphs need local experts; compiled CPU steps also call
        remote ones (an attention worker's, through custom operators). Otherwise decode runs
        eagerly. Every way lays out the absorbed attention weights once, here."""
        self.model = model
        self.cfg = model.cfg
        self.device = model.head.weight.device
        self.cache = model.new_cache(cache_tokens)
        model.prepare_decode()
        if cuda_graphs and self.device.type == "cuda":
            self.graphs: GraphDecoder | CompiledDecoder | None = GraphDecoder(model, self.cache)
        elif compile_cpu and self.device.type == "cpu":
            if not CompiledDecoder.available():
                raise ValueError("compiling CPU decode steps needs a C++ compiler (g++, c++ or clang++, or $CXX) on PATH")
            self.graphs = CompiledDecoder(model, self.cache)
        else:
            self.graphs = None
        self.max_batch = max_batch
        # how the last step decoded: "graph" (a captured CUDA graph or a compiled one), "eager",
        # or None when it only admitted
        self.decoded_by: str | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    # ---- admission -------------------------------------------------------------------------
    def budget(self, request: GenerationRequest) -> int:
        return len(request.prompt) + request.max_new_tokens

    def add(self, request: GenerationRequest) -> Sequence:
        """Queue a validated request; raises InputError for bad input and CacheFull when the
        request could never fit in this cache, however long it waited."""
        request.validate(self.cfg)
        need = self.budget(request)
        if need > self.cache.capacity_tokens:
            raise CacheFull(f"request needs {need} KV-cache tokens; this cache holds {self.cache.capacity_tokens}")
        seq = Sequence(next(self._ids), request, _new_generator(request.sampling, self.device))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its cache blocks now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free(seq.id)
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ---- stepping --------------------------------------------------------------------------
    def _record(self, seq: Sequence, token: int, logprob: float) -> TokenEvent:
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if token in seq.request.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.request.max_new_tokens:
            seq.finish_reason = "length"
        return TokenEvent(seq, token, logprob, seq.finish_reason)

    def _admit(self) -> list[TokenEvent]:
        events = []
        while self.waiting and len(self.running) < self.max_batch and self.cache.fits(self.budget(self.waiting[0].request)):
            seq = self.waiting.popleft()
            self.cache.allocate(seq.id, self.budget(seq.request))
            prompt = torch.tensor(seq.request.prompt, dtype=torch.long, device=self.device)
            logits = self.model.prefill(prompt, self.cache, seq.id)[-1]
            events.append(self._record(seq, *sample(logits, seq.request.sampling, seq.generator)))
            self.running.append(seq)
        return events

    def _decode(self, batch: list[Sequence]) -> list[TokenEvent]:
        tokens = torch.tensor([s.tokens[-1] for s in batch], dtype=torch.long, device=self.device)
        ids, lengths = [s.id for s in batch], [s.cached_tokens for s in batch]
        if self.graphs is not None and self.graphs.handles(len(batch)):
            logits = self.graphs.decode(tokens, ids, lengths)
            self.decoded_by = "graph"
        else:
            logits = self.model.decode(tokens, self.cache, ids, lengths)
            self.decoded_by = "eager"
        picks = sample_rows(logits, [(s.request.sampling, s.generator) for s in batch])
        return [self._record(s, token, logprob) for s, (token, logprob) in zip(batch, picks)]

    def step(self) -> list[TokenEvent]:
        """Admit what fits (prefill gives each its first token), then one decode step for the
        sequences that were already running. Finished sequences leave and free their cache."""
        decoding = [s for s in self.running if s.finish_reason is None]
        self.decoded_by = None
        events = self._admit()
        if decoding:
            events += self._decode(decoding)
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self.running.remove(seq)
            self.cache.free(seq.id)
        return events

    def generate(self, requests: list[GenerationRequest]) -> list[Sequence]:
        """Run requests to completion (the in-process reference generator)."""
        seqs = [self.add(r) for r in requests]
        while not self.idle:
            if not self.step() and self.waiting and not self.running:
                raise CacheFull("waiting requests cannot be admitted into an empty cache")
        return seqs

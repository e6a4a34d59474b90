"""The attention worker's scheduler and the engine's admission, in process: the real `Scheduler`
driving a real `Engine` and latent cache (admission by cache and batch size is the engine's) over
a scripted model (no weights: every call picks token 7 and records what it was asked), each
engine step let through by the test. What is
asserted is what a worker promises its callers: first come first served, never more than
max_batch decoding together, a request that can never fit refused at once and one that fits
later kept waiting, cache freed on completion, cancellation, deadlines and failed steps."""

from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from model.errors import InputError
from model.generate import Engine, GenerationRequest
from model.kv_cache import LatentKVCache
from services.attention.scheduler import RequestHandle, Scheduler
from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from support import wait_until

TOKEN = 7
VOCAB = 32
BLOCK = 16  # the cache's block size: budgets are reserved in whole blocks


class ScriptedModel:
    """What `Engine` calls on a Transformer, without one. `calls` records ("prefill", seq id) and
    ("decode", [seq ids]) in order; `fail_next_decode` makes the next decode raise it."""

    def __init__(self, context: int = 256):
        self.cfg = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=context)
        self.head = SimpleNamespace(weight=torch.zeros(1))
        self.calls: list[tuple[str, object]] = []
        self.fail_next_decode: Exception | None = None

    def new_cache(self, capacity_tokens: int, block_size: int = BLOCK) -> LatentKVCache:
        return LatentKVCache(1, capacity_tokens, 1, torch.float32, block_size=block_size)

    def prepare_decode(self) -> None:
        """A Transformer lays out its absorbed attention weights here; there are none."""

    @staticmethod
    def _logits(rows: int) -> torch.Tensor:
        logits = torch.zeros(rows, VOCAB)
        logits[:, TOKEN] = 1.0
        return logits

    def prefill(self, tokens: torch.Tensor, cache: LatentKVCache, seq: int) -> torch.Tensor:
        assert cache.holds(seq), "prefilled before its cache blocks were reserved"
        self.calls.append(("prefill", seq))
        return self._logits(tokens.numel())

    def decode(self, tokens: torch.Tensor, cache: LatentKVCache, seqs: list[int], lengths: list[int]) -> torch.Tensor:
        if self.fail_next_decode is not None:
            error, self.fail_next_decode = self.fail_next_decode, None
            raise error
        self.calls.append(("decode", list(seqs)))
        return self._logits(len(seqs))

    def decodes(self) -> list[list[int]]:
        return [seqs for kind, seqs in self.calls if kind == "decode"]

    def prefills(self) -> list[int]:
        return [seq for kind, seq in self.calls if kind == "prefill"]


class Steps:
    """The scheduler's step context: each engine step waits until the test lets it through, so
    what joins which step is decided by the test, not by timing. `waiting` is set while the step
    thread stands at the gate (everything submitted before then was taken in for that step)."""

    def __init__(self):
        self._allowed = threading.Semaphore(0)
        self._done = threading.Condition()
        self.finished = 0
        self.waiting = threading.Event()
        self.free = False

    @contextlib.contextmanager
    def __call__(self):
        self.waiting.set()
        if not self.free:
            assert self._allowed.acquire(timeout=20), "the test never let this step through"
        self.waiting.clear()
        try:
            yield
        finally:
            with self._done:
                self.finished += 1
                self._done.notify_all()

    def run(self, n: int = 1) -> None:
        """Let `n` steps through and return once they have run, their events are published and the
        next step is at the gate (what the intake before it finished is published after it)."""
        target = self.finished + n
        self.waiting.clear()
        for _ in range(n):
            self._allowed.release()
        with self._done:
            assert self._done.wait_for(lambda: self.finished >= target, timeout=20), "steps did not run"
        wait_until(self.waiting.is_set, 20, "the next step at the gate")

    def run_freely(self) -> None:
        self.free = True
        self._allowed.release()


class Published:
    """The scheduler's publish callback: every event, and what each request received."""

    def __init__(self):
        self.events: list[tuple[RequestHandle, str, object]] = []
        self._lock = threading.Lock()

    def __call__(self, events) -> None:
        with self._lock:
            self.events.extend(events)

    def of(self, handle: RequestHandle) -> list[tuple[str, object]]:
        with self._lock:
            return [(kind, payload) for h, kind, payload in self.events if h is handle]

    def tokens(self, handle: RequestHandle) -> int:
        return sum(kind == "token" for kind, _ in self.of(handle))

    def end(self, handle: RequestHandle) -> tuple[str, object] | None:
        """("final", Sequence) or ("error", ServiceError), once the request has ended."""
        ends = [(kind, payload) for kind, payload in self.of(handle) if kind != "token"]
        assert len(ends) <= 1, f"a request ended twice: {ends}"
        return ends[0] if ends else None

    def wait_end(self, handle: RequestHandle, timeout: float = 20) -> tuple[str, object]:
        return wait_until(lambda: self.end(handle), timeout, f"request {handle.request.request_id!r} to end")

    def order(self, kind: str) -> list[str]:
        """Request ids in the order their events of `kind` were published."""
        with self._lock:
            return [h.request.request_id for h, k, _ in self.events if k == kind]


def request(name: str, prompt: int, new: int) -> GenerationRequest:
    """A request needing prompt + new cache tokens."""
    return GenerationRequest(prompt=tuple(range(1, prompt + 1)), max_new_tokens=new, request_id=name)


@pytest.fixture
def start_scheduler():
    """start_scheduler(cache_tokens, max_batch) -> (scheduler, model, steps, published): started,
    its steps held at the gate; at the end the steps run freely and the scheduler stops."""
    made = []

    def build(cache_tokens: int = 1024, max_batch: int = 8):
        model, steps, published = ScriptedModel(), Steps(), Published()
        scheduler = Scheduler(Engine(model, cache_tokens=cache_tokens, max_batch=max_batch), step_context=steps)
        made.append((scheduler, steps))
        return scheduler.start(published), model, steps, published

    yield build
    for scheduler, steps in made:
        steps.run_freely()
        scheduler.stop(timeout=0.0)


def test_a_request_larger_than_the_whole_cache_is_refused_at_submit_and_never_queued(start_scheduler):
    scheduler, model, _, _ = start_scheduler(cache_tokens=64)
    with pytest.raises(ResourceExhausted, match="needs 108 KV-cache tokens; this worker holds 64"):
        scheduler.submit(request("huge", 8, 100), deadline=None)
    with pytest.raises(InputError, match="outside the vocabulary"):
        scheduler.submit(GenerationRequest(prompt=(VOCAB,), max_new_tokens=4), deadline=None)
    assert scheduler.load() == {"active": 0, "queued": 0, "kv_used": 0, "kv_total": 64}
    assert model.calls == []


def test_requests_that_fit_one_at_a_time_wait_their_turn_in_order_and_all_complete(start_scheduler):
    # 38 tokens each: 3 of the 4 blocks, so two are never resident together
    scheduler, model, steps, published = start_scheduler(cache_tokens=64)
    steps.run_freely()
    handles = [scheduler.submit(request(name, 8, 30), deadline=None) for name in "abc"]
    ends = [published.wait_end(h) for h in handles]
    assert [kind for kind, _ in ends] == ["final"] * 3
    assert [published.tokens(h) for h in handles] == [30, 30, 30]
    assert [seq.finish_reason for _, seq in ends] == ["length"] * 3
    # each was prefilled only after the one before had finished and freed its blocks
    assert model.prefills() == [h.seq.id for h in handles]
    assert all(len(batch) == 1 for batch in model.decodes())
    assert published.order("final") == ["a", "b", "c"]
    for before, after in zip(handles, handles[1:]):
        last_of_before = max(i for i, call in enumerate(model.calls) if call == ("decode", [before.seq.id]))
        assert model.calls.index(("prefill", after.seq.id)) > last_of_before
    assert wait_until(lambda: scheduler.load() == {"active": 0, "queued": 0, "kv_used": 0, "kv_total": 64},
                      what="an idle, empty cache")


def test_no_step_decodes_more_than_max_batch_and_admission_is_first_come_first_served(start_scheduler):
    scheduler, model, steps, published = start_scheduler(cache_tokens=1024, max_batch=2)
    handles = [scheduler.submit(request(f"r{i}", 4, new), deadline=None) for i, new in enumerate([3, 6, 2, 5, 4])]
    steps.run_freely()
    for h in handles:
        assert published.wait_end(h)[0] == "final"
    assert [published.tokens(h) for h in handles] == [3, 6, 2, 5, 4]
    assert model.prefills() == [h.seq.id for h in handles]
    batches = model.decodes()
    assert max(len(batch) for batch in batches) == 2  # batched, never past the limit
    assert all(len(set(batch)) == len(batch) for batch in batches)


def test_a_request_joins_the_running_batch_at_the_next_step(start_scheduler):
    scheduler, model, steps, published = start_scheduler()
    a = scheduler.submit(request("a", 4, 10), deadline=None)
    steps.run()                                  # a is taken in and prefilled
    assert model.calls == [("prefill", a.seq.id)]
    b = scheduler.submit(request("b", 4, 10), deadline=None)
    assert scheduler.load()["queued"] == 1
    steps.run()                                  # b was submitted after this step's intake: a decodes alone
    steps.run()                                  # b is prefilled beside a's decode
    steps.run()                                  # then they decode together
    assert model.calls == [("prefill", a.seq.id), ("decode", [a.seq.id]), ("prefill", b.seq.id),
                           ("decode", [a.seq.id]), ("decode", [a.seq.id, b.seq.id])]
    assert scheduler.load() == {"active": 2, "queued": 0, "kv_used": 2 * BLOCK, "kv_total": 1024}
    assert (published.tokens(a), published.tokens(b)) == (4, 2)


def test_cancelling_a_running_request_frees_its_cache_for_the_one_waiting(start_scheduler):
    scheduler, model, steps, published = start_scheduler(cache_tokens=64)
    a = scheduler.submit(request("a", 8, 30), deadline=None)
    b = scheduler.submit(request("b", 8, 30), deadline=None)
    steps.run(2)
    assert scheduler.load() == {"active": 1, "queued": 1, "kv_used": 48, "kv_total": 64}
    scheduler.cancel(a)
    scheduler.cancel(a)                          # twice is once
    steps.run(2)                                 # a decodes once more, is dropped at the next intake,
    kind, seq = published.end(a)                 # and b is admitted into its blocks
    assert kind == "final" and seq.finish_reason == "cancelled" and published.tokens(a) == 3
    assert model.prefills() == [a.seq.id, b.seq.id]
    assert scheduler.load() == {"active": 1, "queued": 0, "kv_used": 48, "kv_total": 64}
    steps.run_freely()
    assert published.wait_end(b)[0] == "final" and published.tokens(b) == 30
    assert all(a.seq.id not in batch for batch in model.decodes()[2:])


def test_a_request_cancelled_while_waiting_is_never_prefilled(start_scheduler):
    scheduler, model, steps, published = start_scheduler(cache_tokens=64)
    a = scheduler.submit(request("a", 8, 30), deadline=None)
    b = scheduler.submit(request("b", 8, 30), deadline=None)
    steps.run()
    scheduler.cancel(b)
    steps.run(2)
    assert published.end(b)[0] == "final" and published.tokens(b) == 0
    assert scheduler.load() == {"active": 1, "queued": 0, "kv_used": 48, "kv_total": 64}
    steps.run_freely()
    assert published.wait_end(a)[0] == "final"
    assert model.prefills() == [a.seq.id]


def test_a_deadline_passing_mid_stream_fails_the_request_and_frees_its_cache(start_scheduler):
    scheduler, model, steps, published = start_scheduler(cache_tokens=64)
    a = scheduler.submit(request("a", 8, 30), deadline=time.monotonic() + 600)
    b = scheduler.submit(request("b", 8, 30), deadline=None)
    steps.run(3)
    a.deadline = time.monotonic() - 1.0          # as if 600 s had gone by
    steps.run(2)
    kind, error = published.end(a)
    assert kind == "error" and isinstance(error, DeadlineExceeded) and published.tokens(a) == 4
    assert model.prefills() == [a.seq.id, b.seq.id]
    steps.run_freely()
    assert published.wait_end(b)[0] == "final"


def test_a_request_whose_deadline_passed_while_queued_is_never_prefilled(start_scheduler):
    scheduler, model, steps, published = start_scheduler()
    late = scheduler.submit(request("late", 4, 5), deadline=time.monotonic() - 1.0)
    steps.run_freely()
    kind, error = published.wait_end(late)
    assert kind == "error" and isinstance(error, DeadlineExceeded)
    assert model.calls == [] and scheduler.load()["kv_used"] == 0


@pytest.mark.parametrize("failure, message", [(Unavailable("no live replica for expert 3"), "no live replica"),
                                              (RuntimeError("boom"), "worker step failed: boom")])
def test_a_failed_step_fails_the_sequences_in_it_and_the_waiting_one_still_completes(start_scheduler, failure, message):
    scheduler, model, steps, published = start_scheduler(cache_tokens=64)
    a = scheduler.submit(request("a", 8, 30), deadline=None)
    b = scheduler.submit(request("b", 8, 30), deadline=None)
    steps.run(2)
    model.fail_next_decode = failure
    steps.run()
    kind, error = published.end(a)
    assert kind == "error" and isinstance(error, Unavailable) and message in str(error)
    assert published.end(b) is None
    steps.run_freely()
    assert published.wait_end(b)[0] == "final" and published.tokens(b) == 30
    assert wait_until(lambda: scheduler.load()["kv_used"] == 0, what="the cache freed")


def test_stop_lets_sequences_in_flight_finish_within_the_grace(start_scheduler):
    scheduler, _, steps, published = start_scheduler()
    a = scheduler.submit(request("a", 4, 20), deadline=None)
    steps.run_freely()
    scheduler.stop(timeout=20)
    assert published.end(a)[0] == "final" and published.tokens(a) == 20
    with pytest.raises(Unavailable, match="shutting down"):
        scheduler.submit(request("b", 4, 5), deadline=None)


def test_stop_past_the_grace_fails_what_is_left_with_unavailable(start_scheduler):
    scheduler, _, steps, published = start_scheduler(cache_tokens=64)
    a = scheduler.submit(request("a", 8, 30), deadline=None)
    b = scheduler.submit(request("b", 8, 30), deadline=None)
    steps.run()
    stopping = threading.Thread(target=scheduler.stop, kwargs={"timeout": 0.0})
    stopping.start()
    # the step at the gate is the last one once stop is requested: submissions start failing then
    wait_until(lambda: _refused(scheduler), 20, "submissions refused")
    steps.run_freely()
    stopping.join(20)
    assert not stopping.is_alive()
    for handle in (a, b):
        kind, error = published.end(handle)
        assert kind == "error" and isinstance(error, Unavailable) and "shutting down" in str(error)


def _refused(scheduler: Scheduler) -> bool:
    try:
        probe = scheduler.submit(request("probe", 1, 1), deadline=None)
    except Unavailable:
        return True
    scheduler.cancel(probe)
    return False

"""CPU decode steps compiled by torch.compile (`CompiledDecoder`): the same tokens and logprobs
as the eager generator while requests join and leave and contexts grow."""

from __future__ import annotations

from itertools import chain

import pytest
import torch
from checkpoints import make_checkpoint
from torch._dynamo.utils import counters

from model.compiled_decode import CompiledDecoder, compiled_steps
from model.checkpoint import load_model
from model.generate import Engine, GenerationRequest, SamplingParams
from model.kernels import cpu
from model.moe import ExpertBank

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CompiledDecoder.available(), reason="needs a C++ compiler for inductor")]

# (step at which the request joins, request): one sequence, then two, three, six, then fewer
# until one is left again; every graph (one, 2 to 4 and more than 4 sequences) gets its turn.
# The first decode step attends over 4 tokens, as many as the checkpoint has heads: the graph
# traced on it must still serve every later context length.
SCHEDULE = [
    (0, GenerationRequest((3, 1, 4), 30)),
    (3, GenerationRequest((5, 9, 2, 6, 5, 3), 12)),
    (6, GenerationRequest((5, 8, 9), 10, SamplingParams(0.8, top_p=0.9, seed=11))),
    (9, GenerationRequest((2, 7, 1, 8), 8)),
    (9, GenerationRequest((2, 8), 6, SamplingParams(1.0, top_k=5, seed=3))),
    (9, GenerationRequest((1, 8, 2, 8, 4), 7)),
]


def run(*engines: Engine) -> list[list]:
    """Steps the engines in turn, each through SCHEDULE -> each engine's sequences."""
    seqs, step = [[] for _ in engines], 0
    while step == 0 or not all(engine.idle for engine in engines):
        for engine, own in zip(engines, seqs):
            own += [engine.add(request) for at, request in SCHEDULE if at == step]
            engine.step()
        step += 1
    return seqs


def test_compiled_steps_give_the_eager_tokens_and_logprobs(v3_checkpoint, tmp_path):
    # a second model of the same architecture, other weights, stepped in turn with the first:
    # once their graphs have run, guards are skipped, and each must still run its own graphs
    make_checkpoint(tmp_path, "v3", seed=5)
    checkpoints = (v3_checkpoint[0], tmp_path)
    eager = run(*(Engine(load_model(path), cache_tokens=512) for path in checkpoints))
    assert eager[0][0].tokens != eager[1][0].tokens
    engines = [Engine(load_model(path), cache_tokens=512) for path in checkpoints]
    calls = []
    for engine in engines:
        engine.graphs = CompiledDecoder(engine.model, engine.cache)
        steps = compiled_steps(engine.model)
        for graph, step in list(steps.items()):
            steps[graph] = lambda *args, step=step: calls.append(args[1].shape[0]) or step(*args)
    compiled = run(*engines)
    for ours, reference in zip(chain(*compiled), chain(*eager)):
        assert ours.tokens == reference.tokens
        assert ours.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
    # every decode step went through the compiled graphs, for one sequence and for several
    assert {1, 2, 3, 6} <= set(calls)
    assert sum(calls) == sum(len(seq.tokens) - 1 for seq in chain(*compiled))  # all tokens after the prefill's
    for engine in engines:
        assert engine.graphs.compiled == {"one sequence", "2 to 4 sequences", "more than 4 sequences"}
        # the graphs traced the streaming variants; the model's eager steps keep their kernels
        assert all(type(m) is not cpu.StreamingLinear for m in engine.model.modules())
        assert all(bank.compute is cpu.sorted_experts for bank in engine.model.modules() if isinstance(bank, ExpertBank))
    # a later decoder of the same model runs the graphs already built: nothing is traced again
    traced = counters["stats"]["unique_graphs"]
    again = Engine(engines[0].model, cache_tokens=512)
    again.graphs = CompiledDecoder(again.model, again.cache)
    again.generate([GenerationRequest((3, 1, 4), 3)])
    again.generate([GenerationRequest((k, 1, 4), 3) for k in range(6)])
    assert again.graphs.compiled == {"one sequence", "more than 4 sequences"}
    assert counters["stats"]["unique_graphs"] == traced


def test_larger_batches_and_remote_experts_stay_eager(v3_checkpoint):
    engine = Engine(load_model(v3_checkpoint[0]), cache_tokens=512)
    decoder = CompiledDecoder(engine.model, engine.cache)  # compiles nothing until a step
    assert decoder.handles(16) and not decoder.handles(17)
    engine.model.layers[-1].ffn.experts = torch.nn.Identity()  # stands in for a remote dispatcher
    assert not decoder.handles(1)


def test_engine_asks_for_a_compiler_only_when_compiling(v3_checkpoint, monkeypatch):
    model = load_model(v3_checkpoint[0])
    monkeypatch.setattr(CompiledDecoder, "available", staticmethod(lambda: False))
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        Engine(model, cache_tokens=512, compile_cpu=True)
    assert Engine(model, cache_tokens=512).graphs is None

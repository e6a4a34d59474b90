"""Sampling, admission and bad input for the in-process generator and `moe generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_model
from model.errors import InputError
from model.generate import Engine, GenerationRequest, SamplingParams, sample, sample_rows
from model.kv_cache import CacheFull
from services.cli import main as moe


@pytest.fixture(scope="module")
def model(v3_checkpoint):
    return load_model(v3_checkpoint[0])


def test_same_seed_same_tokens_whatever_the_batch(model):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    target = GenerationRequest((1, 2, 3), 16, sampling)
    (alone,) = Engine(model, 512).generate([target])
    crowd = Engine(model, 512).generate([GenerationRequest((9, 9), 12, SamplingParams(1.0, seed=7)), target])
    assert crowd[1].tokens == alone.tokens
    (other_seed,) = Engine(model, 512).generate([GenerationRequest((1, 2, 3), 16, SamplingParams(0.8, 0.9, 50, seed=99))])
    assert other_seed.tokens != alone.tokens


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(1.0, top_k=1), g)[0] for _ in range(20)} == {1}
    # top-2 mass after softmax is ~0.84: top_p 0.8 keeps tokens 1 and 3 only
    assert {sample(logits, SamplingParams(1.0, top_p=0.8), g)[0] for _ in range(200)} == {1, 3}


def test_a_batch_of_rows_samples_each_row_as_it_would_alone():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 4
    logits[3, 10] = logits[3].max() + 1  # a clear winner where greedy must pick it
    rows = [SamplingParams(), SamplingParams(0.7, seed=5), SamplingParams(), SamplingParams(), SamplingParams(1.0, 0.9, 8, seed=6)]
    generators = lambda: [torch.Generator().manual_seed(p.seed) if p.temperature else None for p in rows]  # noqa: E731
    picked = sample_rows(logits, list(zip(rows, generators())))
    alone = [sample(logits[i], p, g) for i, (p, g) in enumerate(zip(rows, generators()))]
    assert [t for t, _ in picked] == [t for t, _ in alone]
    assert [lp for _, lp in picked] == pytest.approx([lp for _, lp in alone], abs=1e-6)
    assert picked[3][0] == 10
    assert [picked[i][0] for i in (0, 2, 3)] == logits[[0, 2, 3]].argmax(-1).tolist()


def test_logprob_is_under_the_unmodified_model():
    logits = torch.tensor([1.0, 2.0, 3.0])
    token, logprob = sample(logits, SamplingParams(0.5, seed=1), torch.Generator().manual_seed(1))
    assert logprob == pytest.approx(torch.log_softmax(logits, -1)[token].item())


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(prompt=(), max_new_tokens=4), "prompt is empty"),
        (dict(prompt=(1, 320), max_new_tokens=4), "outside the vocabulary"),
        (dict(prompt=(1,), max_new_tokens=0), "max_new_tokens must be positive"),
        (dict(prompt=(1,) * 250, max_new_tokens=10), "exceeds the context limit of 256"),
        (dict(prompt=(1,), max_new_tokens=4, sampling=SamplingParams(temperature=-1)), "temperature"),
        (dict(prompt=(1,), max_new_tokens=4, sampling=SamplingParams(top_p=0)), "top_p"),
        (dict(prompt=(1,), max_new_tokens=4, sampling=SamplingParams(top_p=1.5)), "top_p"),
    ],
)
def test_bad_requests_are_refused_with_a_message(model, request_kwargs, message):
    engine = Engine(model, 512)
    with pytest.raises(InputError, match=message):
        engine.add(GenerationRequest(**request_kwargs))
    assert engine.idle


def test_a_request_larger_than_the_cache_is_refused_and_others_wait_their_turn(model):
    engine = Engine(model, cache_tokens=64, max_batch=8)
    with pytest.raises(CacheFull):
        engine.add(GenerationRequest((1,) * 60, 10))
    seqs = engine.generate([GenerationRequest((1, 2), 30), GenerationRequest((3, 4), 30)])  # 2 x 32 > 48 free
    assert [len(s.tokens) for s in seqs] == [30, 30]
    assert engine.cache.used_tokens == 0


def test_cancel_frees_the_cache_at_once(model):
    engine = Engine(model, cache_tokens=256)
    seq = engine.add(GenerationRequest((1, 2, 3), 100))
    engine.step()
    assert engine.cache.used_tokens > 0
    engine.cancel(seq)
    assert engine.cache.used_tokens == 0 and engine.idle and seq.finish_reason == "cancelled"


def test_stop_token_ends_a_sequence(model):
    (greedy,) = Engine(model, 512).generate([GenerationRequest((5, 6), 12)])
    stop = greedy.tokens[3]
    (stopped,) = Engine(model, 512).generate([GenerationRequest((5, 6), 12, stop_token_ids=(stop,))])
    assert stopped.finish_reason == "stop" and stopped.tokens == greedy.tokens[: greedy.tokens.index(stop) + 1]


def test_moe_generate_json(v3_checkpoint, capsys):
    path, hf = v3_checkpoint
    assert moe(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out["tokens"] == expected[0, 3:].tolist()
    assert len(out["logprobs"]) == 8 and all(lp <= 0 for lp in out["logprobs"])
    assert out["finish_reason"] == "length" and out["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-ids", "1,999"], "outside the vocabulary"),
        (["--prompt-ids", "1", "--stop-ids", "999"], "stop token ids [999] are outside the vocabulary"),
        (["--prompt-ids", "1", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--prompt-ids", "1", "--device", "foo"], "--device must be cpu or cuda[:N], got 'foo'"),
        (["--prompt", "hello"], "needs a tokenizer.json"),
    ],
)
def test_moe_generate_bad_input_is_one_line(v3_checkpoint, capsys, argv, message):
    assert moe(["generate", "--model", str(v3_checkpoint[0]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_moe_generate_missing_model_dir(tmp_path, capsys):
    assert moe(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_cli_quietly():
    # `moe inspect --json | head -1`: the pipe closes before moe has written everything
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "services.cli", "inspect", "--preset", "deepseek-v3", "--json"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""

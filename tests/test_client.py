"""The Python clients (`Client`, `AsyncClient`) and `moe generate --endpoint`: against the gateway
in front of fake workers, an unreachable endpoint, and values the wire cannot carry."""

from __future__ import annotations

import asyncio

import pytest

from fake_workers import FakeWorker
from services.client import AsyncClient, Client, ClientError, GenerationResult, build_request
from support import wait_until


def _run_async(endpoint: str, body, timeout: float = 10.0):
    """body(AsyncClient) run to completion on a fresh event loop, the client closed after."""
    async def main():
        async with AsyncClient(endpoint, timeout=timeout) as client:
            return await body(client)
    return asyncio.run(main())


def test_async_client_runs_concurrent_streams_on_one_loop_each_with_its_own_tokens(gateway):
    fake = FakeWorker(tokens=4, prompt_tokens=True)
    client, _ = gateway(fake)

    async def body(aclient):
        return await asyncio.gather(*(aclient.generate(prompt_ids=[i + 1], max_new_tokens=4, request_id=f"r{i}")
                                      for i in range(8)))

    results = _run_async(client.endpoint, body)
    for i, result in enumerate(results):
        assert result.tokens == [(i + 1) * 100 + k for k in range(4)] and result.logprobs == [-1.0] * 4
        assert result.finish_reason == "length" and result.request_id == f"r{i}"
        assert result.usage["prompt_tokens"] == 1 and result.usage["time_to_first_token_ms"] > 0
    assert fake.calls == 8


def test_async_client_streams_tokens_then_the_result(gateway):
    client, _ = gateway(FakeWorker(tokens=3))

    async def body(aclient):
        return [item async for item in aclient.stream(prompt_ids=[1, 2], max_new_tokens=3)]

    items = _run_async(client.endpoint, body)
    assert [(t.id, t.index) for t in items[:-1]] == [(10, 0), (11, 1), (12, 2)]
    assert isinstance(items[-1], GenerationResult) and items[-1].tokens == [10, 11, 12]


def test_async_client_leaving_a_stream_early_cancels_it_on_the_worker(gateway):
    fake = FakeWorker(tokens=200, delay=0.02)
    client, upstreams = gateway(fake)

    async def body(aclient):
        items = aclient.stream(prompt_ids=[1], max_new_tokens=200)
        first = await items.__anext__()
        await items.aclose()
        # with the channel still open: closing the client would cancel the call by itself
        return first, await asyncio.to_thread(fake.cancelled.wait, 5.0)

    first, cancelled = _run_async(client.endpoint, body)
    assert first.id == 10 and cancelled and fake.cancels == [1]
    wait_until(lambda: upstreams.balancer.in_flight() == 0, what="no call in flight")


@pytest.mark.parametrize("worker, timeout, code, fragment", [
    (dict(mode="invalid"), 10.0, "INVALID_ARGUMENT", "token 999 is outside the vocabulary"),
    (dict(tokens=3, hold=True), 0.5, "DEADLINE_EXCEEDED", ""),
])
def test_async_client_failures_are_client_errors_with_the_servers_status(gateway, worker, timeout, code, fragment):
    fake = FakeWorker(**worker)
    client, _ = gateway(fake)

    async def body(aclient):
        with pytest.raises(ClientError) as err:
            await aclient.generate(prompt_ids=[999], max_new_tokens=3)
        return err.value

    error = _run_async(client.endpoint, body, timeout=timeout)
    fake.gate.set()
    assert error.code == code and fragment in error.message


def test_async_client_unreachable_endpoint_and_bad_values_are_client_errors():
    async def body(aclient):
        with pytest.raises(ClientError) as unreachable:
            await aclient.generate(prompt_ids=[1], max_new_tokens=1)
        with pytest.raises(ClientError) as bad:
            await aclient.generate(prompt_ids=[1], max_new_tokens=0)
        return unreachable.value, bad.value

    unreachable, bad = _run_async("127.0.0.1:1", body, timeout=2)
    assert unreachable.code == "UNAVAILABLE"
    assert bad.code == "INVALID_ARGUMENT" and "max_new_tokens must be >= 1" in bad.message


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompt_ids=[1], max_new_tokens=-3), "max_new_tokens must be >= 1, got -3"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt_ids=[-1], max_new_tokens=2), "prompt_ids must be in"),
    (dict(prompt_ids=[1], max_new_tokens=2, seed=-5), "seed must be in"),
    (dict(max_new_tokens=2), "exactly one of prompt_ids or text"),
])
def test_client_rejects_values_the_wire_cannot_carry(kwargs, fragment):
    with pytest.raises(ClientError) as err:
        build_request(**kwargs)
    assert err.value.code == "INVALID_ARGUMENT" and fragment in err.value.message


def test_unreachable_endpoint_is_a_client_error_not_a_grpc_exception():
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(ClientError) as err:
        client.generate(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 1, got -2"),
        (["--timeout", "-1"], "--timeout must be > 0 seconds, got -1.0"),
        (["--device", "cuda"], "--device applies to --model only; a cluster's workers choose their own"),
        (["--dtype", "bfloat16"], "--dtype applies to --model only; a cluster's workers choose their own"),
    ],
)
def test_generate_cli_reports_bad_input_in_one_line_and_exit_2(capsys, argv, message):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1:1", "--prompt-ids", "1,2", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"moe generate: {message}"


def test_generate_cli_wants_a_port_rather_than_grpcs_default_443(capsys):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1", "--prompt-ids", "1"]) == 2
    assert capsys.readouterr().err.strip() == "moe generate: --endpoint must be HOST:PORT, got '127.0.0.1'"


def test_generate_cli_tells_an_outage_from_bad_input_by_exit_status(capsys):
    from services.cli import main

    assert main(["generate", "--endpoint", "127.0.0.1:1", "--prompt-ids", "1", "--timeout", "2"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("moe generate: UNAVAILABLE: ") and "\n" not in line

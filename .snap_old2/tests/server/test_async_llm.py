"""AsyncLLM over the fake engine: one engine thread, fan-out, errors, abort, idle, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_engine import FakeEngine, fake_generate

from inlaid.engine.async_llm import (
    AsyncLLM,
    EngineOverloadedError,
    EngineShutdownError,
    EngineStepError,
    ModelNotFoundError,
)
from inlaid.sampling import SamplingParams


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def _collect(llm: AsyncLLM, rid: str, prompt, max_tokens: int, adapter=None):
    outs = [o async for o in llm.generate(rid, prompt, SamplingParams(max_tokens=max_tokens), adapter)]
    return outs


def test_generate_streams_deltas_and_uses_one_engine_thread(fake_adapter_dirs):
    eng = FakeEngine({"a1": fake_adapter_dirs["a1"]})
    llm = AsyncLLM(eng)

    async def main():
        res = await asyncio.gather(*[_collect(llm, f"r{i}", f"p{i}", 5 + i, "a1" if i % 2 else None) for i in range(8)])
        await llm.shutdown(1.0)
        return res

    results = run(main())
    for i, outs in enumerate(results):
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert sum(1 for o in outs if o.finished) == 1
        assert "".join(o.delta_text for o in outs) == outs[-1].text
        assert outs[-1].text == fake_generate(list(f"p{i}".encode()), 5 + i, "a1" if i % 2 else None)
    assert eng._thread_ids == {llm._thread.ident}, "engine was called from more than one thread"
    assert llm._thread.ident != threading.get_ident()


def test_errors_go_to_their_caller_only():
    eng = FakeEngine(max_model_len=32)
    llm = AsyncLLM(eng)

    async def main():
        good = asyncio.ensure_future(_collect(llm, "good", "hello", 10))
        with pytest.raises(ValueError, match="context length 32"):
            await _collect(llm, "bad", "x" * 30, 10)
        with pytest.raises(ModelNotFoundError):
            await _collect(llm, "bad2", "x", 3, adapter="nope")
        with pytest.raises(ValueError, match="token ids"):
            await _collect(llm, "bad3", [1, 999], 3)
        outs = await good
        await llm.shutdown(1.0)
        return outs

    outs = run(main())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 10


def test_queue_full_is_overloaded_error():
    eng = FakeEngine(max_running=1, max_queue_len=1, step_delay=0.01)
    llm = AsyncLLM(eng)

    async def main():
        a = await llm.add_request("a", "x", SamplingParams(max_tokens=40))
        b = await llm.add_request("b", "y", SamplingParams(max_tokens=40))
        try:
            with pytest.raises(EngineOverloadedError, match="queue is full"):
                for i in range(5):  # a may not be running yet on the first try
                    await llm.add_request(f"c{i}", "z", SamplingParams(max_tokens=2))
                    await asyncio.sleep(0.05)
        finally:
            a.abort()
            b.abort()
        await llm.shutdown(1.0)

    run(main())


def test_cancelled_consumer_aborts_request_and_frees_kv():
    eng = FakeEngine(step_delay=0.005)
    llm = AsyncLLM(eng)

    async def main():
        task = asyncio.ensure_future(_collect(llm, "r", "hello", 60))
        while llm.stats()["kv_blocks_used"] == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            s = llm.stats()
            if s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_streams"] == 0:
                break
            await asyncio.sleep(0.01)
        await llm.shutdown(1.0)
        return llm.stats()

    stats = run(main())
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_streams"] == 0
    assert not eng.has_unfinished_requests()


def test_idle_loop_does_not_spin():
    llm = AsyncLLM(FakeEngine())
    run(_collect(llm, "r", "hi", 3))
    time.sleep(0.05)
    before = llm.loop_iterations
    time.sleep(0.5)
    assert llm.loop_iterations == before, "engine thread loops while idle"
    llm.close()
    assert not llm._thread.is_alive()


def test_step_failure_fails_in_flight_requests_and_engine_keeps_serving():
    eng = FakeEngine()
    llm = AsyncLLM(eng)

    async def main():
        eng.fail_next_step = True
        with pytest.raises(EngineStepError, match="injected"):
            await _collect(llm, "r1", "hi", 5)
        outs = await _collect(llm, "r2", "hi", 5)
        await llm.shutdown(1.0)
        return outs

    assert run(main())[-1].finish_reason == "length"


def test_remove_adapter_waits_then_aborts_in_flight(fake_adapter_dirs):
    eng = FakeEngine({"a1": fake_adapter_dirs["a1"]}, step_delay=0.01)
    llm = AsyncLLM(eng)

    async def main():
        short = asyncio.ensure_future(_collect(llm, "short", "x", 3, "a1"))
        long = asyncio.ensure_future(_collect(llm, "long", "x", 60, "a1"))
        await asyncio.sleep(0.03)
        aborted = await llm.remove_adapter("a1", timeout=0.2)
        assert aborted == 1
        with pytest.raises(ModelNotFoundError):
            await _collect(llm, "after", "x", 3, "a1")
        with pytest.raises(ModelNotFoundError):
            await llm.remove_adapter("a1")
        res = await short, await long
        await llm.shutdown(1.0)
        return res

    short, long = run(main())
    assert short[-1].finish_reason == "length"
    assert long[-1].finish_reason == "abort"
    assert "a1" not in eng.list_adapters()


def test_shutdown_drains_then_aborts_and_rejects_new():
    eng = FakeEngine(step_delay=0.01)
    llm = AsyncLLM(eng)

    async def main():
        quick = asyncio.ensure_future(_collect(llm, "q", "x", 3))
        slow = asyncio.ensure_future(_collect(llm, "s", "x", 60))
        await asyncio.sleep(0.02)
        aborted = await llm.shutdown(drain_timeout=0.2)
        with pytest.raises(EngineShutdownError):
            await _collect(llm, "late", "x", 3)
        return aborted, await quick, await slow

    aborted, quick, slow = run(main())
    assert aborted == 1
    assert quick[-1].finish_reason == "length"
    assert slow[-1].finish_reason == "abort"
    assert not llm._thread.is_alive()

"""Overlapped engine steps (``overlap_steps="on"``): the same outputs as the plain step, on CPU.

On CPU nothing runs concurrently, but the protocol is the same as on CUDA: the ahead step is planned and
launched before the current step's tokens are applied, its inputs come from the previous launch's tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import count_ahead_steps

from inlaid import LLM, SamplingParams
from inlaid.engine.llm_engine import LLMEngine
from inlaid.worker.model_runner import ModelRunner

PROMPTS = ["Hello world", "Translate: cat -> chat. The quick brown", "0123456789 + - * /", "Das ist ein Test.",
           "def return import class"]


def _llm(tiny_llama_dir: Path, tiny_adapters: dict[str, Path], overlap: str) -> LLM:
    return LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()},
               device="cpu", max_loras=4, max_lora_rank=16, block_size=4, num_blocks=256, overlap_steps=overlap)


@pytest.fixture(scope="module")
def pair(tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> tuple[LLM, LLM]:
    return _llm(tiny_llama_dir, tiny_adapters, "on"), _llm(tiny_llama_dir, tiny_adapters, "off")


def test_overlap_is_on_by_request_and_off_by_default_on_cpu(pair: tuple[LLM, LLM],
                                                             tiny_llama_dir: Path) -> None:
    assert pair[0].engine.overlap and not pair[1].engine.overlap
    assert not LLM(model=str(tiny_llama_dir), device="cpu", num_blocks=32).engine.overlap


def test_same_tokens_text_and_finish_reasons(pair: tuple[LLM, LLM]) -> None:
    on, off = pair
    count = count_ahead_steps(on.engine)
    params = [SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=3, ignore_eos=True),  # finishes by length while others decode
              SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=12),  # may stop at EOS
              SamplingParams(max_tokens=9, temperature=1.0, seed=3)]
    adapters = ["a", None, "b", "c", "a"]
    got = on.generate(PROMPTS, params, adapter=adapters)
    want = off.generate(PROMPTS, params, adapter=adapters)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
        [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert count[0] >= 5  # steady decode did run ahead


def test_stop_string_found_while_a_step_is_in_flight(pair: tuple[LLM, LLM]) -> None:
    on, off = pair
    full = off.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = full.text[3:5]
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop])
    got = on.generate([PROMPTS[0], PROMPTS[1]], params)
    want = off.generate([PROMPTS[0], PROMPTS[1]], params)
    assert got[0].finish_reason == "stop" and got[0].text == want[0].text and stop not in got[0].text
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert not on.engine.has_unfinished_requests() and on.engine.scheduler.block_manager.usage() == 0


def test_abort_while_a_step_is_in_flight(pair: tuple[LLM, LLM]) -> None:
    eng = pair[0].engine
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    a = eng.add_request(None, PROMPTS[0], params)
    b = eng.add_request(None, PROMPTS[1], params)
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None  # steady decode: the next step is already launched
    eng.abort_request([a])
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert done[a].finish_reason == "abort" and done[b].finish_reason == "length"
    assert len(done[b].token_ids) == 20 and eng.scheduler.block_manager.usage() == 0


def test_between_steps_callbacks_wait_for_the_step_in_flight(pair: tuple[LLM, LLM]) -> None:
    eng = pair[0].engine
    seen: list[bool] = []
    rid = eng.add_request(None, PROMPTS[2], SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None
    eng.between_steps.append(lambda: seen.append(eng._inflight is None))
    try:
        eng.run_between_steps()  # deferred: a step is in flight
        assert seen == []
        while eng.has_unfinished_requests():
            eng.step()
        assert seen and all(seen)  # every call ran with nothing in flight (and no step was run ahead)
    finally:
        eng.between_steps.clear()
    assert rid not in eng._requests


def test_a_failed_step_fails_its_requests_and_drops_the_step_in_flight(pair: tuple[LLM, LLM]) -> None:
    eng = pair[0].engine
    rid = eng.add_request(None, PROMPTS[3], SamplingParams(max_tokens=10, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None
    collect = eng.runner.collect

    def boom(handle):  # noqa: ANN001, ANN202
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    eng.runner.collect = boom  # type: ignore[method-assign]
    try:
        outs = eng.step()
    finally:
        eng.runner.collect = collect  # type: ignore[method-assign]
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert eng._inflight is None and not eng.has_unfinished_requests()
    assert eng.scheduler.block_manager.usage() == 0
    out = pair[0].generate(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4  # still serving


def test_an_ahead_step_needs_the_launch_that_samples_its_inputs(pair: tuple[LLM, LLM]) -> None:
    eng = pair[0].engine
    runner: ModelRunner = eng.runner
    eng.add_request("x", PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))
    prev = eng.scheduler.schedule()
    ahead = eng.scheduler.schedule_ahead(prev)
    assert ahead is not None
    with pytest.raises(ValueError, match="ahead step must follow"):
        runner.launch(ahead, None)
    handle = runner.launch(prev)
    assert handle.tokens is not None and handle.tokens.dtype == torch.int64
    eng.abort_request(["x"])
    while eng.has_unfinished_requests():
        eng.step()


class _FakeRequantizer:
    """What ``SwapDrain`` needs of a Requantizer: swaps become ready from outside, the engine applies them."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.ready, self.applied_with_step_in_flight = engine, 0, []

    def has_ready_swaps(self) -> bool:
        return self.ready > 0

    def apply_ready_swaps(self) -> int:
        self.applied_with_step_in_flight.append(self.engine._inflight is not None)
        n, self.ready = self.ready, 0
        return n


def test_steps_run_ahead_until_a_swap_waits_then_it_lands_within_two_steps(pair: tuple[LLM, LLM]) -> None:
    from inlaid.engine.requant_hook import SwapDrain

    eng = pair[0].engine
    rq = _FakeRequantizer(eng)
    count = count_ahead_steps(eng)
    eng.between_steps.append(SwapDrain(rq))
    try:
        eng.add_request(None, PROMPTS[4], SamplingParams(max_tokens=16, ignore_eos=True))
        for _ in range(4):
            eng.step()
        assert count[0] >= 2 and eng._inflight is not None  # nothing waits: decode runs ahead
        rq.ready = 1  # a layer is quantized in the background
        steps = 0
        while rq.ready:
            eng.step()
            steps += 1
        assert steps <= 2 and rq.applied_with_step_in_flight and not any(rq.applied_with_step_in_flight)
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        eng.between_steps.clear()


def test_async_llm_streams_with_overlapped_steps(tiny_llama_dir: Path, tiny_adapters: dict[str, Path],
                                                 pair: tuple[LLM, LLM]) -> None:
    """The server's driver over an overlapping engine: streamed deltas add up to the plain engine's text, a
    consumer that stops early aborts its request, and the KV cache ends empty."""
    import asyncio

    from inlaid.engine.async_llm import AsyncLLM

    engine = _llm(tiny_llama_dir, tiny_adapters, "on").engine
    count = count_ahead_steps(engine)
    llm = AsyncLLM(engine)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [o.text for o in pair[1].generate(PROMPTS[:3], params, adapter=["a", None, "b"])]

    async def collect(rid: str, prompt: str, adapter: str | None, stop_after: int | None = None) -> list:
        outs = []
        async for out in llm.generate(rid, prompt, params, adapter):
            outs.append(out)
            if stop_after is not None and len(outs) == stop_after:
                break  # closing the stream aborts the request
        return outs

    async def main() -> list:
        res = await asyncio.gather(collect("s0", PROMPTS[0], "a"), collect("s1", PROMPTS[1], None),
                                   collect("s2", PROMPTS[2], "b"), collect("s3", PROMPTS[3], "c", stop_after=3))
        for _ in range(200):
            if llm.stats()["kv_blocks_used"] == 0 and llm.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        await llm.shutdown(1.0)
        return res

    res = asyncio.run(asyncio.wait_for(main(), timeout=60))
    for outs, text in zip(res[:3], want):
        assert outs[-1].finished and "".join(o.delta_text for o in outs) == outs[-1].text == text
    assert len(res[3]) == 3 and not res[3][-1].finished
    assert count[0] >= 3  # steps did run ahead under the server's driver
    assert engine.scheduler.block_manager.usage() == 0 and not engine.has_unfinished_requests()

"""The official ``openai`` client against a real loopback server, for the fake engine
and for the REAL LLMEngine on the tiny random Llama with random PEFT adapters:
completions, chat, streams, models, greedy parity with the offline engine,
64 concurrent streams over 4 adapters, runtime load/unload, adapter errors,
disconnect frees KV."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import openai
import pytest
from conftest import ServerThread, make_fake_adapter_dir, wait_for
from fake_engine import FakeEngine, fake_generate

from inlaid.engine.async_llm import AsyncLLM
from inlaid.sampling import SamplingParams
from inlaid.server.app import build_app

ADAPTERS = ("t1", "t2", "t3", "t4")
MAX_TOKENS = 8


@dataclass
class Backend:
    """A running server plus an offline reference for greedy outputs."""

    kind: str
    url: str
    llm: AsyncLLM
    base: str
    extra_adapter: str  # path of an adapter that is not loaded yet (runtime load)
    reference: Callable[[list[list[int]], list[str | None], int], list[str]]
    encode: Callable[[str], list[int]]
    encode_chat: Callable[[list[dict]], list[int]]
    bad_adapters: dict[str, str]


def _fake_backend(tmp) -> tuple[Any, dict]:
    dirs = {n: make_fake_adapter_dir(tmp / n) for n in ADAPTERS + ("t5",)}
    eng = FakeEngine({n: dirs[n] for n in ADAPTERS}, step_delay=0.005, max_running=64, max_model_len=256)
    helper = FakeEngine()

    def reference(prompts, adapters, max_tokens):
        return [fake_generate(p, max_tokens, a) for p, a in zip(prompts, adapters)]

    extra = dict(extra_adapter=dirs["t5"], reference=reference, encode=helper.encode,
                 encode_chat=helper.encode_chat, bad_adapters={})
    return eng, extra


def _real_backend(tmp, tiny_dir) -> tuple[Any, dict]:
    try:
        from inlaid.engine.llm import LLM
        from inlaid.engine.llm_engine import LLMEngine
    except ImportError:
        pytest.skip("engine not available")
    from peft_adapters import make_peft_adapter
    from tiny import make_tiny_llama_dir

    from inlaid.config import EngineConfig

    dirs = {n: make_peft_adapter(tiny_dir, tmp / n, r=4 + 2 * i, seed=i + 1) for i, n in enumerate(ADAPTERS + ("t5",))}
    other = make_tiny_llama_dir(tmp / "other_base", hidden_size=32, head_dim=8, intermediate_size=64)
    bad = {"other_base": make_peft_adapter(other, tmp / "other_adapter", r=4),
           "high_rank": make_peft_adapter(tiny_dir, tmp / "high_rank", r=32)}
    config = EngineConfig.from_kwargs(model=str(tiny_dir), device="cpu", num_blocks=256, max_lora_rank=16,
                                      max_loras=4, max_num_seqs=64)
    eng = LLMEngine(config, adapters={n: dirs[n] for n in ADAPTERS})
    offline = LLM.from_config(config, adapters=dirs)

    def reference(prompts, adapters, max_tokens):
        outs = offline.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapters)
        return [o.text for o in outs]

    # the offline engine's tokenizer (the served one belongs to the engine thread)
    extra = dict(extra_adapter=dirs["t5"], reference=reference, encode=offline.engine.encode,
                 encode_chat=offline.engine.encode_chat, bad_adapters=bad)
    return eng, extra


@pytest.fixture(scope="module", params=["fake", "real"])
def backend(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"openai_{request.param}")
    if request.param == "fake":
        eng, extra = _fake_backend(tmp)
    else:
        eng, extra = _real_backend(tmp, request.getfixturevalue("tiny_llama_dir"))
    llm = AsyncLLM(eng)
    with ServerThread(build_app(llm, unload_timeout=5.0)) as server:
        yield Backend(request.param, server.url, llm, eng.model_name, **extra)


def _client(b: Backend) -> openai.OpenAI:
    return openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_text(stream: Any, chat: bool) -> tuple[str, list[str | None]]:
    text, finishes = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += (c.delta.content or "") if chat else c.text
            finishes.append(c.finish_reason)
    return text, finishes


@pytest.mark.parametrize("model_idx", [0, 1])
def test_openai_client_completion_chat_stream(backend, model_idx):
    b = backend
    model = b.base if model_idx == 0 else "t2"
    adapter = None if model_idx == 0 else "t2"
    client = _client(b)
    prompt = "Hello world, this is"
    msgs = [{"role": "user", "content": "Translate: cat"}]
    want_c, want_chat = b.reference([b.encode(prompt), b.encode_chat(msgs)], [adapter, adapter], MAX_TOKENS)

    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == want_c and r.model == model
    assert r.usage.prompt_tokens == len(b.encode(prompt)) and r.usage.completion_tokens >= 1
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, temperature=0, seed=1, user="u")
    assert r.choices[0].message.content == want_chat and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(b.encode_chat(msgs))

    s = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    text, finishes = _stream_text(s, chat=False)
    assert text == want_c and finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    s = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, finishes = _stream_text(s, chat=True)
    assert text == want_chat and finishes[-1] in ("stop", "length")


def test_adapters_change_outputs(backend):
    """Makes the parity tests meaningful: the adapters really differ from the base."""
    prompt = backend.encode("The quick brown fox")
    outs = backend.reference([prompt] * 5, [None, *ADAPTERS], 12)
    assert len(set(outs)) >= 3, outs


def test_openai_client_lists_models(backend):
    models = {m.id: m for m in _client(backend).models.list().data}
    assert set(ADAPTERS) <= set(models) and backend.base in models
    for name in ADAPTERS:
        assert models[name].model_dump()["parent"] == backend.base


def test_64_concurrent_streams_across_4_adapters(backend):
    b = backend
    prompts = [f"Hello {i} world" for i in range(64)]
    adapters = [ADAPTERS[i % 4] for i in range(64)]
    want = b.reference([b.encode(p) for p in prompts], adapters, MAX_TOKENS)
    client = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, list]:
        stream = await client.completions.create(model=adapters[i], prompt=prompts[i], max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        text, finishes = "", []
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finishes.append(c.finish_reason)
        return text, finishes

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(64)]), timeout=120)
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for i, (text, finishes) in enumerate(results):
        assert text == want[i], f"request {i} ({adapters[i]})"
        assert finishes[-1] in ("stop", "length") and finishes.count(None) == len(finishes) - 1
    wait_for(lambda: b.llm.stats()["kv_blocks_used"] == 0, what="KV blocks back to 0")


def test_runtime_load_while_streaming_and_unload(backend):
    b = backend
    client = _client(b)
    streams = [client.completions.create(model=ADAPTERS[i % 4], prompt="Hello world", max_tokens=24,
                                         temperature=0, stream=True) for i in range(4)]
    first = [next(iter(s)) for s in streams]  # all admitted and producing
    assert all(f.choices for f in first)
    r = client.post("/load_lora_adapter", body={"lora_name": "t5", "lora_path": b.extra_adapter}, cast_to=httpx.Response)
    assert r.status_code == 200
    prompt = "Translate: cat"
    got = client.completions.create(model="t5", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    assert got == b.reference([b.encode(prompt)], ["t5"], MAX_TOKENS)[0]
    for s in streams:
        _, finishes = _stream_text(s, chat=False)
        assert finishes[-1] in ("stop", "length")
    r = client.post("/unload_lora_adapter", body={"lora_name": "t5"}, cast_to=httpx.Response)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="t5", prompt=prompt, max_tokens=2)


def test_bad_adapters_rejected_and_server_keeps_serving(backend):
    b = backend
    if b.kind != "real":
        pytest.skip("checked against the fake in test_server_http; here the real adapter validation")
    c = httpx.Client(base_url=b.url, timeout=60)
    for name, path in b.bad_adapters.items():
        r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["message"]
    for path in ("/no/such/dir", str(b.extra_adapter) + "/.."):
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400, r.text
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "t1", "lora_path": b.extra_adapter})
    assert r.status_code == 400, r.text
    r = c.post("/v1/completions", json={"model": b.base, "prompt": "Hello " * 300, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert c.post("/v1/completions", json={"model": "t1", "prompt": "ok", "max_tokens": 2}).status_code == 200


def _abort_count(c: httpx.Client, adapter: str) -> float:
    prefix = f'inlaid_requests_total{{adapter="{adapter}",status="abort"}}'
    lines = [x for x in c.get("/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_disconnect_frees_kv(backend):
    b = backend
    with httpx.Client(base_url=b.url, timeout=60) as c:
        aborted_before = _abort_count(c, "t3")
        body = {"model": "t3", "prompt": "Hello world", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
        wait_for(lambda: b.llm.stats()["kv_blocks_used"] == 0 and b.llm.stats()["num_streams"] == 0, timeout=20,
                 what="KV blocks freed after disconnect")
        # the request ended because of the disconnect (an abort), not by running to max_tokens
        wait_for(lambda: _abort_count(c, "t3") == aborted_before + 1, timeout=10, what="abort counted")

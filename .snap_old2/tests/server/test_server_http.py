"""HTTP behaviour of the server over the fake engine, on a real uvicorn loopback server:
wire format, every bad-input case (status + OpenAI error body), API key,
disconnect -> abort, queue full -> 503, runtime load/unload, metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import ServerThread, parse_sse, wait_for
from fake_engine import FakeEngine, fake_generate

from inlaid.engine.async_llm import AsyncLLM
from inlaid.server.app import build_app


@pytest.fixture(scope="module")
def srv(fake_adapter_dirs):
    eng = FakeEngine({"a1": fake_adapter_dirs["a1"], "a2": fake_adapter_dirs["a2"]}, step_delay=0.002)
    llm = AsyncLLM(eng)
    with ServerThread(build_app(llm, unload_timeout=0.3)) as server:
        server.llm = llm
        with httpx.Client(base_url=server.url, timeout=20) as client:
            server.client = client
            yield server


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def test_completion_and_chat_wire_format(srv):
    r = srv.client.post("/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 7, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "a1"
    assert body["choices"][0]["text"] == fake_generate(list(b"hi"), 7, "a1")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    r = srv.client.post("/v1/chat/completions", json={"model": "fake-base", "messages": [{"role": "user", "content": "yo"}],
                                                       "max_tokens": 4, "stop": "zz"})
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"]) == 4 and body["usage"]["completion_tokens"] == 4


def test_stream_is_well_formed_and_matches_non_stream(srv):
    req = {"model": "a2", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 9, "temperature": 0}
    full = srv.client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    r = srv.client.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)[:-1]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == full
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 9


def test_stop_strings_list(srv):
    want = fake_generate(list(b"q"), 20)
    stop = want[5]  # one character: the fake engine does not hold back partial stop-string matches
    r = srv.client.post("/v1/completions", json={"model": "fake-base", "prompt": "q", "max_tokens": 20, "stop": [stop, "@@"]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == want[: want.index(stop)]


BAD_JSON_CASES = [
    # (name, body, status, code)
    ("malformed_json", b'{"model": "fake-base", "prompt": ', 400, "invalid_json"),
    ("invalid_utf8", b'{"model": "fake-base", "prompt": "\xff\xfe"}', 400, "invalid_utf8"),
    ("lone_surrogate", b'{"model": "fake-base", "prompt": "\\ud800"}', 400, "invalid_utf8"),
    ("not_an_object", b'[1, 2]', 422, "validation_error"),
    ("missing_model", {"prompt": "hi"}, 422, "validation_error"),
    ("missing_prompt", {"model": "fake-base"}, 422, "validation_error"),
    ("wrong_type_max_tokens", {"model": "fake-base", "prompt": "hi", "max_tokens": "many"}, 422, "validation_error"),
    ("wrong_type_prompt", {"model": "fake-base", "prompt": {"a": 1}}, 422, "validation_error"),
    ("wrong_type_temperature", {"model": "fake-base", "prompt": "hi", "temperature": "hot"}, 422, "validation_error"),
    ("unknown_model", {"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
    ("negative_max_tokens", {"model": "fake-base", "prompt": "hi", "max_tokens": -1}, 400, "invalid_value"),
    ("zero_max_tokens", {"model": "fake-base", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("huge_max_tokens", {"model": "fake-base", "prompt": "hi", "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ("prompt_over_context", {"model": "a1", "prompt": "x" * 200, "max_tokens": 1}, 400, "context_length_exceeded"),
    ("negative_temperature", {"model": "fake-base", "prompt": "hi", "temperature": -0.5}, 400, "invalid_value"),
    ("bad_top_p", {"model": "fake-base", "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
    ("bad_top_k", {"model": "fake-base", "prompt": "hi", "top_k": -5}, 400, "invalid_value"),
    ("n_two", {"model": "fake-base", "prompt": "hi", "n": 2}, 400, "invalid_value"),
    ("empty_prompt", {"model": "fake-base", "prompt": ""}, 400, "invalid_value"),
    ("empty_token_prompt", {"model": "fake-base", "prompt": []}, 400, "invalid_value"),
    ("token_out_of_vocab", {"model": "fake-base", "prompt": [1, 100000]}, 400, "invalid_value"),
    ("batch_prompts", {"model": "fake-base", "prompt": ["a", "b"]}, 400, "invalid_value"),
    ("empty_stop", {"model": "fake-base", "prompt": "hi", "stop": [""]}, 400, "invalid_value"),
    ("logprobs_unsupported", {"model": "fake-base", "prompt": "hi", "logprobs": 3}, 400, "invalid_value"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_JSON_CASES, ids=[c[0] for c in BAD_JSON_CASES])
def test_bad_completion_requests(srv, name, body, status, code):
    if isinstance(body, bytes):
        r = srv.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = srv.client.post("/v1/completions", json=body)
    _assert_error(r, status, code)


def test_bad_chat_requests(srv):
    _assert_error(srv.client.post("/v1/chat/completions", json={"model": "fake-base", "messages": []}), 400)
    _assert_error(srv.client.post("/v1/chat/completions", json={"model": "fake-base", "messages": "hi"}), 422)
    _assert_error(srv.client.post("/v1/chat/completions", json={"model": "fake-base", "messages": [{"content": "x"}]}), 422)
    msgs = [{"role": "user", "content": "x" * 300}]
    _assert_error(srv.client.post("/v1/chat/completions", json={"model": "fake-base", "messages": msgs}), 400,
                  "context_length_exceeded")
    _assert_error(srv.client.post("/v1/chat/completions", json={"model": "gone", "messages": msgs}), 404)


def test_body_too_large_declared_and_streamed(srv):
    big = b'{"model": "fake-base", "prompt": "' + b"x" * (10 << 20) + b'"}'
    _assert_error(srv.client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                  413, "body_too_large")

    def chunks():  # no Content-Length: the size is only discovered while reading
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    _assert_error(srv.client.post("/v1/completions", content=chunks()), 413, "body_too_large")


def test_unknown_route_and_method(srv):
    _assert_error(srv.client.get("/v1/nothing"), 404)
    _assert_error(srv.client.get("/v1/completions"), 405)


def test_adapter_management_errors(srv, fake_adapter_dirs):
    post = srv.client.post
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/does/not/exist"}), 400)
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": fake_adapter_dirs["not_adapter"]}), 400)
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": fake_adapter_dirs["bigrank"]}), 400)
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": fake_adapter_dirs["a3"]}), 400)
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "fake-base", "lora_path": fake_adapter_dirs["a3"]}), 400)
    _assert_error(post("/v1/load_lora_adapter", json={"lora_name": "x"}), 422)
    _assert_error(post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)
    # the server keeps serving after all of it
    assert post("/v1/completions", json={"model": "a1", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_runtime_load_while_streaming_then_unload(srv, fake_adapter_dirs):
    results: list[str] = []

    def stream(model: str) -> None:
        r = srv.client.post("/v1/completions", json={"model": model, "prompt": "s", "max_tokens": 60, "stream": True})
        results.append(r.text)

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("a1", "a2", "fake-base", "a1")]
    for t in threads:
        t.start()
    wait_for(lambda: srv.llm.stats()["num_running"] >= 2, what="streams running")
    r = srv.client.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": fake_adapter_dirs["a3"]})
    assert r.status_code == 200, r.text
    r = srv.client.post("/v1/completions", json={"model": "a3", "prompt": "s", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == fake_generate(list(b"s"), 5, "a3")
    assert "a3" in [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    for text in results:
        events = parse_sse(text)[:-1]
        assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    # unload while a request of it streams: in-flight one ends (here: aborted after 0.3 s), never crashes
    t = threading.Thread(target=stream, args=("a3",))
    t.start()
    wait_for(lambda: srv.llm.stats()["num_running"] >= 1, what="a3 stream running")
    assert srv.client.post("/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 200
    t.join(timeout=30)
    last = [e for e in parse_sse(results[-1])[:-1] if e["choices"]][-1]
    assert last["choices"][0]["finish_reason"] in ("abort", "length")
    _assert_error(srv.client.post("/v1/completions", json={"model": "a3", "prompt": "s"}), 404)
    assert "a3" not in [m["id"] for m in srv.client.get("/v1/models").json()["data"]]


def test_models_lists_base_and_adapters_with_parent(srv):
    data = srv.client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["fake-base"]["parent"] is None
    assert by_id["a1"]["parent"] == "fake-base" and by_id["a2"]["parent"] == "fake-base"


def _kv_idle(srv) -> bool:
    s = srv.llm.stats()
    return s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_streams"] == 0


def test_disconnect_aborts_streaming_and_non_streaming(srv):
    wait_for(lambda: _kv_idle(srv), what="idle before")
    body = {"model": "a1", "prompt": "d", "max_tokens": 120, "stream": True}
    with srv.client.stream("POST", "/v1/completions", json=body) as r:
        it = r.iter_lines()
        next(it)
        assert srv.llm.stats()["kv_blocks_used"] > 0
    wait_for(lambda: _kv_idle(srv), timeout=10, what="KV freed after stream disconnect")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.15)
    wait_for(lambda: _kv_idle(srv), timeout=10, what="KV freed after non-stream disconnect")
    metrics = srv.client.get("/metrics").text
    assert 'inlaid_requests_total{adapter="a1",status="abort"}' in metrics


def test_metrics_per_adapter(srv):
    srv.client.post("/v1/completions", json={"model": "a2", "prompt": "m", "max_tokens": 3})
    text = srv.client.get("/metrics").text
    assert srv.client.get("/metrics").headers["content-type"].startswith("text/plain")
    for needle in ('inlaid_requests_total{adapter="a2",status="length"}', 'inlaid_generation_tokens_total{adapter="a2"}',
                   'inlaid_request_latency_seconds_bucket{adapter="a2"', 'inlaid_time_to_first_token_seconds_count{adapter="a2"}',
                   'inlaid_requests_total{adapter="<unknown>",status="404"}', "inlaid_num_requests_waiting",
                   "inlaid_kv_cache_usage_ratio", 'inlaid_adapters{location="device"}', 'inlaid_adapter_resident{adapter="a1"} 1.0'):
        assert needle in text, needle
    line = next(x for x in text.splitlines() if x.startswith('inlaid_prompt_tokens_total{adapter="a2"}'))
    assert float(line.split()[-1]) >= 1


def test_api_key_and_queue_full(fake_adapter_dirs):
    eng = FakeEngine(max_running=1, max_queue_len=1, step_delay=0.01)
    llm = AsyncLLM(eng)
    with ServerThread(build_app(llm, api_key="sekret")) as server:
        c = httpx.Client(base_url=server.url, timeout=20)
        assert c.get("/health").status_code == 200
        _assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        _assert_error(c.post("/v1/completions", json={"model": "fake-base", "prompt": "x"}), 401)
        _assert_error(c.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        c.headers["Authorization"] = "Bearer sekret"
        assert c.get("/v1/models").status_code == 200
        body = {"model": "fake-base", "prompt": "x", "max_tokens": 100, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)  # running (max_running=1)
            t = threading.Thread(target=lambda: c.post("/v1/completions", json={**body, "max_tokens": 2}))
            t.start()
            wait_for(lambda: llm.stats()["num_waiting"] == 1, what="one waiting")
            err = _assert_error(c.post("/v1/completions", json=body), 503, "queue_full")
            assert "queue" in err["message"]
        t.join(timeout=30)
        assert c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
        c.close()

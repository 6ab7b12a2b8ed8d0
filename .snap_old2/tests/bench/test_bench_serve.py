"""``inlaid bench serve`` against a REAL loopback server (tiny random Llama, 3 PEFT adapters, CPU):
every request completes with the exact token counts the workload asked for, the JSON is strict and
well-formed, summary counts agree with the records; a server that fails some requests (HTTP 500,
in-band stream error) gets them recorded as errors while the run goes on; max_duration bounds the run;
task-to-adapter mapping and bad input."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from inlaid.bench.serve_client import ServeBenchConfig, ServerInfo, bench_serve, fit_lengths, map_tasks
from inlaid.bench.workload import WorkloadConfig
from inlaid.cli import main
from inlaid.sim.simulator import RequestSpec


class _Server:
    """uvicorn on a free loopback port in a thread."""

    def __init__(self, app: Any, lifespan: str = "on") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tiny_adapters):
    from inlaid.config import EngineConfig
    from inlaid.engine.async_llm import AsyncLLM

    cfg = EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_num_seqs=16, num_blocks=256)
    llm = AsyncLLM.from_config(cfg, adapters=dict(tiny_adapters))
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(llm):
    from inlaid.server.app import build_app

    with _Server(build_app(llm)) as s:
        yield s


def _workload(n: int = 12, **kw: Any) -> WorkloadConfig:
    base = dict(num_requests=n, rate=40.0, num_tasks=3, lengths="synthetic", max_tokens=6, max_prompt=24,
                output_range=(2.0, 6.0), prompt_range=(4.0, 20.0), popularity="uniform", job_size=2, seed=3)
    base.update(kw)
    return WorkloadConfig(**base)


def test_bench_serve_cli_completes_all_requests_with_exact_counts(server, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["bench", "serve", "--url", server.url, "--num-requests", "12", "--rate", "40", "--tasks", "3",
               "--popularity", "uniform", "--lengths", "synthetic", "--max-tokens", "6", "--max-prompt", "24",
               "--jobs", "2", "--calibrate", "2", "--label", "fifo", "--extra", "policy=fifo", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("| fifo | value |") and "| requests (ok / sent / total) | 12 / 12 / 12 |" in table
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(res) == {"config", "server", "isolated", "summary", "records"}
    assert res["config"]["label"] == "fifo" and res["config"]["extra"] == {"policy": "fifo"}
    assert res["config"]["rate"] == 40.0 and res["config"]["num_tasks"] == 3
    assert sorted(res["server"]["adapters"]) == ["a", "b", "c"] and res["isolated"]["probes"] == 2
    recs = res["records"]
    assert len(recs) == 12 and all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    for r in recs:
        assert r["tokens_from"] == "usage" and r["completion_tokens"] == r["max_tokens"]  # ignore_eos
        assert r["prompt_tokens"] == r["prompt_len"] and r["model"] in ("a", "b", "c")
        assert r["sent"] >= r["scheduled"] - 1e-3 and r["sent"] <= r["first_token"] <= r["finish"]
        assert r["isolated_time"] > 0
    s = res["summary"]
    assert s["ok"] == s["sent"] == s["requests"] == s["finished"] == 12
    assert s["output_tokens"] == sum(r["max_tokens"] for r in recs) and s["tokens_from"] == ["usage"]
    assert 0 < s["latency_mean"] and 0 <= s["slo_attainment"] <= 1
    lat = [r["finish"] - r["sent"] for r in recs]
    assert s["latency_mean"] == pytest.approx(sum(lat) / len(lat))
    jobs = {r["job_id"] for r in recs}
    assert len(jobs) == 6  # job_size 2: JCT over 6 jobs


def test_same_workload_is_deterministic_in_plan(server):
    cfg = ServeBenchConfig(workload=_workload(6, seed=9), url=server.url, calibrate=0)
    a, b = bench_serve(cfg), bench_serve(cfg)
    key = [(r["scheduled"], r["model"], r["prompt_len"], r["max_tokens"]) for r in a["records"]]
    assert key == [(r["scheduled"], r["model"], r["prompt_len"], r["max_tokens"]) for r in b["records"]]
    assert a["isolated"] is None and all(r["isolated_time"] is None for r in a["records"])


def _flaky(app: Any) -> Any:
    """Wrap the real app: every 3rd completion gets a 500, every 3rd+1 a stream that ends in an error event."""
    count = {"n": 0}

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        count["n"] += 1
        k = count["n"] % 3
        if k == 0:
            body = json.dumps({"error": {"message": "injected failure", "type": "x", "param": None, "code": None}})
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": body.encode()})
        if k == 1:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            events = 'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n' \
                     'data: {"error": {"message": "engine blew up"}}\n\ndata: [DONE]\n\n'
            return await send({"type": "http.response.body", "body": events.encode()})
        return await app(scope, receive, send)

    return wrapped


def test_server_errors_are_recorded_not_fatal(llm):
    from inlaid.server.app import build_app

    with _Server(_flaky(build_app(llm)), lifespan="off") as s:  # "off": its shutdown must not stop the shared llm
        res = bench_serve(ServeBenchConfig(workload=_workload(9), url=s.url, calibrate=0, label="flaky"))
    recs = res["records"]
    by = {st: [r for r in recs if r["status"] == st] for st in ("ok", "error")}
    assert len(by["ok"]) + len(by["error"]) == 9 and len(by["error"]) == 6, [r["status"] for r in recs]
    assert sum(r["http_status"] == 500 and r["error"] == "injected failure" for r in by["error"]) == 3
    assert sum(r["http_status"] == 200 and "engine blew up" in r["error"] for r in by["error"]) == 3
    assert all(r["completion_tokens"] == r["max_tokens"] for r in by["ok"])
    s = res["summary"]
    assert s["ok"] == 3 and s["error"] == 6 and s["finished"] == 3
    assert s["slo_attainment"] <= 3 / 9  # failures count as misses


def test_max_duration_bounds_the_run(server):
    cfg = ServeBenchConfig(workload=_workload(8, rate=4.0, max_tokens=200, output_range=(150.0, 200.0), cv=0.1,
                                              job_size=1),
                           url=server.url, calibrate=0, max_duration=0.8)
    t0 = time.monotonic()
    res = bench_serve(cfg)
    assert time.monotonic() - t0 < 10
    st = [r["status"] for r in res["records"]]
    assert "unsent" in st and "timeout" in st, st  # arrivals past 0.8 s are not sent; long ones are cut
    assert res["summary"]["sent"] + res["summary"]["unsent"] == 8
    assert all(r["sent"] is None for r in res["records"] if r["status"] == "unsent")


def test_task_mapping_and_length_fitting():
    info = ServerInfo("base", ("x", "y", "z"), 64)
    wl = WorkloadConfig(num_tasks=2, lengths="synthetic")
    assert map_tasks(ServeBenchConfig(workload=wl), info) == ["x", "y"]
    assert map_tasks(ServeBenchConfig(workload=wl, task_names=("base", "z")), info) == ["base", "z"]
    with pytest.raises(ValueError, match="does not serve"):
        map_tasks(ServeBenchConfig(workload=wl, adapter_prefix="t"), info)
    with pytest.raises(ValueError, match="lower --tasks"):
        map_tasks(ServeBenchConfig(workload=WorkloadConfig(num_tasks=4, lengths="synthetic")), info)
    p, o = fit_lengths(RequestSpec("r", 0.0, "t0", 100, 30, 30), 64)
    assert (p, o) == (34, 30)
    assert fit_lengths(RequestSpec("r", 0.0, "t0", 5, 500, 500), 64) == (1, 63)
    with pytest.raises(ValueError, match="token_id_range"):
        ServeBenchConfig(token_id_range=(5, 5))


def test_bench_serve_cli_bad_input(capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-requests", "2"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", "localhost:8000"]) == 2
    assert "url must start with http://" in capsys.readouterr().err
    assert main(["bench", "serve", "--rate", "0"]) == 2
    assert "rate and cv must be > 0" in capsys.readouterr().err


def test_engine_int_flags_parse_as_numbers():
    """`inlaid serve --max-num-seqs 16` must give an int (the matrix driver passes these flags)."""
    from inlaid.cli import build_parser

    a = build_parser().parse_args(["serve", "--max-num-seqs", "16", "--max-loras", "3", "--aging-s", "2.5"])
    assert (a.max_num_seqs, a.max_loras, a.aging_s) == (16, 3, 2.5)
    assert type(a.max_num_seqs) is int and type(a.aging_s) is float


def test_tokenizer_less_dummy_model_streams_token_timing(tiny_llama_dir, tmp_path):
    """Dummy-shape dirs have no tokenizer: token-id prompts are accepted and every decode step still
    reaches the client as a (text-empty) chunk, so TTFT/TPOT are measured; usage gives the counts."""
    import shutil

    from inlaid.config import EngineConfig
    from inlaid.engine.async_llm import AsyncLLM
    from inlaid.server.app import build_app

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, bare / f)
    llm = AsyncLLM.from_config(EngineConfig.from_kwargs(model=str(bare), device="cpu", load_format="dummy",
                                                        num_blocks=128))
    with _Server(build_app(llm)) as s:
        res = bench_serve(ServeBenchConfig(workload=_workload(4, num_tasks=1, output_range=(4.0, 6.0)),
                                           url=s.url, calibrate=1, task_names=("bare",)))
    recs = res["records"]
    assert [r["status"] for r in recs] == ["ok"] * 4, [r["error"] for r in recs]
    for r in recs:
        assert r["completion_tokens"] == r["max_tokens"] and r["tokens_from"] == "usage"
        assert r["chunks"] == r["max_tokens"] - 1  # one chunk per token; the last comes with the finish chunk
        assert r["sent"] < r["first_token"] < r["finish"]
    assert res["summary"]["tpot_mean"] > 0 and res["isolated"]["probes"] == 1

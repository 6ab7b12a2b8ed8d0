"""The HTTP server over a tensor-parallel engine (CPU, gloo, 2 ranks), with the official ``openai`` client.

1. ``inlaid serve --tensor-parallel-size 2`` as a real process: greedy completions (base and three adapters)
   equal the offline TP=1 engine's; SIGTERM exits 0, the worker exits 0 on the shutdown message (not killed)
   and no worker process is left.
2. A killed worker (AsyncLLM + uvicorn in this process): the next request fails at once with a 500 naming the dead
   rank, later ones with a 503 "engine is dead", ``/health`` is 503; closing the AsyncLLM leaves no worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from tp_helpers import ADAPTERS, PROMPTS

from inlaid import LLM, SamplingParams
from inlaid.config import EngineConfig
from inlaid.engine.async_llm import AsyncLLM
from inlaid.server.app import build_app

ROOT = Path(__file__).resolve().parents[2]
ENGINE_FLAGS = ["--device", "cpu", "--num-blocks", "64", "--max-num-seqs", "8", "--max-loras", "2"]
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc is None or proc.poll() is None, "server exited during start-up"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def _complete(client: openai.OpenAI, base: str) -> list[str]:
    """One greedy completion per prompt, one at a time (so batches match the offline reference)."""
    return [client.completions.create(model=a or base, prompt=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body={"ignore_eos": True}).choices[0].text
            for p, a in zip(PROMPTS, ADAPTERS)]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_adapters):
    return {n: str(p) for n, p in tiny_adapters.items()}


def test_serve_tp2_matches_offline_tp1_and_sigterm_stops_the_workers(tiny_llama_dir, adapters, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "inlaid.cli", "serve", "--model", str(tiny_llama_dir), "--tensor-parallel-size",
           "2", "--port", str(port), *ENGINE_FLAGS, *[f"--adapter={n}={p}" for n, p in adapters.items()]]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        with LLM(model=str(tiny_llama_dir), adapters=adapters, device="cpu", num_blocks=64, max_num_seqs=8,
                 max_loras=2) as ref:  # fmt: skip
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            want = [ref.generate(p, params, adapter=a)[0].text for p, a in zip(PROMPTS, ADAPTERS)]
            base = ref.engine.model_name
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        workers = [p for p in _children(proc.pid) if _running(p)]
        assert workers, "the TP server runs no worker process"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert _complete(client, base) == want
        assert len(set(want)) > 2  # the adapters change the outputs: the comparison is not vacuous
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _running(p)], "worker processes outlived the server"
        log.seek(0)
        assert "tensor-parallel workers stopped (exit codes [0])" in log.read()  # told to stop, not killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-4000:])
        log.close()


class _Server:
    """uvicorn on a free loopback port in a thread (the app of an in-process AsyncLLM)."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        _wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_dead_worker_fails_requests_with_a_clear_error_not_a_hang(tiny_llama_dir, adapters):
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", tensor_parallel_size=2,
                                      distributed_timeout_s=20, num_blocks=64, max_num_seqs=8, max_loras=2)
    llm = AsyncLLM.from_config(config, adapters={"a": adapters["a"]})
    procs = llm.engine.parts.tp_group.procs
    try:
        with _Server(build_app(llm)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            ok = client.completions.create(model="a", prompt="Hello", max_tokens=4, temperature=0.0)
            assert ok.choices[0].text is not None
            procs[0].kill()
            procs[0].join(10)
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as first:
                client.completions.create(model="a", prompt="Hello", max_tokens=4, temperature=0.0)
            assert time.monotonic() - t0 < 20
            assert first.value.status_code == 500 and "rank 1" in first.value.message, first.value.message
            with pytest.raises(openai.APIStatusError) as later:
                client.chat.completions.create(model=llm.model_name, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
            assert later.value.status_code == 503 and "engine is dead" in later.value.message
            health = httpx.get(srv.url + "/health", timeout=5)
            assert health.status_code == 503 and "engine is dead" in health.json()["error"]["message"]
    finally:
        llm.close()
    assert not any(p.is_alive() for p in procs)

"""SIGTERM on a real server process (``serve_async_llm`` over the fake engine):
stop accepting, finish short in-flight requests, abort long ones after the drain
timeout (their streams still end with [DONE]), exit with status 0. The process
also froze its startup heap before serving (``inlaid.engine.gc_heap``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import parse_sse

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from fake_engine import FakeEngine
from inlaid.engine.async_llm import AsyncLLM
from inlaid.server.serve import serve_async_llm
llm = AsyncLLM(FakeEngine(step_delay=0.02, max_model_len=512))
serve_async_llm(llm, "127.0.0.1", int(sys.argv[1]), drain_timeout=1.0, log_level="info")
print("CLEAN EXIT", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_aborts_and_exits_zero():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        results: dict[str, str] = {}

        def stream(name: str, max_tokens: int) -> None:
            body = {"model": "fake-base", "prompt": "x", "max_tokens": max_tokens, "stream": True}
            results[name] = httpx.post(url + "/v1/completions", json=body, timeout=30).text

        threads = [threading.Thread(target=stream, args=("short", 20)), threading.Thread(target=stream, args=("long", 400))]
        for t in threads:
            t.start()
        time.sleep(0.3)  # both admitted and streaming
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        for t in threads:
            t.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "CLEAN EXIT" in out
    assert re.search(r"froze [1-9][0-9]* startup objects against full garbage collections", out), out[-2000:]
    finishes = {}
    for name, text in results.items():
        events = parse_sse(text)[:-1]
        finishes[name] = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][-1]
    assert finishes == {"short": "length", "long": "abort"}, (finishes, out[-2000:])

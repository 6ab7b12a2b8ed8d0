"""Bounded soak of the HTTP server on loopback: latency, throughput, and no leaks.

Starts the real server (AsyncLLM + FastAPI + uvicorn, in a thread of this
process) on 127.0.0.1, warms it up, records a baseline (RSS, KV blocks), then
sends a bounded mix of requests (streamed and not, over several adapters, some
of them cancelled mid-stream by the client) with bounded concurrency until
``--num-requests`` are done or ``--duration`` seconds pass. At the end it waits
for the engine to go idle and checks that KV blocks return to 0 and that RSS
did not grow beyond a tolerance. Exit status 1 if either check fails.

    PYTHONPATH=. python benchmarks/soak.py --duration 120 --num-requests 2000
    PYTHONPATH=. python benchmarks/soak.py --model path/to/hf_dir --adapter de=path/to/peft

Without ``--model`` it builds the tiny random Llama of the tests (tests/tiny.py)
and random PEFT adapters for it (tests/server/peft_adapters.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "server")]

from inlaid.config import EngineConfig  # noqa: E402
from inlaid.engine.async_llm import AsyncLLM  # noqa: E402
from inlaid.server.app import build_app  # noqa: E402

logger = logging.getLogger("soak")
PROMPTS = ["Hello world", "Translate: cat -> chat.", "The quick brown fox", "0123456789 + - * /", "Das ist ein Test."]


def _tiny_setup(tmp: Path, num_adapters: int) -> tuple[str, dict[str, str]]:
    from peft_adapters import make_peft_adapter
    from tiny import make_tiny_llama_dir

    base = make_tiny_llama_dir(tmp / "base")
    adapters = {f"t{i}": make_peft_adapter(base, tmp / f"t{i}", r=4, seed=i + 1) for i in range(num_adapters)}
    return str(base), adapters


class _Server:
    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def _one(client: httpx.AsyncClient, model: str, rng: random.Random, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, max_tokens), "temperature": 0}
    t0 = time.perf_counter()
    if rng.random() < 0.5:
        r = await client.post("/v1/completions", json=body)
        ok = r.status_code == 200
        toks = r.json()["usage"]["completion_tokens"] if ok else 0
        return {"ok": ok, "latency": time.perf_counter() - t0, "ttft": None, "tokens": toks, "cancelled": False}
    cancel_after = rng.randint(1, 3) if rng.random() < 0.1 else None
    ttft, chunks = None, 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                if cancel_after is not None and chunks >= cancel_after:
                    break  # client disconnect mid-stream
        ok = r.status_code == 200
    return {"ok": ok, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": chunks,
            "cancelled": cancel_after is not None}


async def _load(url: str, models: list[str], n: int, duration: float, concurrency: int, max_tokens: int) -> list[dict]:
    rng = random.Random(0)
    results: list[dict] = []
    deadline = time.monotonic() + duration
    counter = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            for _ in counter:
                if time.monotonic() > deadline:
                    return
                results.append(await _one(client, rng.choice(models), rng, max_tokens))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return results


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _wait_idle(llm: AsyncLLM, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = llm.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_streams"] == 0:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return llm.stats()


def run(args: argparse.Namespace) -> int:
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model, adapters = args.model, dict(a.split("=", 1) for a in args.adapter)
    else:
        model, adapters = _tiny_setup(Path(tmp.name), args.num_adapters)
    config = EngineConfig.from_kwargs(model=model, device=args.device, max_num_seqs=args.concurrency)
    llm = AsyncLLM.from_config(config, adapters=adapters)
    models = [llm.model_name, *adapters]
    proc = psutil.Process()
    with _Server(build_app(llm)) as server:
        asyncio.run(_load(server.url, models, args.warmup, 60, args.concurrency, args.max_tokens))
        gc.collect()
        base_stats, base_rss = _wait_idle(llm), proc.memory_info().rss
        t0 = time.perf_counter()
        results = asyncio.run(_load(server.url, models, args.num_requests, args.duration, args.concurrency, args.max_tokens))
        wall = time.perf_counter() - t0
        gc.collect()
        end_stats, end_rss = _wait_idle(llm), proc.memory_info().rss
    report = _report(results, wall, base_stats, end_stats, base_rss, end_rss, args)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    tmp.cleanup()
    return 0 if report["kv_ok"] and report["rss_ok"] and report["errors"] == 0 else 1


def _report(results: list[dict], wall: float, base: dict, end: dict, rss0: int, rss1: int, args: Any) -> dict:
    lat = [r["latency"] for r in results if not r["cancelled"]]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    growth = (rss1 - rss0) / 2**20
    return {
        "requests": len(results), "cancelled": sum(r["cancelled"] for r in results),
        "errors": sum(not r["ok"] for r in results), "wall_s": round(wall, 2),
        "req_per_s": round(len(results) / wall, 2), "gen_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "latency_p50_s": round(_pct(lat, 0.5), 4), "latency_p90_s": round(_pct(lat, 0.9), 4),
        "latency_p99_s": round(_pct(lat, 0.99), 4), "ttft_p50_s": round(_pct(ttft, 0.5), 4),
        "kv_blocks_used_baseline": base["kv_blocks_used"], "kv_blocks_used_end": end["kv_blocks_used"],
        "kv_ok": end["kv_blocks_used"] == 0 and end["num_running"] == 0 and end["num_waiting"] == 0,
        "rss_baseline_mb": round(rss0 / 2**20, 1), "rss_end_mb": round(rss1 / 2**20, 1),
        "rss_growth_mb": round(growth, 1), "rss_ok": growth <= args.rss_tolerance_mb,
        "concurrency": args.concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF dir / .gguf / 'default'; omitted: tiny random Llama")
    p.add_argument("--adapter", action="append", default=[], help="NAME=PEFT_DIR (with --model)")
    p.add_argument("--num-adapters", type=int, default=4, help="random adapters for the tiny model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration", type=float, default=120.0, help="soak time bound (s)")
    p.add_argument("--num-requests", type=int, default=2000, help="request count bound")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

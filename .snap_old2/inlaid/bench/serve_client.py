"""HTTP serving benchmark client: drive a running OpenAI-compatible server with a generated workload.

Owns: ``ServeBenchConfig``, ``ClientRecord``, ``run_serve_bench`` (async) and
``bench_serve`` (sync wrapper), ``summary_table``.

How a run goes (like vLLM's ``benchmark_serving``, measured at the client):
1. ``GET /v1/models``: the base model's name, its ``max_model_len`` and the
   loaded adapters. Workload task ``t{i}`` maps to the i-th served adapter (in
   ``/v1/models`` order), to ``{adapter_prefix}{i}``, or to the i-th of the
   explicit ``task_names``; a name the server does not list is a ValueError.
2. Optional isolated probes (``calibrate`` > 0): that many requests sent one at a
   time; a least-squares fit TTFT = a + b * prompt_len and the median TPOT give
   each request's isolated run time, the SLO deadline's unit (``slo_scale``).
3. The workload (``inlaid.bench.workload``: Gamma arrivals, task popularity,
   lengths, jobs): one asyncio task per request, sent at its arrival time as a
   streamed ``POST /v1/completions`` with a token-id prompt of its prompt length,
   ``max_tokens`` = its output length, ``ignore_eos`` and greedy sampling, and
   ``stream_options.include_usage`` (the server's final usage chunk gives the
   token counts; without it the non-empty text chunks are counted and
   ``tokens_from`` says "chunks").

Invariants:
- Bounded: at most ``num_requests`` requests; none is sent after
  ``max_duration`` seconds; requests still running at ``max_duration`` are
  cancelled and recorded with status "timeout".
- A failing request (HTTP error status, in-band error event, connection error,
  aborted stream) is recorded with its status and message; the run never
  crashes because of one. Statuses: ok | error | aborted | timeout | unsent.
- Times are seconds from the start of the load phase (``time.monotonic``);
  latency is measured from the moment the request is sent.
- Lengths are clipped so that prompt + output fits the server's ``max_model_len``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from inlaid.bench.metrics import RequestRecord, summarize
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.sim.simulator import RequestSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeBenchConfig:
    """One benchmark run against one server."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    url: str = "http://127.0.0.1:8000"
    label: str = "server"
    """Name of the system/policy under test (the line name in ``inlaid bench plot``)."""
    task_names: tuple[str, ...] = ()
    """Explicit served model names for tasks t0, t1, ... (overrides the other mappings)."""
    adapter_prefix: str | None = None
    """Tasks map to ``{prefix}0``, ``{prefix}1``, ... instead of the /v1/models order."""
    max_duration: float = 600.0
    """Seconds after which nothing more is sent and running requests are cancelled."""
    slo_scale: float = 5.0
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    api_key: str | None = None
    calibrate: int = 4
    """Isolated probe requests before the load (0: no isolated time, SLO only from ttft/tpot limits)."""
    token_id_range: tuple[int, int] = (16, 256)
    """Prompt token ids are drawn uniformly from [lo, hi) (must be inside every served vocabulary)."""
    request_timeout: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the run (policy, dtype, model shape...), copied into the JSON config."""

    def __post_init__(self) -> None:
        if self.max_duration <= 0 or self.request_timeout <= 0:
            raise ValueError("max_duration and request_timeout must be > 0")
        if self.slo_scale <= 0:
            raise ValueError(f"slo_scale must be > 0, got {self.slo_scale}")
        if self.calibrate < 0:
            raise ValueError(f"calibrate must be >= 0, got {self.calibrate}")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_id_range must be 0 <= lo < hi, got {self.token_id_range}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")


@dataclass
class ClientRecord:
    """What the client saw of one request (times in seconds from the load start)."""

    request_id: str
    task: str
    model: str
    job_id: str | None
    scheduled: float
    prompt_len: int
    max_tokens: int
    status: str = "unsent"
    sent: float | None = None
    first_token: float | None = None
    finish: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    chunks: int = 0
    tokens_from: str = "usage"
    finish_reason: str | None = None
    http_status: int | None = None
    error: str | None = None
    isolated_time: float | None = None


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /v1/models`` says."""

    base_model: str
    adapters: tuple[str, ...]
    max_model_len: int | None


async def fetch_server_info(client: httpx.AsyncClient) -> ServerInfo:
    """The served base model, adapters and context limit; a non-200 answer is a ValueError."""
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models answered {resp.status_code}: {resp.text[:300]} "
                         "(is --url right? does the server need --api-key?)")
    data = resp.json().get("data", [])
    base = [m for m in data if not m.get("parent")]
    if not base:
        raise ValueError("GET /v1/models lists no base model (an entry without 'parent')")
    adapters = tuple(m["id"] for m in data if m.get("parent"))
    return ServerInfo(base[0]["id"], adapters, base[0].get("max_model_len"))


def map_tasks(cfg: ServeBenchConfig, info: ServerInfo) -> list[str]:
    """Served model name of each workload task t0..t{n-1} (see the module docstring)."""
    n = cfg.workload.num_tasks
    served = {info.base_model, *info.adapters}
    if cfg.task_names:
        names = list(cfg.task_names)
        if len(names) != n:
            raise ValueError(f"{len(names)} task names given but num_tasks is {n}")
    elif cfg.adapter_prefix is not None:
        names = [f"{cfg.adapter_prefix}{i}" for i in range(n)]
    else:
        if len(info.adapters) < n:
            raise ValueError(f"the server lists {len(info.adapters)} adapter(s) but {n} tasks were asked for: "
                             "load more (POST /v1/load_lora_adapter) or lower --tasks")
        names = list(info.adapters[:n])
    missing = [x for x in names if x not in served]
    if missing:
        raise ValueError(f"the server does not serve {missing[:5]} ({len(missing)} missing); "
                         f"GET /v1/models lists {sorted(served)[:10]}")
    return names


def fit_lengths(spec: RequestSpec, max_model_len: int | None) -> tuple[int, int]:
    """(prompt_len, output_len) clipped so that their sum fits ``max_model_len``."""
    p, o = max(spec.prompt_len, 1), max(spec.output_len, 1)
    if max_model_len is None:
        return p, o
    if max_model_len < 2:
        raise ValueError(f"the server's max_model_len is {max_model_len}; need >= 2")
    o = min(o, max_model_len - 1)
    return min(p, max_model_len - o), o


def prompt_ids(n: int, seed: int, token_id_range: tuple[int, int]) -> list[int]:
    """``n`` deterministic pseudo-random token ids in [lo, hi)."""
    rng = random.Random(seed)
    lo, hi = token_id_range
    return [rng.randrange(lo, hi) for _ in range(n)]


def completion_body(model: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500]


def _on_event(rec: ClientRecord, ev: dict[str, Any], now: float) -> None:
    """Update ``rec`` with one SSE event."""
    if "error" in ev:
        rec.status, rec.error = "error", _error_message(json.dumps(ev).encode())
        return
    for choice in ev.get("choices") or []:
        finish = choice.get("finish_reason")
        if choice.get("text") or finish is None:  # a content chunk (text may be "" without a tokenizer)
            rec.chunks += 1
            if rec.first_token is None:
                rec.first_token = now
        if finish:
            rec.finish_reason = finish
            if rec.first_token is None:  # no content chunk came before the end
                rec.first_token = now
    if ev.get("usage"):
        rec.completion_tokens = int(ev["usage"].get("completion_tokens", 0))
        rec.prompt_tokens = ev["usage"].get("prompt_tokens")


def _finish(rec: ClientRecord, done: bool, now: float) -> None:
    rec.finish = now
    if rec.status == "error":
        return
    if not done:
        rec.status, rec.error = "error", "stream ended without data: [DONE]"
    elif rec.finish_reason == "abort":
        rec.status, rec.error = "aborted", "the server aborted the request (finish_reason 'abort')"
    elif rec.finish_reason is None:
        rec.status, rec.error = "error", "stream ended without a finish_reason"
    else:
        rec.status = "ok"
    if rec.prompt_tokens is None:  # no usage chunk: count text chunks
        rec.tokens_from, rec.completion_tokens = "chunks", rec.chunks


async def send_one(client: httpx.AsyncClient, rec: ClientRecord, body: dict[str, Any], t0: float) -> None:
    """Stream one completion into ``rec``; every failure is recorded, none is raised (but cancellation)."""
    rec.sent, rec.status = time.monotonic() - t0, "running"
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            rec.http_status = resp.status_code
            if resp.status_code != 200:
                rec.status, rec.error = "error", _error_message(await resp.aread())
                rec.finish = time.monotonic() - t0
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                _on_event(rec, json.loads(line[6:]), time.monotonic() - t0)
    except (httpx.HTTPError, ValueError) as exc:
        rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"[:500]
    _finish(rec, done, time.monotonic() - t0)


@dataclass(frozen=True)
class IsolatedFit:
    """Isolated run time model: ttft = ttft_a + ttft_b * prompt_len; latency = ttft + tpot * (out - 1)."""

    ttft_a: float
    ttft_b: float
    tpot: float
    probes: int

    def time(self, prompt_len: int, output_len: int) -> float:
        return max(self.ttft_a + self.ttft_b * prompt_len, 0.0) + self.tpot * max(output_len - 1, 0)

    @classmethod
    def from_samples(cls, prompt_lens: list[float], ttfts: list[float], tpots: list[float]) -> IsolatedFit:
        """Least-squares ttft line over the probes (flat when every prompt has one length), median tpot."""
        if len(set(prompt_lens)) >= 2:
            b, a = statistics.linear_regression(prompt_lens, ttfts)
        else:
            a, b = statistics.fmean(ttfts), 0.0
        return cls(a, max(b, 0.0), statistics.median(tpots) if tpots else 0.0, len(ttfts))


def _fit(recs: list[ClientRecord]) -> IsolatedFit:
    ok = [r for r in recs if r.status == "ok" and r.sent is not None and r.first_token is not None]
    if not ok:
        raise ValueError(f"all {len(recs)} isolated probe requests failed: {recs[0].error if recs else ''}")
    xs = [float(r.prompt_len) for r in ok]
    ys = [r.first_token - r.sent for r in ok]  # type: ignore[operator]
    tpots = [(r.finish - r.first_token) / (r.completion_tokens - 1)  # type: ignore[operator]
             for r in ok if r.completion_tokens > 1]
    return IsolatedFit.from_samples(xs, ys, tpots)


async def calibrate_isolated(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str,
                             specs: list[tuple[int, int]]) -> IsolatedFit | None:
    """Send ``cfg.calibrate`` probes one at a time ((prompt, output) lengths at spread quantiles) and fit."""
    if cfg.calibrate == 0:
        return None
    pairs = sorted(specs)
    recs = []
    for k in range(cfg.calibrate):
        p, o = pairs[round(k * (len(pairs) - 1) / max(cfg.calibrate - 1, 1))]
        rec = ClientRecord(f"probe{k}", "t0", model, None, 0.0, p, o)
        body = completion_body(model, prompt_ids(p, -1 - k, cfg.token_id_range), o)
        await send_one(client, rec, body, time.monotonic())
        recs.append(rec)
    return _fit(recs)


def plan_records(cfg: ServeBenchConfig, specs: list[RequestSpec], names: list[str],
                 info: ServerInfo, iso: IsolatedFit | None) -> list[ClientRecord]:
    """One ClientRecord per workload request (lengths fitted to the server's context)."""
    recs = []
    for i, s in enumerate(specs):
        p, o = fit_lengths(s, info.max_model_len)
        task = int(str(s.adapter)[1:])
        recs.append(ClientRecord(s.request_id, str(s.adapter), names[task], s.job_id, s.arrival, p, o,
                                 isolated_time=iso.time(p, o) if iso else None))
    return recs


async def _request_task(client: httpx.AsyncClient, rec: ClientRecord, cfg: ServeBenchConfig, t0: float,
                        seed: int) -> None:
    await asyncio.sleep(max(t0 + rec.scheduled - time.monotonic(), 0.0))
    body = completion_body(rec.model, prompt_ids(rec.prompt_len, seed, cfg.token_id_range), rec.max_tokens)
    await send_one(client, rec, body, t0)


async def drive(client: httpx.AsyncClient, cfg: ServeBenchConfig, recs: list[ClientRecord]) -> float:
    """Send every record due before ``max_duration``; cancel what runs past it. Returns the load's wall time."""
    t0 = time.monotonic()
    due = [r for r in recs if r.scheduled <= cfg.max_duration]
    tasks = [asyncio.ensure_future(_request_task(client, r, cfg, t0, cfg.workload.seed * 1_000_003 + i))
             for i, r in enumerate(due)]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=cfg.max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    now = time.monotonic() - t0
    for r in due:
        if r.status in ("running", "unsent"):
            r.status, r.error = "timeout", f"still running at max_duration={cfg.max_duration}s"
            r.finish = r.finish if r.finish is not None else now
    return now


def summarize_records(cfg: ServeBenchConfig, recs: list[ClientRecord], wall: float) -> dict[str, Any]:
    """``metrics.summarize`` over the ok requests, plus counts by status."""
    counts = {s: sum(r.status == s for r in recs) for s in ("ok", "error", "aborted", "timeout", "unsent")}
    sent = len(recs) - counts["unsent"]
    ok = [RequestRecord(r.sent, r.first_token, r.finish, r.completion_tokens, r.job_id, r.isolated_time)
          for r in recs if r.status == "ok"]
    base: dict[str, Any] = {"requests": len(recs), "sent": sent, **counts, "wall_s": wall,
                            "output_tokens": sum(r.completion_tokens for r in recs if r.status == "ok"),
                            "tokens_from": sorted({r.tokens_from for r in recs if r.status == "ok"})}
    if not ok:
        return {**base, "finished": 0.0, "slo_attainment": 0.0}
    stats = summarize(ok, num_submitted=sent, slo_scale=cfg.slo_scale, ttft_slo=cfg.ttft_slo, tpot_slo=cfg.tpot_slo)
    return {**base, **stats}


def config_dict(cfg: ServeBenchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("api_key")
    d["rate"], d["num_tasks"] = cfg.workload.rate, cfg.workload.num_tasks
    return d


async def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-ready result (config, server, isolated, summary, records)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(cfg.request_timeout, connect=30.0)) as client:
        info = await fetch_server_info(client)
        names = map_tasks(cfg, info)
        specs = generate_workload(cfg.workload)
        lengths = [fit_lengths(s, info.max_model_len) for s in specs]
        iso = await calibrate_isolated(client, cfg, names[0], lengths)
        recs = plan_records(cfg, specs, names, info, iso)
        logger.info("sending %d requests to %s over %d task(s) (rate %.3g req/s, cv %.3g)", len(recs), cfg.url,
                    len(set(names)), cfg.workload.rate, cfg.workload.cv)
        wall = await drive(client, cfg, recs)
    return strict_json({"config": config_dict(cfg), "server": asdict(info), "isolated": asdict(iso) if iso else None,
                   "summary": summarize_records(cfg, recs, wall), "records": [asdict(r) for r in recs]})


def bench_serve(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Synchronous ``run_serve_bench`` (its own event loop)."""
    return asyncio.run(run_serve_bench(cfg))


def strict_json(obj: Any) -> Any:
    """NaN/inf -> None and tuples -> lists, so the result is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


SUMMARY_ROWS = (("requests (ok / sent / total)", None), ("errors / aborted / timeout", None),
                ("throughput (req/s)", "throughput_rps"), ("throughput (tok/s)", "throughput_tps"),
                ("latency mean / p99 (s)", ("latency_mean", "latency_p99")),
                ("TTFT mean / p99 (s)", ("ttft_mean", "ttft_p99")), ("TPOT mean (s)", "tpot_mean"),
                ("JCT mean (s)", "jct_mean"), ("SLO attainment", "slo_attainment"))


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def summary_table(result: dict[str, Any]) -> str:
    """A two-column markdown table of the run's summary."""
    s = result["summary"]
    lines = [f"| {result['config']['label']} | value |", "|---|---|"]
    for name, key in SUMMARY_ROWS:
        if key is None and name.startswith("requests"):
            val = f"{s['ok']} / {s['sent']} / {s['requests']}"
        elif key is None:
            val = f"{s['error']} / {s['aborted']} / {s['timeout']}"
        elif isinstance(key, tuple):
            val = " / ".join(_fmt(s.get(k)) for k in key)
        else:
            val = _fmt(s.get(key))
        lines.append(f"| {name} | {val} |")
    return "\n".join(lines) + "\n"

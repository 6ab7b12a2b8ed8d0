"""Dynamic task addition: quality before/after, serving latency during, full vs incremental cost (issue 7).

1. Quantize the base for the OLD tasks (MLGPTQ, ``--bits``/``--group-size``) -> ``old/``.
2. Cost (the paper's Table 4 shape), each in a fresh subprocess so peak RSS / CUDA peak is its own:
   full re-quantization of OLD+NEW from scratch; offline incremental (``Requantizer`` without a served model).
3. Online incremental (its own subprocess too): an ``AsyncLLM`` serves ``old/`` while closed-loop clients
   stream requests of the old tasks; the NEW adapter is added with calibration; latency p50/p99 and
   throughput before/during/after.
4. Quality: answer NLL (teacher forcing, test split; paired bootstrap interval of the change) and, with
   ``--gen-limit``, the task metric, of every task on ``old/``, the re-quantized base and the fp base; both
   incremental checkpoints are compared tensor by tensor with the full one (bit-identity).

CPU, bundled SmolLM2 + demo adapters (about 10 minutes on 2 shared cores; see results/dynamic.md):

    PYTHONPATH=. python benchmarks/dynamic.py --threads 1 --cache-dequantized --calib-samples 8 \
        --max-seq-len 128 --eval-limit 20 --gen-limit 10 --gen-max-tokens 32 --phase-seconds 90 --clients 4 \
        --notes benchmarks/results/dynamic_notes.md --out benchmarks/results/dynamic.md

GPU, 7B shapes with dummy weights (no quality table; token-id calibration):

    PYTHONPATH=. python benchmarks/dynamic.py --device cuda --model llama2-7b-shapes --load-format dummy \
        --calib-samples 32 --max-seq-len 512 --clients 16 --out benchmarks/results/dynamic_gpu_7b.md

Each run writes its page and a JSON beside it; ``--from-json A.json,B.json --out page.md`` puts several runs
on one page (``dynamic_page.py``; the re-quantization worker runs at the engine's default duty cycle unless
``--duty-cycle`` says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
from dynamic_page import load_run, merge_page, paired_change, parse_args, phase_stats  # noqa: E402 (after sys.path)

logger = logging.getLogger("dynamic")


# ---- inputs ------------------------------------------------------------------------------------
def task_inputs(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(adapters, calibration JSONL) for old + new tasks; dummy models get random token-id rows."""
    tasks = args.old + [args.new]
    if args.tiny:
        from quality import tiny_tasks

        base, data_dir, specs = tiny_tasks(work / "tiny", args.eval_limit)
        args.model, args.data_dir = str(base), str(data_dir)
        return {t.name: str(t.adapter) for t in specs}, {t.name: str(t.calib) for t in specs}
    if args.load_format == "dummy":
        from inlaid.lora.synthetic import random_adapter, save_peft
        from inlaid.model.arch import ModelArch
        from inlaid.model.loader import resolve_model_path

        arch = ModelArch.from_dir(resolve_model_path(args.model))
        rng = random.Random(0)
        calib, ads = {}, {}
        for k, t in enumerate(tasks):
            ads[t] = str(save_peft(random_adapter(t, arch.lora_module_shapes(), arch.num_layers, 16, seed=k),
                                   work / "adapters" / t))  # fmt: skip
            calib[t] = str(work / f"{t}.jsonl")
            rows = [{"input_ids": [rng.randrange(arch.vocab_size) for _ in range(args.max_seq_len)]}
                    for _ in range(args.calib_samples)]  # fmt: skip
            Path(calib[t]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ads, calib
    from inlaid.tasks.dataset import split_path

    return ({t: str(Path(args.adapters_dir) / t) for t in tasks},
            {t: str(split_path(t, "train")) for t in tasks})  # fmt: skip


def _quantize(args: argparse.Namespace, ads: dict[str, str], calib: dict[str, str], tasks: list[str],
              out: Path) -> dict[str, Any]:  # fmt: skip
    from inlaid.quant.quantize_model import quantize_model

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rep = quantize_model(args.model, {t: ads[t] for t in tasks if t in ads}, {t: calib[t] for t in tasks},
                         args.method, args.bits, args.group_size, out, max_samples=args.calib_samples,
                         max_seq_len=args.max_seq_len, device=args.device, dtype=dtype,
                         load_format=args.load_format)  # fmt: skip
    return {"seconds": rep.seconds_total, "peak_mb": rep.peak_memory_bytes / 2**20}


def _incremental_offline(args: argparse.Namespace, ckpt: Path, ads: dict[str, str], calib: dict[str, str]) -> dict:
    from inlaid.engine.requant_hook import load_samples
    from inlaid.lora.adapter import load_adapter
    from inlaid.model.arch import ModelArch
    from inlaid.quant.quantize_model import peak_memory_bytes
    from inlaid.quant.requant import Requantizer

    t0 = time.perf_counter()
    tok = _tokenizer(ckpt)
    samples = load_samples(calib[args.new], tok, args.calib_samples, 65536, args.max_seq_len)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rq = Requantizer(ckpt, ModelArch.from_dir(ckpt), device=args.device, calib_dtype=dtype,
                     load_format=args.load_format)  # fmt: skip
    rq.submit(args.new, load_adapter(args.new, ads[args.new]) if args.new in ads else None, samples)
    rq.wait(args.new)
    status = rq.status(args.new)
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_memory_bytes(torch.device(args.device)) / 2**20,
            "state": status["quantization"], "phases": status["seconds"]}  # fmt: skip


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch intra-op threads of this process (0 keeps torch's default)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def _child(fn_name: str, conn: Any, *a: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    for name in ("dynamic", "inlaid.quant.requant", "inlaid.worker.cuda_graphs"):  # the job's progress, captures
        logging.getLogger(name).setLevel(logging.INFO)
    faulthandler.enable()  # a crash in native code prints every thread's Python stack
    _set_threads(a[0])
    conn.send(globals()[fn_name](*a))
    conn.close()
    sys.stderr.flush()
    os._exit(0)  # a daemon thread wedged in a CUDA call must not keep this process from exiting


def in_subprocess(fn_name: str, *a: Any) -> dict[str, Any]:
    """Run ``fn_name(*a)`` in a spawned process (its own peak RSS / CUDA peak); RuntimeError if it dies."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(fn_name, child, *a))
    p.start()
    child.close()  # only the child holds its end now: recv() sees EOF if the child dies
    try:
        out = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"{fn_name} failed in its subprocess (exit code {p.exitcode}); see its traceback above")
    p.join(120)
    if p.is_alive():
        logger.error("%s: its subprocess did not exit after sending its result; killing it", fn_name)
        p.kill()
        p.join(10)
    return out


def _cached_linears(model: torch.nn.Module) -> int:
    """GPTQ linears of the served model that keep their weight dequantized (``gptq_dequant_cache``)."""
    return sum(1 for m in model.modules() if getattr(m, "_buffers", {}).get("dq_weight") is not None)


# ---- online: load test during the addition -------------------------------------------------
async def _client(llm: Any, prompts: list[tuple[Any, str | None]], log: list, stop: asyncio.Event, max_tokens: int,
                  seed: int) -> None:  # fmt: skip
    from inlaid.sampling import SamplingParams

    rng, k = random.Random(seed), 0
    while not stop.is_set():
        prompt, adapter = rng.choice(prompts)
        t0, ntok = time.perf_counter(), 0
        async for out in llm.generate(f"c{seed}-{k}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                             ignore_eos=True), adapter):  # fmt: skip
            ntok = len(out.token_ids)
            done = out.finished
        log.append((t0, time.perf_counter(), ntok, done))
        k += 1


async def load_test(args: argparse.Namespace, ckpt: Path, ads: dict[str, str], calib: dict[str, str]) -> dict:
    from inlaid.config import EngineConfig
    from inlaid.engine.async_llm import AsyncLLM
    from inlaid.engine.requant_hook import attach_requantizer

    # The served checkpoint is real (written by quantize_model) even for a dummy base: load it as such; only
    # the requantizer's unquantized source is dummy (its load_format below).
    cache = "on" if args.cache_dequantized else "off"  # explicit either way: the engine's "auto" depends on the device
    config = EngineConfig.from_kwargs(model=str(ckpt), device=args.device, max_loras=len(args.old) + 1,
                                      max_lora_rank=64, max_model_len=1024, gptq_dequant_cache=cache,
                                      requant_duty_cycle=args.duty_cycle, requant_threads=args.requant_threads,
                                      **_kv(args))  # fmt: skip
    llm = AsyncLLM.from_config(config, adapters={t: ads[t] for t in args.old if t in ads})
    await llm._call(lambda eng: setattr(eng, "requantizer", attach_requantizer(  # duty/threads: from the config
        eng, calib_dtype=torch.float16 if args.device == "cuda" else torch.float32, load_format=args.load_format,
        stall_timeout=getattr(args, "stall_timeout", 300.0))))
    n = await llm._call(lambda eng: _cached_linears(eng.parts.model))
    logger.info("dequantized-weight cache %s (%d GPTQ linears)", cache, n)
    prompts = _load_prompts(args, llm)
    log: list = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(_client(llm, prompts, log, stop, args.max_tokens, i)) for i in range(args.clients)]
    await asyncio.sleep(getattr(args, "warmup_seconds", 0.0))  # captures and compiles happen here, unmeasured
    marks = {"start": time.perf_counter()}
    await asyncio.sleep(args.phase_seconds)
    marks["add"] = time.perf_counter()
    rss_serving = _rss_mb()
    from inlaid.engine.requant_hook import load_samples

    # token ids with the same caps as the offline runs (a path would get the server's default caps)
    calibration: Any = load_samples(calib[args.new], _tokenizer(ckpt), args.calib_samples, 65536, args.max_seq_len)
    await llm.add_adapter(args.new, ads[args.new], calibration=calibration)
    timeout = getattr(args, "requant_timeout", 600.0)
    faulthandler.dump_traceback_later(timeout + 120)  # backstop if even this event loop stops: stacks to stderr
    status, timed_out = await await_job(llm, args.new, timeout)
    marks["done"] = time.perf_counter()
    if not timed_out:
        status = await asyncio.wait_for(llm.adapter_status(args.new), 60)
        await asyncio.sleep(args.phase_seconds)
    marks["end"] = time.perf_counter()
    stop.set()
    if clients:
        _, stuck = await asyncio.wait(clients, timeout=60)
        for c in stuck:  # requests of a wedged engine never finish: stop waiting for them
            c.cancel()
    try:
        await asyncio.wait_for(llm.shutdown(10), 60)
    except asyncio.TimeoutError:
        logger.error("engine shutdown did not finish in 60 s")
    faulthandler.cancel_dump_traceback_later()
    return {"phases": phase_stats(log, marks), "status": status, "requests": len(log), "timed_out": timed_out,
            "all_finished": all(d for *_, d in log), "rss_serving_mb": rss_serving, "cached_linears": n,
            "straddling": sum(1 for s, e, *_ in log if s < marks["add"] < e or s < marks["done"] < e)}


async def await_job(llm: Any, name: str, timeout: float, poll: float = 0.2) -> tuple[dict[str, Any], bool]:
    """Poll the addition of ``name`` until it ends or ``timeout`` s pass; returns (last status, timed out).

    Reads ``AsyncLLM.requant_statuses()`` (thread-safe: it answers even when the engine thread is stuck), logs
    every change of state / phase / layer counts, and on timeout logs the last status and dumps every thread's
    Python stack to stderr (where the worker and the engine thread are waiting).
    """
    t0, key, last = time.perf_counter(), None, None
    while True:
        st = next((s for s in llm.requant_statuses() if s.get("name") == name), None)
        k = None if st is None else (st["quantization"], st["phase"], st.get("layers_calibrated"), st["layer"],
                                     st["layers_swapped"])  # fmt: skip
        if k != key:
            logger.info("requant %r after %.1f s: %s", name, time.perf_counter() - t0,
                        "no job yet" if st is None else {x: st.get(x) for x in (
                            "quantization", "phase", "layers_calibrated", "layer", "layers_swapped", "num_layers",
                            "last_event", "error")})  # fmt: skip
            key = k
        last = st if st is not None else last
        if st is not None and st["quantization"] not in ("pending", "running"):
            return st, False
        if time.perf_counter() - t0 > timeout:
            logger.error("requant %r: gave up after %.0f s (--requant-timeout); last status: %s; thread stacks "
                         "follow", name, timeout, last)  # fmt: skip
            faulthandler.dump_traceback(all_threads=True)
            base = last or {"name": name, "quantization": "unknown", "phase": "not started", "seconds": {}}
            return {**base, "timed_out_after_s": timeout}, True
        await asyncio.sleep(poll)


def _load_prompts(args: argparse.Namespace, llm: Any) -> list[tuple[Any, str | None]]:
    if args.load_format == "dummy":
        from inlaid.model.arch import ModelArch
        from inlaid.model.loader import resolve_model_path

        vocab = ModelArch.from_dir(resolve_model_path(args.model)).vocab_size
        rng = random.Random(1)
        return [([rng.randrange(vocab) for _ in range(64)], args.old[i % len(args.old)]) for i in range(16)]
    from inlaid.tasks.dataset import load_split

    out = []
    for t in args.old:
        for e in load_split(t, "test", 8, Path(args.data_dir) if args.data_dir else None):
            out.append(([{"role": "user", "content": e.prompt}], t))
    return [(p if isinstance(p, str) else _chat_text(llm, p), a) for p, a in out]


def _chat_text(llm: Any, messages: list[dict]) -> str:
    tok = llm.engine.tokenizer
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- quality -------------------------------------------------------------------------------------
def task_eval(ckpt: str | Path, tasks: list[str], ads: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Per task (with its adapter) on ``ckpt``: answer NLL (teacher forcing, test split; pooled over answer
    tokens, plus each example's ``[sum of -log p, tokens]`` for paired statistics) and, with ``--gen-limit``,
    the task metric on greedy outputs of the first ``--gen-limit`` examples."""
    from inlaid import LLM
    from inlaid.tasks.evaluate import answer_logprobs, evaluate_runs
    from inlaid.tasks.metrics import answer_nll

    import gc

    gc.collect()  # the previous engine's KV cache, before this one sizes its own
    llm = LLM(model=str(ckpt), adapters={t: ads[t] for t in tasks}, device=args.device, max_model_len=2048,
              max_lora_rank=64, max_loras=len(tasks), **_kv(args))  # fmt: skip
    data_dir = Path(args.data_dir) if args.data_dir else None
    items = {t: _encoded(llm, t, args.eval_limit, data_dir) for t in tasks}
    flat = [(p, a, t) for t in tasks for p, a in items[t]]
    lps = iter(answer_logprobs(llm, flat))
    out = {}
    for t in tasks:
        mine = [next(lps) for _ in items[t]]
        out[t] = {"nll": answer_nll(mine), "nll_examples": len(mine),
                  "per_example": [[-sum(x), len(x)] for x in mine]}  # fmt: skip
    if args.gen_limit > 0:
        gen = evaluate_runs(llm, [(t, t) for t in tasks], limit=args.gen_limit, nll=False, data_dir=data_dir,
                            max_new_tokens_cap=args.gen_max_tokens)  # fmt: skip
        for r in gen.runs:
            out[r.task].update(metric=r.metric, metric_name=r.metric_name, metric_examples=r.examples)
    del llm
    gc.collect()
    return out


def _encoded(llm: Any, task: str, limit: int, data_dir: Path | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the first ``limit`` test examples, exactly as ``evaluate_runs`` encodes them."""
    from inlaid.tasks.dataset import load_split
    from inlaid.tasks.prompting import encode_example
    from inlaid.tasks.registry import get_task

    return [encode_example(llm.tokenizer, get_task(task), e.prompt, e.completion)
            for e in load_split(task, "test", limit, data_dir)]  # fmt: skip


def _kv(args: argparse.Namespace) -> dict[str, int]:
    """A fixed KV cache on CUDA (the default takes 90% of free memory, leaving none to the next engine)."""
    return {"num_blocks": 2048} if args.device == "cuda" else {}


def identical(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def _online(args: argparse.Namespace, ckpt: Path, ads: dict[str, str], calib: dict[str, str]) -> dict[str, Any]:
    """The load test in this (child) process: its peak RSS is serving plus the online re-quantization."""
    from inlaid.quant.quantize_model import peak_memory_bytes

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = asyncio.run(load_test(args, ckpt, ads, calib))
    out["peak_mb"] = peak_memory_bytes(torch.device(args.device)) / 2**20
    return out


def _rss_mb() -> float:
    """Current resident set size of this process (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ads, calib = task_inputs(args, work)
    res: dict[str, Any] = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "cost": {},
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timings": {}}  # fmt: skip
    res["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    tasks = args.old + [args.new]
    t0 = time.perf_counter()
    res["cost"]["old base (old tasks)"] = in_subprocess("_quantize", args, ads, calib, args.old, work / "old")
    res["cost"]["full (all tasks, from scratch)"] = in_subprocess("_quantize", args, ads, calib, tasks, work / "full")
    shutil.copytree(work / "old", work / "offline")
    res["cost"]["offline incremental"] = in_subprocess("_incremental_offline", args, work / "offline", ads, calib)
    shutil.copytree(work / "old", work / "online")
    res["timings"]["quantizations_s"] = time.perf_counter() - t0
    quality = args.load_format != "dummy"
    if quality:
        res["eval"] = {"old": task_eval(work / "old", tasks, ads, args)}
    res["incomplete"] = []
    try:
        res["load"] = in_subprocess("_online", args, work / "online", ads, calib)
    except RuntimeError as e:  # the page still gets the rows that completed
        res["load"] = {"error": str(e)}
    st = res["load"].get("status", {"quantization": "not run", "phase": "?", "seconds": {}})
    res["cost"]["online incremental (while serving)"] = {"seconds": st["seconds"].get("total", float("nan")),
                                                         "peak_mb": res["load"].get("peak_mb", float("nan")),
                                                         "phases": st["seconds"], "state": st["quantization"]}  # fmt: skip
    online_done = st["quantization"] == "done"
    if not online_done:
        res["incomplete"].append(online_failure(res["load"], st))
    if quality:
        if online_done:
            res["eval"]["requantized"] = task_eval(work / "online", tasks, ads, args)
        if not args.no_fp_reference:
            res["eval"]["fp"] = task_eval(args.model, tasks, ads, args)
        ev = res["eval"]
        if online_done:
            res["paired"] = {t: paired_change(ev["old"][t]["per_example"], ev["requantized"][t]["per_example"])
                             for t in tasks}  # fmt: skip
    res["identical"] = {"online": identical(work / "online", work / "full") if online_done else None,
                        "offline": identical(work / "offline", work / "full")}  # fmt: skip
    res["timings"]["total_s"] = time.perf_counter() - t0
    return res


def online_failure(load: dict[str, Any], st: dict[str, Any]) -> str:
    """One line for the page: how the online addition ended when it did not finish."""
    if "error" in load:
        return f"the online run failed: {load['error']}"
    how = (f"gave up after {st['timed_out_after_s']:.0f} s (--requant-timeout)" if "timed_out_after_s" in st
           else f"ended '{st['quantization']}'")
    return (f"the online addition {how} in phase {st.get('phase')} (layers calibrated {st.get('layers_calibrated')}, "
            f"quantized {st.get('layer')}, swapped {st.get('layers_swapped')} of {st.get('num_layers')}; last event: "
            f"{st.get('last_event')}; error: {st.get('error')}); the re-quantized base's quality and the online "
            "bit-identity were not measured")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.old, args.new = ["definitions", "math_gsm"], "trivia_qa"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.from_json:
        runs = [load_run(path, args) for path in args.from_json.split(",") if path]
    else:
        _set_threads(args)
        res = run(args)
        res["args"] = vars(args)
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
        runs = [(args, res)]
    Path(args.out).write_text(merge_page(runs, args.notes))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

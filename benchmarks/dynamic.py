"""Dynamic task addition: quality before/after, serving latency during, full vs incremental cost (issue 7).

1. Quantize the base for the OLD tasks (MLGPTQ, ``--bits``/``--group-size``) -> ``old/``.
2. Cost (the paper's Table 4 shape), each in a fresh subprocess so peak RSS / CUDA peak is its own:
   full re-quantization of OLD+NEW from scratch; offline incremental (``Requantizer`` without a served model).
3. Online incremental: an ``AsyncLLM`` serves ``old/`` while closed-loop clients stream requests of the old
   tasks; the NEW adapter is added with calibration; latency p50/p99 and throughput before/during/after.
4. Quality: answer NLL (teacher forcing, task test split) of every task on ``old/`` vs the re-quantized base;
   the incremental checkpoint is compared tensor by tensor with the full one (bit-identity).

CPU, bundled SmolLM2 + demo adapters (a few minutes on 2 cores):

    PYTHONPATH=. python benchmarks/dynamic.py --out benchmarks/results/dynamic.md

GPU, 7B shapes with dummy weights (no quality table; token-id calibration):

    PYTHONPATH=. python benchmarks/dynamic.py --device cuda --model llama2-7b-shapes --load-format dummy \\
        --calib-samples 32 --max-seq-len 512 --clients 16 --out benchmarks/results/dynamic_gpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
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
            rows = [{"input_ids": [rng.randrange(32000) for _ in range(args.max_seq_len)]}
                    for _ in range(args.calib_samples)]  # fmt: skip
            Path(calib[t]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ads, calib
    from inlaid.tasks.dataset import split_path

    return ({t: str(ROOT / "inlaid" / "adapters" / t) for t in tasks},
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


def _child(fn_name: str, conn: Any, *a: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    conn.send(globals()[fn_name](*a))


def in_subprocess(fn_name: str, *a: Any) -> dict[str, Any]:
    """Run ``fn_name(*a)`` in a spawned process (its own peak RSS / CUDA peak)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(fn_name, child, *a))
    p.start()
    out = parent.recv()
    p.join()
    return out


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

    config = EngineConfig.from_kwargs(model=str(ckpt), device=args.device, max_loras=len(args.old) + 1,
                                      max_lora_rank=64, max_model_len=1024, load_format=args.load_format,
                                      **_kv(args))  # fmt: skip
    llm = AsyncLLM.from_config(config, adapters={t: ads[t] for t in args.old if t in ads})
    await llm._call(lambda eng: setattr(eng, "requantizer", attach_requantizer(
        eng, num_threads=args.requant_threads, duty_cycle=args.duty_cycle,
        calib_dtype=torch.float16 if args.device == "cuda" else torch.float32, load_format=args.load_format)))
    prompts = _load_prompts(args, llm)
    log: list = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(_client(llm, prompts, log, stop, args.max_tokens, i)) for i in range(args.clients)]
    marks = {"start": time.perf_counter()}
    await asyncio.sleep(args.phase_seconds)
    marks["add"] = time.perf_counter()
    from inlaid.engine.requant_hook import load_samples

    # token ids with the same caps as the offline runs (a path would get the server's default caps)
    calibration: Any = load_samples(calib[args.new], _tokenizer(ckpt), args.calib_samples, 65536, args.max_seq_len)
    await llm.add_adapter(args.new, ads[args.new], calibration=calibration)
    while (await llm.adapter_status(args.new))["quantization"] in ("pending", "running"):
        await asyncio.sleep(0.2)
    marks["done"] = time.perf_counter()
    status = await llm.adapter_status(args.new)
    await asyncio.sleep(args.phase_seconds)
    marks["end"] = time.perf_counter()
    stop.set()
    await asyncio.gather(*clients)
    await llm.shutdown(10)
    return {"phases": _phase_stats(log, marks), "status": status, "requests": len(log),
            "all_finished": all(d for *_, d in log)}


def _load_prompts(args: argparse.Namespace, llm: Any) -> list[tuple[Any, str | None]]:
    if args.load_format == "dummy":
        rng = random.Random(1)
        return [([rng.randrange(32000) for _ in range(64)], args.old[i % len(args.old)]) for i in range(16)]
    from inlaid.tasks.dataset import load_split

    out = []
    for t in args.old:
        for e in load_split(t, "test", 8, Path(args.data_dir) if args.data_dir else None):
            out.append(([{"role": "user", "content": e.prompt}], t))
    return [(p if isinstance(p, str) else _chat_text(llm, p), a) for p, a in out]


def _chat_text(llm: Any, messages: list[dict]) -> str:
    tok = llm.engine.tokenizer
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _phase_stats(log: list, marks: dict[str, float]) -> dict[str, dict[str, float]]:
    spans = {"before": (marks["start"], marks["add"]), "during": (marks["add"], marks["done"]),
             "after": (marks["done"], marks["end"])}  # fmt: skip
    out = {}
    for name, (a, b) in spans.items():
        lat = sorted(e - s for s, e, _, _ in log if a <= s < b)
        toks = sum(n for s, e, n, _ in log if a <= e < b)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        out[name] = {"seconds": b - a, "requests": len(lat), "p50": q[49], "p99": q[98],
                     "tok_per_s": toks / (b - a) if b > a else float("nan")}  # fmt: skip
    return out


# ---- quality -------------------------------------------------------------------------------------
def task_nll(ckpt: Path, tasks: list[str], ads: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Answer NLL per task (teacher forcing, test split) on ``ckpt`` with each task's adapter."""
    from inlaid import LLM
    from inlaid.tasks.evaluate import evaluate_runs

    import gc

    gc.collect()  # the previous engine's KV cache, before this one sizes its own
    llm = LLM(model=str(ckpt), adapters={t: ads[t] for t in tasks}, device=args.device, max_model_len=2048,
              max_lora_rank=64, max_loras=len(tasks), **_kv(args))  # fmt: skip
    res = evaluate_runs(llm, [(t, t) for t in tasks], limit=args.eval_limit, generate=False,
                        data_dir=Path(args.data_dir) if args.data_dir else None)  # fmt: skip
    return {r.task: r.nll for r in res.runs}


def _kv(args: argparse.Namespace) -> dict[str, int]:
    """A fixed KV cache on CUDA (the default takes 90% of free memory, leaving none to the next engine)."""
    return {"num_blocks": 2048} if args.device == "cuda" else {}


def identical(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# ---- report -------------------------------------------------------------------------------------
def to_markdown(args: argparse.Namespace, res: dict[str, Any]) -> str:
    lines = [f"# Dynamic task addition ({Path(args.model).name}, {res.get('device', args.device)}, {args.bits}-bit "
             f"g{args.group_size} sym, {args.method})",
             "", f"Old tasks: {', '.join(args.old)}; added: **{args.new}**. Command: `{res['command']}`", ""]
    if "nll" in res:
        lines += ["## Quality: answer NLL (nats/token, lower is better; test split, first "
                  f"{args.eval_limit} examples)", "", "| task | old base | re-quantized base | change |", "|---|---|---|---|"]
        for t in args.old + [args.new]:
            b, a = res["nll"]["before"][t], res["nll"]["after"][t]
            lines.append(f"| {t}{' (new)' if t == args.new else ''} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
        lines += ["", f"Incremental checkpoint bit-identical to quantizing all tasks from scratch: "
                  f"**{res['identical']}**", ""]
    lines += ["## Serving during the addition (closed loop, "
              f"{args.clients} clients, {args.max_tokens} tokens/request)", "",
              "| phase | seconds | requests | p50 latency s | p99 latency s | tokens/s |", "|---|---|---|---|---|---|"]
    for name, s in res["load"]["phases"].items():
        lines.append(f"| {name} | {s['seconds']:.1f} | {s['requests']} | {s['p50']:.3f} | {s['p99']:.3f} | "
                     f"{s['tok_per_s']:.1f} |")
    lines += ["", f"All {res['load']['requests']} requests finished: **{res['load']['all_finished']}**. "
              f"Requant worker: {args.requant_threads} thread(s), duty cycle {args.duty_cycle}.", "",
              "## Cost: full vs incremental (the paper's Table 4 shape)", "",
              "| mode | seconds | peak memory MB |", "|---|---|---|"]
    for mode, c in res["cost"].items():
        lines.append(f"| {mode} | {c['seconds']:.1f} | {c.get('peak_mb', float('nan')):.0f} |")
    lines += ["", "Peak memory: process peak RSS on CPU (each offline mode in its own process), "
              "`torch.cuda.max_memory_allocated` on CUDA. Online = wall time of the addition while serving.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ads, calib = task_inputs(args, work)
    res: dict[str, Any] = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "cost": {}}
    res["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    in_subprocess("_quantize", args, ads, calib, args.old, work / "old")
    res["cost"]["full (all tasks, from scratch)"] = in_subprocess("_quantize", args, ads, calib,
                                                                  args.old + [args.new], work / "full")  # fmt: skip
    shutil.copytree(work / "old", work / "offline")
    res["cost"]["offline incremental"] = in_subprocess("_incremental_offline", args, work / "offline", ads, calib)
    shutil.copytree(work / "old", work / "online")
    quality = args.load_format != "dummy"
    if quality:
        res["nll"] = {"before": task_nll(work / "old", args.old + [args.new], ads, args)}
    res["load"] = asyncio.run(load_test(args, work / "online", ads, calib))
    res["cost"]["online incremental (while serving)"] = {"seconds": res["load"]["status"]["seconds"]["total"]}
    if quality:
        res["nll"]["after"] = task_nll(work / "online", args.old + [args.new], ads, args)
    res["identical"] = identical(work / "online", work / "full") and identical(work / "offline", work / "full")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--old", nargs="+", default=["translate_en_de", "math_gsm", "trivia_qa"])
    p.add_argument("--new", default="translate_en_fr")
    p.add_argument("--method", default="mlgptq-diag", help="mlgptq-diag (default) | mlgptq | mlgptq-psd | gptq-mixed")
    p.add_argument("--tiny", action="store_true", help="tiny random model, random adapters, synthetic data")
    p.add_argument("--data-dir", default=None, help="task data root (default: the package's; --tiny sets it)")
    p.add_argument("--from-json", default=None, help="only regenerate --out from this results JSON")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--requant-threads", type=int, default=1)
    p.add_argument("--duty-cycle", type=float, default=1.0)
    p.add_argument("--work", default="/tmp/inlaid_dynamic")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic.md"))
    args = p.parse_args()
    if args.tiny:
        args.old, args.new = ["definitions", "math_gsm"], "trivia_qa"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**vars(args), **res["args"], "out": args.out})
    else:
        res = run(args)
        res["args"] = vars(args)
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    Path(args.out).write_text(to_markdown(args, res))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

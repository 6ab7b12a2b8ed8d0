"""Quality of quantized shared bases per task (the paper's Table 2 on our task suite).

For every (bits, group size) and method -- unquantized, MLGPTQ (and its PSD
repairs), GPTQ-mixed, RTN and per-task GPTQ (``gptq-single`` with the task's own
Hessian, one model per task) -- evaluates each task through OUR engine
(``LLM``, greedy, batched, every adapter in one run) and reports the task
metric and the answer-token NLL (teacher forcing with the engine's model and a
one-slot LoRA pool). Calibration runs once per task (train split, with the
task's adapter) into one Hessian store; every method is then quantized from it.

Real run (bundled SmolLM2 + the demo adapters in inlaid/adapters/<task>/;
tasks without an adapter directory are calibrated and evaluated on the bare base
and marked so):

    PYTHONPATH=. python benchmarks/quality.py --limit 50 --configs 4:64,3:64 \\
        --out benchmarks/results/quality.md

Demo on the tiny random model with random adapters and synthetic JSONL
(exercises every code path in about a minute):

    PYTHONPATH=.:tests python benchmarks/quality.py --tiny --out benchmarks/results/quality_tiny.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("quality")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TaskSpec:
    name: str
    adapter: str | None
    calib: Path
    examples: list[Any]  # inlaid.tasks.dataset.Example-like: prompt, completion
    metric: str
    max_new_tokens: int


@dataclass
class Cell:
    metric: float
    nll: float


@dataclass
class Results:
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (config, method, task)
    seconds: dict[str, float] = field(default_factory=dict)


def answer_logprobs(llm: Any, adapter_path: str | None, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
    """log p(answer token | prefix) under the engine's model with the adapter (teacher forcing)."""
    from inlaid.kernels.paged_attention import allocate_kv_caches
    from inlaid.lora.adapter import load_adapter
    from inlaid.quant.calibrate import BLOCK_SIZE, prefill_batch, single_adapter_pool

    parts = llm.engine.parts
    model, arch, dev = parts.model, parts.arch, parts.device
    ids = prompt_ids + answer_ids
    pool = single_adapter_pool(load_adapter("eval", adapter_path), arch, dev, parts.dtype) if adapter_path else None
    batch, n_blocks = prefill_batch([ids], dev, 0 if pool else -1)
    caches = allocate_kv_caches(arch.num_layers, n_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                                parts.dtype, dev)  # fmt: skip
    saved = model.lora_hook
    model.lora_hook = pool
    try:
        with torch.inference_mode():
            hidden = model(batch, caches)
            rows = torch.arange(len(prompt_ids) - 1, len(ids) - 1, device=dev)
            logp = torch.log_softmax(model.compute_logits(hidden.index_select(0, rows)), dim=-1)
    finally:
        model.lora_hook = saved
    return logp.gather(1, torch.tensor(answer_ids, device=dev)[:, None])[:, 0].tolist()


def evaluate(model_dir: Path, tasks: list[TaskSpec], with_generation: bool) -> dict[str, Cell]:
    """Metric (greedy generation, all tasks batched together) and answer NLL per task."""
    from inlaid import LLM, SamplingParams
    from inlaid.tasks.metrics import answer_nll, compute_metric
    from inlaid.tasks.prompting import encode_example
    from inlaid.tasks.registry import Task

    adapters = {t.name: t.adapter for t in tasks if t.adapter}
    llm = LLM(model=str(model_dir), adapters=adapters, device="cpu", max_loras=max(1, len(adapters)),
              max_lora_rank=64, max_model_len=2048)  # fmt: skip
    tok = llm.tokenizer
    enc = {}
    for t in tasks:
        shim = Task(t.name, "qa", "-", "-", "{input}", t.metric, t.max_new_tokens, 1, ("q_proj",))
        enc[t.name] = [encode_example(tok, shim, e.prompt, e.completion) for e in t.examples]
    metrics = {t.name: float("nan") for t in tasks}
    if with_generation:
        prompts = [p for t in tasks for p, _ in enc[t.name]]
        which = [t.name if t.adapter else None for t in tasks for _ in enc[t.name]]
        params = [SamplingParams(max_tokens=t.max_new_tokens, temperature=0.0) for t in tasks for _ in enc[t.name]]
        outs = iter(llm.generate(prompts, params, adapter=which, use_tqdm=True))
        for t in tasks:
            preds = [next(outs).text.strip() for _ in enc[t.name]]
            metrics[t.name] = compute_metric(t.metric, preds, [e.completion for e in t.examples])
    cells = {}
    for t in tasks:
        lps = [answer_logprobs(llm, t.adapter, p, a) for p, a in enc[t.name]]
        cells[t.name] = Cell(metrics[t.name], answer_nll(lps))
    return cells


# ---- task setup -------------------------------------------------------------------
def real_tasks(names: list[str] | None, adapters_dir: Path, limit: int, work: Path) -> list[TaskSpec]:
    """Tasks of the suite: test split (first ``limit``) for eval, train split for calibration."""
    from inlaid.tasks.dataset import load_split, split_path
    from inlaid.tasks.registry import resolve_tasks

    specs = []
    for task in resolve_tasks(names or "all"):
        adir = adapters_dir / task.name
        adapter = str(adir) if (adir / "adapter_config.json").is_file() else None
        if adapter is None:
            logger.warning("task %s: no adapter in %s; calibrating and evaluating the bare base", task.name, adir)
        specs.append(TaskSpec(task.name, adapter, split_path(task.name, "train"), load_split(task.name, "test", limit),
                              task.metric, task.max_new_tokens))  # fmt: skip
    return specs


def tiny_tasks(work: Path, limit: int) -> tuple[Path, list[TaskSpec]]:
    """The tiny random model, three random PEFT adapters and synthetic prompt/completion JSONL."""
    from tiny import make_peft_adapter, make_tiny_llama_dir

    from inlaid.tasks.dataset import Example

    base = work / "tiny_base"
    if not (base / "config.json").is_file():
        make_tiny_llama_dir(base)
    kinds = {"copy": (["q_proj", "v_proj"], lambda i: f"cat {i}", lambda i: f"cat {i}"),
             "add": (["gate_proj", "up_proj", "down_proj"], lambda i: f"{i} + {i}", lambda i: str(2 * i)),
             "greet": (["q_proj", "k_proj", "v_proj", "o_proj"], lambda i: f"Hello {i}", lambda i: "Hello world")}
    specs = []
    for k, (name, (targets, prompt, answer)) in enumerate(kinds.items()):
        adir = work / f"tiny_adapter_{name}"
        if not (adir / "adapter_config.json").is_file():
            make_peft_adapter(base, adir, 4, targets, seed=10 + k)
        rows = [{"prompt": prompt(i), "completion": answer(i)} for i in range(40 + limit)]
        calib = work / f"tiny_{name}.jsonl"
        calib.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
        examples = [Example(f"{name}/{i}", name, r["prompt"], r["completion"]) for i, r in enumerate(rows[40:])]
        specs.append(TaskSpec(name, str(adir), calib, examples, "rougeL", 8))
    return base, specs


# ---- quantization -------------------------------------------------------------------
def build_store(model: str, tasks: list[TaskSpec], work: Path, samples: int, max_seq_len: int) -> tuple[Any, Path]:
    """Calibrate every task once (with its adapter) into ``work/hessians``; returns (store, model dir)."""
    from inlaid.config import ModelConfig
    from inlaid.lora.adapter import load_adapter
    from inlaid.model.loader import load_model
    from inlaid.quant.calibrate import calibrate_task, load_calibration
    from inlaid.quant.hessian import HessianStore
    from transformers import AutoTokenizer

    fp, arch, src = load_model(ModelConfig(model=model), torch.device("cpu"), torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src))
    store = HessianStore(work / "hessians")
    for t in tasks:
        if t.name in store.tasks():
            continue
        ids = load_calibration(t.calib, tok, max_samples=samples, max_tokens=samples * max_seq_len, max_seq_len=max_seq_len)
        adapter = load_adapter(t.name, t.adapter) if t.adapter else None
        calibrate_task(fp, arch, t.name, ids, adapter, store, torch.device("cpu"), torch.float32)
    return store, src


def write_checkpoint(src: Path, store: Any, tasks: list[str], method: str, bits: int, gs: int, sym: bool,
                     task: str | None, out: Path) -> Path:  # fmt: skip
    from inlaid.model.loader import load_weights
    from inlaid.quant.quantize_model import QuantConfig, copy_side_files, linear_layers, quantize_weights
    from inlaid.quant.pack import save_quantized_checkpoint

    if (out / "model.safetensors").is_file():
        return out
    state = dict(load_weights(src))
    packed = quantize_weights(state, store, tasks, method, bits, gs, sym, task=task)
    quantized = {f"{n}.weight" for n in packed}
    linear_layers(state)
    others = {k: v for k, v in state.items() if k not in quantized}
    config = json.loads((src / "config.json").read_text())
    qc = QuantConfig(method, bits, gs, sym, task=task).checkpoint_config()
    save_quantized_checkpoint(out, packed, qc, others, config)
    copy_side_files(src, out)
    return out


# ---- the run ---------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Results:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        base, tasks = tiny_tasks(work, args.limit)
        model = str(base)
    else:
        model, tasks = args.model, real_tasks(args.tasks, Path(args.adapters_dir), args.limit, work)
    res = Results()
    t0 = time.perf_counter()
    store, src = build_store(model, tasks, work, args.calib_samples, args.max_seq_len)
    res.seconds["calibrate"] = time.perf_counter() - t0
    names = [t.name for t in tasks]
    gen = not args.nll_only
    for name, cell in evaluate(src, tasks, gen).items():
        res.cells[("fp", "unquantized", name)] = cell
    for cfg in args.configs.split(","):
        bits, gs = (int(v) for v in cfg.split(":"))
        for method in [m for m in args.methods.split(",") if m != "gptq-single"]:
            t1 = time.perf_counter()
            qdir = write_checkpoint(src, store, names, method, bits, gs, args.sym, None, work / f"{method}-{bits}-{gs}")
            res.seconds[f"quantize {method} {cfg}"] = time.perf_counter() - t1
            for name, cell in evaluate(qdir, tasks, gen).items():
                res.cells[(cfg, method, name)] = cell
        if "gptq-single" in args.methods.split(","):
            for t in tasks:
                qdir = write_checkpoint(src, store, names, "gptq-single", bits, gs, args.sym, t.name,
                                        work / f"single-{t.name}-{bits}-{gs}")  # fmt: skip
                res.cells[(cfg, "gptq-single", t.name)] = evaluate(qdir, [t], gen)[t.name]
        logger.info("config %s done", cfg)
    return res


def _rel_drop(base: Cell, q: Cell, use_metric: bool) -> float:
    if use_metric:
        return (base.metric - q.metric) / base.metric if base.metric > 0 else float("nan")
    return (q.nll - base.nll) / base.nll


def to_markdown(res: Results, args: argparse.Namespace, tasks: list[str], command: str) -> str:
    methods = ["unquantized", *args.methods.split(",")]
    lines = ["# Quantized shared base: per-task quality", "", f"Command: `{command}`", "",
             "Each cell: task metric (0-100, greedy generation through the engine) / answer-token NLL (nats, "
             "teacher forcing). `mean rel. drop` averages (unquantized - q) / unquantized of the metric over tasks "
             "with a non-zero unquantized metric, and (q - unquantized) / unquantized of the NLL.", ""]  # fmt: skip
    for cfg in args.configs.split(","):
        bits, gs = cfg.split(":")
        lines += [f"## {bits}-bit, group {gs}, {'symmetric' if args.sym else 'asymmetric'}", "",
                  "| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]  # fmt: skip
        for t in tasks:
            row = []
            for m in methods:
                c = res.cells.get(("fp" if m == "unquantized" else cfg, m, t))
                row.append("-" if c is None else f"{c.metric:.1f} / {c.nll:.3f}")
            lines.append(f"| {t} | " + " | ".join(row) + " |")
        drops = []
        for m in methods[1:]:
            vals = []
            for use_metric in (True, False):
                d = [_rel_drop(res.cells[("fp", "unquantized", t)], res.cells[(cfg, m, t)], use_metric)
                     for t in tasks if (cfg, m, t) in res.cells]  # fmt: skip
                d = [x for x in d if x == x]
                vals.append(f"{100 * sum(d) / len(d):+.1f}%" if d else "n/a")
            drops.append(" / ".join(vals))
        lines += ["| **mean rel. drop** (metric / NLL) | - | " + " | ".join(drops) + " |", ""]
    lines += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()), ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--adapters-dir", default=str(ROOT / "inlaid" / "adapters"))
    p.add_argument("--limit", type=int, default=50, help="test examples per task")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples per task (train split)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--configs", default="4:128,4:64,3:128,3:64", help="bits:group_size, comma-separated")
    p.add_argument("--methods", default="mlgptq,gptq-mixed,rtn,gptq-single")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--nll-only", action="store_true", help="skip generation (metric columns become nan)")
    p.add_argument("--tiny", action="store_true", help="tiny random model + random adapters + synthetic data")
    p.add_argument("--work", default="/tmp/inlaid_quality")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run(args)
    tasks = sorted({t for (_, _, t) in res.cells})
    command = "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(to_markdown(res, args, tasks, command))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"|".join(k): vars(v) for k, v in res.cells.items()} | {"seconds": res.seconds}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

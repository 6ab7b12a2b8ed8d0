"""Quality of quantized shared bases per task (the paper's Table 2 on our task suite).

For every (bits, group size) and method -- unquantized, MLGPTQ (and its PSD
repairs), GPTQ-mixed, RTN and per-task GPTQ (``gptq-single`` with the task's own
Hessian, one model per task) -- evaluates each task through OUR engine
(``inlaid.tasks.evaluate``: greedy, one mixed run with every task's adapter)
and reports the task metric and the answer-token NLL (teacher forcing with the
engine's model and a LoRA pool). Calibration runs once per task (train split, with the
task's adapter) into one Hessian store; every method is then quantized from it.

Real run (bundled SmolLM2 + the demo adapters in inlaid/adapters/<task>/;
tasks without an adapter directory are calibrated and evaluated on the bare base
and marked so):

    PYTHONPATH=. python benchmarks/quality.py --limit 20 --nll-only --configs 3:64,4:128 \\
        --calib-samples 32 --single-tasks math_gsm,translate_en_de --out benchmarks/results/quality.md

(group 128 leaves a partial last group on SmolLM2's 576 inputs; supported.)

Demo on the tiny random model with random adapters and synthetic JSONL
(exercises every code path in about a minute):

    PYTHONPATH=.:tests python benchmarks/quality.py --tiny --out benchmarks/results/quality_tiny.md
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
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
    name: str  # a task of inlaid.tasks.registry (its data: data_dir/<name>/{train,test}.jsonl)
    adapter: str | None
    calib: Path


@dataclass
class Cell:
    metric: float
    nll: float


@dataclass
class Results:
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (config, method, task)
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate(model_dir: Path, tasks: list[TaskSpec], with_generation: bool, limit: int,
             data_dir: Path | None) -> dict[str, Cell]:  # fmt: skip
    """Metric and answer NLL per task via ``inlaid.tasks.evaluate`` (one mixed engine run, each task's adapter)."""
    from inlaid import LLM
    from inlaid.tasks.evaluate import evaluate_runs

    adapters = {t.name: t.adapter for t in tasks if t.adapter}
    llm = LLM(model=str(model_dir), adapters=adapters, device="cpu", max_loras=max(1, len(adapters)),
              max_lora_rank=64, max_model_len=2048)  # fmt: skip
    runs = [(t.name, t.name if t.adapter else None) for t in tasks]
    res = evaluate_runs(llm, runs, limit=limit, generate=with_generation, data_dir=data_dir)
    return {r.task: Cell(r.metric, r.nll) for r in res.runs}


# ---- task setup -------------------------------------------------------------------
def real_tasks(names: list[str] | None, adapters_dir: Path) -> list[TaskSpec]:
    """Tasks of the suite with their demo adapters; the train split is the calibration data."""
    from inlaid.tasks.dataset import split_path
    from inlaid.tasks.registry import resolve_tasks

    specs = []
    for task in resolve_tasks(names or "all"):
        adir = adapters_dir / task.name
        adapter = str(adir) if (adir / "adapter_config.json").is_file() else None
        if adapter is None:
            logger.warning("task %s: no adapter in %s; calibrating and evaluating the bare base", task.name, adir)
        specs.append(TaskSpec(task.name, adapter, split_path(task.name, "train")))
    return specs


def tiny_tasks(work: Path, limit: int) -> tuple[Path, Path, list[TaskSpec]]:
    """The tiny random model, three random PEFT adapters and synthetic data under three suite task names."""
    from tiny import make_peft_adapter, make_tiny_llama_dir

    base = work / "tiny_base"
    if not (base / "config.json").is_file():
        make_tiny_llama_dir(base)
    kinds = {"definitions": (["q_proj", "v_proj"], lambda i: f"cat {i}", lambda i: f"cat {i}"),
             "math_gsm": (["gate_proj", "up_proj", "down_proj"], lambda i: f"{i} + {i}", lambda i: str(2 * i)),
             "trivia_qa": (["q_proj", "k_proj", "v_proj", "o_proj"], lambda i: f"Hello {i}", lambda i: "Hello world")}
    data_dir = work / "tiny_data"
    specs = []
    for k, (name, (targets, prompt, answer)) in enumerate(kinds.items()):
        adir = work / f"tiny_adapter_{name}"
        if not (adir / "adapter_config.json").is_file():
            make_peft_adapter(base, adir, 4, targets, seed=10 + k)
        rows = [{"id": f"{name}/{i}", "prompt": prompt(i), "completion": answer(i)} for i in range(40 + limit)]
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        (data_dir / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
        (data_dir / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
        specs.append(TaskSpec(name, str(adir), data_dir / name / "train.jsonl"))
    return base, data_dir, specs


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
    data_dir = None
    if args.tiny:
        base, data_dir, tasks = tiny_tasks(work, args.limit)
        model = str(base)
    else:
        model, tasks = args.model, real_tasks(args.tasks, Path(args.adapters_dir))
    res = Results()
    t0 = time.perf_counter()
    store, src = build_store(model, tasks, work, args.calib_samples, args.max_seq_len)
    res.seconds["calibrate"] = time.perf_counter() - t0
    names = [t.name for t in tasks]
    gen = not args.nll_only
    for name, cell in evaluate(src, tasks, gen, args.limit, data_dir).items():
        res.cells[("fp", "unquantized", name)] = cell
    for cfg in args.configs.split(","):
        bits, gs = (int(v) for v in cfg.split(":"))
        for method in [m for m in args.methods.split(",") if m != "gptq-single"]:
            t1 = time.perf_counter()
            qdir = write_checkpoint(src, store, names, method, bits, gs, args.sym, None, work / f"{method}-{bits}-{gs}")
            res.seconds[f"quantize {method} {cfg}"] = time.perf_counter() - t1
            for name, cell in evaluate(qdir, tasks, gen, args.limit, data_dir).items():
                res.cells[(cfg, method, name)] = cell
        if "gptq-single" in args.methods.split(","):
            single = set(args.single_tasks.split(",")) if args.single_tasks else set(names)
            for t in [t for t in tasks if t.name in single]:
                t1 = time.perf_counter()
                qdir = write_checkpoint(src, store, names, "gptq-single", bits, gs, args.sym, t.name,
                                        work / f"single-{t.name}-{bits}-{gs}")  # fmt: skip
                res.seconds[f"quantize gptq-single[{t.name}] {cfg}"] = time.perf_counter() - t1
                res.cells[(cfg, "gptq-single", t.name)] = evaluate(qdir, [t], gen, args.limit, data_dir)[t.name]
        logger.info("config %s done", cfg)
    res.seconds["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    lines += ["Timings (s) and peak RSS of the whole run (MB): "
              + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()), ""]
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
    p.add_argument("--methods", default="mlgptq,mlgptq-psd,mlgptq-diag,gptq-mixed,rtn,gptq-single")
    p.add_argument("--single-tasks", default=None, help="gptq-single only for these tasks (default: every task)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--nll-only", action="store_true", help="skip generation (metric columns become nan)")
    p.add_argument("--tiny", action="store_true", help="tiny random model + random adapters + synthetic data")
    p.add_argument("--work", default="/tmp/inlaid_quality")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    p.add_argument("--note", default="", help="a paragraph written above the table (scope, caveats)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run(args)
    tasks = sorted({t for (_, _, t) in res.cells})
    command = "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text((f"> {args.note}\n\n" if args.note else "") + to_markdown(res, args, tasks, command))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"|".join(k): vars(v) for k, v in res.cells.items()} | {"seconds": res.seconds}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Quality of quantized shared bases per task (the paper's Table 2 on our task suite).

For every (bits, group size) and method -- unquantized, MLGPTQ (and its repairs),
GPTQ-mixed, RTN and per-task GPTQ (``gptq-single``: one model per task, each
evaluated on its own task) -- every task is evaluated through OUR engine
(``inlaid.tasks.evaluate``): answer-token NLL (teacher forcing) on ``--limit``
test examples and the task metric on ``--gen-limit`` greedy generations
(``--max-new-tokens-cap`` caps each task's budget). Calibration runs once per
task (train split, with the task's adapter) into one Hessian store. Per config,
every Hessian method and every task's single-task GPTQ are quantized in ONE
batched GPTQ pass per weight (``inlaid.quant.gptq_batched``; q/k/v and gate/up
share a Hessian and are stacked), the weights stay in memory, and one engine
per config serves them all: each method's weights are hot-swapped in
(``inlaid.quant.linear.swap``) before it is evaluated.

Work is done in priority order (shared methods of every config first, then the
per-task models) and the JSON is rewritten after every cell, so ``--deadline``
(seconds) or a kill leaves a usable partial table; what did not fit is listed.

Real run (GPU):

    PYTHONPATH=. python benchmarks/quality.py --model SMOL_DIR --device cuda --deadline 170 \\
        --json OUT/quality_gpu.json --out OUT/quality_gpu.md

Regenerate the page from the JSON (rendering and merging: ``quality_page.py``; ``--notes FILE`` adds a reading):

    PYTHONPATH=. python benchmarks/quality.py --from-json benchmarks/results/quality_gpu.json \\
        --out benchmarks/results/quality.md

Tiny random model, random adapters, synthetic data (every code path, about a minute on CPU):

    PYTHONPATH=.:tests python benchmarks/quality.py --tiny --out /tmp/quality_tiny.md
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
logger = logging.getLogger("quality")

# the page (rendering, --from-json merge) is quality_page.py; merge_runs/to_markdown are re-exported here
from quality_page import load_runs, merge_runs, render_page, to_markdown  # noqa: E402, F401 (after sys.path)


@dataclass
class TaskSpec:
    name: str  # a task of inlaid.tasks.registry (its data: data_dir/<name>/{train,test}.jsonl)
    adapter: str | None
    calib: Path


@dataclass
class Run:
    """Everything the page needs; ``save`` rewrites the JSON after each cell."""

    args: dict[str, Any]
    json_path: Path | None
    cells: dict[str, dict[str, float]] = field(default_factory=dict)  # "config|method|task" -> {metric, nll}
    seconds: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        dl = self.args.get("deadline") or 0
        return float("inf") if dl <= 0 else dl - (time.perf_counter() - self.t0)

    def save(self) -> None:
        if self.json_path is not None:
            data = {"args": self.args, "cells": self.cells, "seconds": self.seconds, "dropped": self.dropped,
                    "info": self.info}  # fmt: skip
            self.json_path.write_text(json.dumps(data, indent=1))


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


# ---- calibration and quantization ---------------------------------------------------------
def build_store(model: str, tasks: list[TaskSpec], work: Path, samples: int, max_seq_len: int,
                device: torch.device) -> tuple[Any, Path]:  # fmt: skip
    """Calibrate every task once (fp32, with its adapter) into ``work/hessians``; returns (store, model dir)."""
    from transformers import AutoTokenizer

    from inlaid.config import ModelConfig
    from inlaid.lora.adapter import load_adapter
    from inlaid.model.loader import load_model
    from inlaid.quant.calibrate import calibrate_task, load_calibration
    from inlaid.quant.hessian import HessianStore

    fp, arch, src = load_model(ModelConfig(model=model), device, torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src))
    store = HessianStore(work / "hessians")
    for t in tasks:
        if t.name in store.tasks():
            continue
        ids = load_calibration(t.calib, tok, max_samples=samples, max_tokens=samples * max_seq_len, max_seq_len=max_seq_len)
        adapter = load_adapter(t.name, t.adapter) if t.adapter else None
        calibrate_task(fp, arch, t.name, ids, adapter, store, device, torch.float32)
    del fp
    return store, src


def quantize_all(state: dict[str, torch.Tensor], store: Any, names: list[str], methods: list[str],
                 singles: list[str], bits: int, gs: int, sym: bool, device: torch.device,
                 timings: dict[str, float] | None = None) -> dict[str, dict[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """``{model key: packed weights}`` for every Hessian method and ``gptq-single[task]``, plus ``rtn``.

    ``timings`` (if given) accumulates seconds of "load+aggregate", "gptq" and "pack+rtn", so a slow run says
    where its time went.
    """
    timings = {} if timings is None else timings
    from tqdm.auto import tqdm

    from inlaid.quant.quantize_model import GROUP_OF, linear_layers

    layers = linear_layers(state)
    hmethods = [m for m in methods if m not in ("rtn", "gptq-single")]
    keys = hmethods + [f"gptq-single[{t}]" for t in singles]
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {k: {} for k in keys + ["rtn"]}
    for idx in tqdm(sorted(layers), desc=f"quantize {bits}b g{gs} x{len(keys)}", unit="layer", leave=False):
        for group in ("qkv", "o", "gate_up", "down"):
            rels = [r for r in layers[idx] if GROUP_OF[r] == group]
            per_key = _quantize_group(store, idx, group, [layers[idx][r] for r in rels], names, hmethods, singles,
                                      bits, gs, sym, device, timings)  # fmt: skip
            for key, results in per_key.items():
                for rel, packed in zip(rels, results):
                    out[key][f"model.layers.{idx}.{rel}"] = packed
        logger.info("layer %d done; seconds so far: %s", idx, {k: round(v, 1) for k, v in timings.items()})
    return out


def _quantize_group(store: Any, idx: int, group: str, weights: list[torch.Tensor], names: list[str],
                    hmethods: list[str], singles: list[str], bits: int, gs: int, sym: bool,
                    device: torch.device, timings: dict[str, float]) -> dict[str, list[dict[str, torch.Tensor]]]:  # fmt: skip
    """Packed tensors of the weights sharing one Hessian group, for every method (one batched GPTQ)."""
    from inlaid.quant.gptq_batched import gptq_quantize_many, split_rows
    from inlaid.quant.pack import pack
    from inlaid.quant.quantize_model import aggregate_loaded
    from inlaid.quant.rtn import rtn_quantize

    clock = _Clock(timings, device)
    loaded = {t: (h.to(device), n) for t, (h, n) in ((t, store.load(t, idx, group)) for t in names)}
    hs = [aggregate_loaded(loaded, m) for m in hmethods] + [loaded[t][0] for t in singles]
    clock.lap("load+aggregate")
    keys = hmethods + [f"gptq-single[{t}]" for t in singles]
    w = torch.cat([x.to(device=device, dtype=torch.float32) for x in weights])
    sizes = [x.shape[0] for x in weights]
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    if hs:
        # max_retries 8: the plain max can need percdamp 100+ (a damping failure would lose the whole batch)
        results = gptq_quantize_many(w, torch.stack(hs), bits, gs, sym, max_retries=8)
        clock.lap("gptq")
        for key, res in zip(keys, results):
            out[key] = [_cpu(pack(r)) for r in split_rows(res, sizes)]
    out["rtn"] = [_cpu(pack(rtn_quantize(x.to(device=device, dtype=torch.float32), bits, gs, sym))) for x in weights]
    clock.lap("pack+rtn")
    return out


class _Clock:
    """Adds the seconds since the previous lap to ``timings[name]`` (synchronizing CUDA first)."""

    def __init__(self, timings: dict[str, float], device: torch.device) -> None:
        self.timings, self.device, self.t = timings, device, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


def _cpu(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in packed.items()}


def write_checkpoint(src: Path, state: dict[str, torch.Tensor], packed: dict[str, dict[str, torch.Tensor]],
                     bits: int, gs: int, sym: bool, out: Path) -> Path:  # fmt: skip
    """A loadable GPTQ checkpoint of ``packed`` (the engine for a config is built from it)."""
    from inlaid.quant.pack import quantization_config, save_quantized_checkpoint
    from inlaid.quant.quantize_model import copy_side_files

    quantized = {f"{n}.weight" for n in packed}
    others = {k: v for k, v in state.items() if k not in quantized}
    config = json.loads((src / "config.json").read_text())
    save_quantized_checkpoint(out, packed, quantization_config(bits, gs, sym, False, False, 0.01), others, config)
    copy_side_files(src, out)
    return out


# ---- evaluation --------------------------------------------------------------------------------
def make_llm(model_dir: Path, tasks: list[TaskSpec], device: str) -> Any:
    from inlaid import LLM

    adapters = {t.name: t.adapter for t in tasks if t.adapter}
    extra: dict[str, Any] = {"num_blocks": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 8192} \
        if device == "cuda" else {}  # fmt: skip
    return LLM(model=str(model_dir), adapters=adapters, device=device, max_loras=max(1, len(adapters)),
               max_lora_rank=64, max_model_len=2048, **extra)  # fmt: skip


def evaluate(llm: Any, tasks: list[TaskSpec], args: argparse.Namespace, data_dir: Path | None) -> dict[str, dict]:
    """``{task: {"metric", "nll"}}``: NLL on ``--limit`` examples, metric on ``--gen-limit`` generations."""
    from inlaid.tasks.evaluate import evaluate_runs

    runs = [(t.name, t.name if t.adapter else None) for t in tasks]
    nll = evaluate_runs(llm, runs, limit=args.limit, generate=False, data_dir=data_dir)
    out = {r.task: {"metric": float("nan"), "nll": r.nll} for r in nll.runs}
    if not args.nll_only:
        score = _metric_packages_installed()
        gen = evaluate_runs(llm, runs, limit=args.gen_limit, nll=False, data_dir=data_dir,
                            max_new_tokens_cap=args.max_new_tokens_cap, score=score)  # fmt: skip
        for r in gen.runs:
            out[r.task]["metric"] = r.metric
            if not score:  # scored later, where sacrebleu / rouge-score are installed (--from-json)
                out[r.task]["predictions"] = r.predictions
    return out


def _metric_packages_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sacrebleu", "rouge_score"))


def swap_in(llm: Any, packed: dict[str, dict[str, torch.Tensor]]) -> None:
    """Install ``packed`` into every quantized linear of the served model (between engine steps)."""
    from inlaid.quant.linear import swap

    parts = llm.engine.parts
    for name, tensors in packed.items():
        swap(parts.model.get_submodule(name), tensors, parts.dtype)


def _eval_cell(run: Run, llm: Any, tasks: list[TaskSpec], cfg: str, key: str, args: argparse.Namespace,
               data_dir: Path | None) -> None:  # fmt: skip
    t0 = time.perf_counter()
    method = "gptq-single" if key.startswith("gptq-single[") else key
    for name, cell in evaluate(llm, tasks, args, data_dir).items():
        run.cells[f"{cfg}|{method}|{name}"] = cell
    run.seconds[f"evaluate {cfg} {key}"] = time.perf_counter() - t0
    run.save()


# ---- the run ---------------------------------------------------------------------------
def run_all(args: argparse.Namespace, run: Run) -> None:
    from inlaid.model.loader import load_weights

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir, device = None, torch.device(args.device)
    if args.tiny:
        base, data_dir, tasks = tiny_tasks(work, max(args.limit, args.gen_limit))
        model = str(base)
    else:
        model, tasks = args.model, real_tasks(args.tasks.split(",") if args.tasks else None, Path(args.adapters_dir))
    run.info.update(tasks={t.name: t.adapter is not None for t in tasks}, device=_device_name(device))
    t0 = time.perf_counter()
    store, src = build_store(model, tasks, work, args.calib_samples, args.max_seq_len, device)
    run.seconds["calibrate"] = time.perf_counter() - t0
    if args.skip_unquantized:  # its cells come from an earlier run, merged in with --from-json
        logger.info("fp model not evaluated (--skip-unquantized): merge with a run that has it")
    else:
        _eval_cell(run, make_llm(src, tasks, args.device), tasks, "fp", "unquantized", args, data_dir)
        _release()
    state = {k: v for k, v in load_weights(src)}
    names = sorted(t.name for t in tasks)
    single = [t for t in names if t in set(args.single_tasks.split(","))] if args.single_tasks else names
    methods = args.methods.split(",")
    singles = single if "gptq-single" in methods else []
    cfgs = args.configs.split(",")
    pending: list[tuple[str, dict]] = []
    for k, cfg in enumerate(cfgs):  # primary configs: shared methods of all, then their per-task models
        if run.left() < args.min_config_seconds:
            run.dropped.append(f"config {cfg} (all methods): out of time")
        else:
            pending.append((cfg, _shared_phase(run, args, cfg, state, store, src, names, methods, singles, tasks,
                                               data_dir, device)))  # fmt: skip
            _release()
        if k + 1 >= args.primary_configs or k + 1 == len(cfgs):
            for c, packed in pending:
                _singles_phase(run, args, c, packed, tasks, singles, data_dir)
                _release()
            pending = []
    run.info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        run.info["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    run.seconds["total"] = time.perf_counter() - run.t0
    run.save()


def _shared_phase(run: Run, args: argparse.Namespace, cfg: str, state: dict, store: Any, src: Path,
                  names: list[str], methods: list[str], singles: list[str], tasks: list[TaskSpec],
                  data_dir: Path | None, device: torch.device) -> dict:  # fmt: skip
    """Quantize config ``cfg`` for every method at once; evaluate the shared (all-task) methods."""
    bits, gs = (int(v) for v in cfg.split(":"))
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    packed = quantize_all(state, store, names, methods, singles, bits, gs, args.sym, device, parts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.seconds[f"quantize {cfg} ({len(packed)} models, batched)"] = time.perf_counter() - t0
    run.seconds.update({f"quantize {cfg}: {k}": v for k, v in parts.items()})
    qdir = write_checkpoint(src, state, packed["rtn"], bits, gs, args.sym, Path(args.work) / f"ckpt-{bits}-{gs}")
    llm = make_llm(qdir, tasks, args.device)
    for m in [m for m in methods if m != "gptq-single"]:
        if run.left() < args.min_cell_seconds:
            run.dropped.append(f"{cfg} {m}: out of time")
            continue
        swap_in(llm, packed[m])
        _eval_cell(run, llm, tasks, cfg, m, args, data_dir)
    return {k: v for k, v in packed.items() if k.startswith("gptq-single[")}


def _singles_phase(run: Run, args: argparse.Namespace, cfg: str, packed: dict,
                   tasks: list[TaskSpec], singles: list[str], data_dir: Path | None) -> None:  # fmt: skip
    """Evaluate each task on its own single-task GPTQ model (weights swapped into one engine)."""
    if not singles:
        return
    if run.left() < args.min_cell_seconds:
        run.dropped.append(f"{cfg} gptq-single (all tasks): out of time")
        return
    llm = make_llm(Path(args.work) / "ckpt-{}-{}".format(*cfg.split(":")), tasks, args.device)
    for t in singles:
        if run.left() < args.min_cell_seconds / 3:
            run.dropped.append(f"{cfg} gptq-single[{t}]: out of time")
            continue
        swap_in(llm, packed[f"gptq-single[{t}]"])
        _eval_cell(run, llm, [s for s in tasks if s.name == t], cfg, f"gptq-single[{t}]", args, data_dir)


def _release() -> None:
    """Free the engine that just went out of scope (its KV cache) before the next one is built."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--adapters-dir", default=str(ROOT / "inlaid" / "adapters"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--limit", type=int, default=32, help="test examples per task for the answer NLL")
    p.add_argument("--gen-limit", type=int, default=16, help="test examples per task generated for the metric")
    p.add_argument("--max-new-tokens-cap", type=int, default=64, help="cap on every task's generation budget")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples per task (train split)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--configs", default="4:128,3:64,4:64,3:128", help="bits:group_size, comma-separated, by priority")
    p.add_argument("--methods", default="mlgptq-diag,gptq-mixed,rtn,mlgptq,gptq-single")
    p.add_argument("--single-tasks", default=None, help="gptq-single only for these tasks (default: every task)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--skip-unquantized", action="store_true",
                   help="do not evaluate the fp model (merge with --from-json with a run that did)")
    p.add_argument("--nll-only", action="store_true", help="skip generation (metric columns become nan)")
    p.add_argument("--tiny", action="store_true", help="tiny random model + random adapters + synthetic data")
    p.add_argument("--deadline", type=float, default=0, help="seconds for the whole run (0: none); drops the rest")
    p.add_argument("--primary-configs", type=int, default=2,
                   help="the first N configs get their shared methods AND per-task models before later configs start")
    p.add_argument("--min-config-seconds", type=float, default=60, help="start a config only with this much left")
    p.add_argument("--min-cell-seconds", type=float, default=12, help="start an evaluation only with this much left")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default; 1 avoids OpenMP oversubscription on a busy CPU)")
    p.add_argument("--work", default="/tmp/inlaid_quality")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    p.add_argument("--json", default=None, help="results JSON (default: --out with .json)")
    p.add_argument("--from-json", default=None,
                   help="only regenerate --out from this results JSON (comma-separated: merge several runs)")
    p.add_argument("--notes", default=None, help="markdown file with the reading of the results, put above the tables")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        data = load_runs(args.from_json)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        json_path = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
        run = Run({**vars(args), "command": "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:])},
                  json_path)  # fmt: skip
        run_all(args, run)
        data = json.loads(json_path.read_text())
    Path(args.out).write_text(render_page(data, args.notes))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

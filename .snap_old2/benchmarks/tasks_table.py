"""The per-task table (issue 3): bundled SmolLM2 base vs each demo adapter, through our engine.

    PYTHONPATH=. python benchmarks/tasks_table.py --limit 6 --gen-limit 4 --max-new-tokens-cap 32

writes ``benchmarks/results/tasks.md`` (+ ``tasks.json``): per task the metric
(greedy generation, first ``--gen-limit`` test examples) and the answer-token
NLL (first ``--limit`` test examples) for the bare base and the task's adapter;
a cross-task check (each adapter's NLL on 2 tasks of other kinds vs the base's
on the same examples); adapter sizes and GPU training time from
``benchmarks/results/adapter_training_log.json``. All evaluation goes through
``inlaid.tasks.evaluate`` (one mixed engine run per phase).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
logger = logging.getLogger("tasks_table")


def cross_pairs(tasks: list[Any], adapters: set[str], per_adapter: int = 2) -> list[tuple[str, str]]:
    """(task, adapter) pairs: each adapter on ``per_adapter`` tasks of another kind (deterministic spread)."""
    pairs = []
    for i, t in enumerate(tasks):
        if t.name not in adapters:
            continue
        others = [u for u in tasks if u.kind != t.kind]
        for k in range(per_adapter):
            pairs.append((others[(i * 3 + k * 5) % len(others)].name, t.name))
    return pairs


def run(args: argparse.Namespace) -> dict[str, Any]:
    from inlaid import LLM
    from inlaid.commands.serve import demo_adapters
    from inlaid.tasks.evaluate import evaluate_runs
    from inlaid.tasks.registry import resolve_tasks

    tasks = resolve_tasks(args.tasks)
    found = demo_adapters() if args.adapters_dir is None else {
        p.name: str(p) for p in sorted(Path(args.adapters_dir).iterdir()) if (p / "adapter_config.json").is_file()}
    adapters = {k: v for k, v in found.items() if k in {t.name for t in tasks}}
    t0 = time.perf_counter()
    llm = LLM(model=args.model, adapters=adapters, device=args.device, dtype="float32", max_num_seqs=args.max_num_seqs)
    load_s = time.perf_counter() - t0
    main_runs = [(t.name, t.name) for t in tasks if t.name in adapters] + [(t.name, None) for t in tasks]
    cross = [p for p in dict.fromkeys(cross_pairs(tasks, set(adapters))) if p not in main_runs]
    nll = evaluate_runs(llm, main_runs + cross, limit=args.limit, generate=False)
    gen = evaluate_runs(llm, main_runs, limit=args.gen_limit, nll=False, max_new_tokens_cap=args.max_new_tokens_cap,
                        score=not args.defer_metrics)
    return {"tasks": tasks, "adapters": adapters, "main": main_runs, "cross": cross, "nll": nll, "gen": gen,
            "seconds": {"load": load_s, "nll": nll.seconds["nll"], "generate": gen.seconds["generate"]}}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(device)} (fp32)"
    return "CPU (2 cores shared with other jobs, fp32)"


def _log_entries(train_log: str | None = None) -> dict[str, dict[str, Any]]:
    path = Path(train_log) if train_log else RESULTS / "adapter_training_log.json"
    if not path.is_file():
        return {}
    return {e["task"]: e for e in json.loads(path.read_text())["tasks"]}


def main_table(r: dict[str, Any], train_log: str | None = None) -> list[str]:
    log = _log_entries(train_log)
    lines = ["| task | metric | base metric | adapter metric | base NLL | adapter NLL | NLL change | rank | "
             "adapter bytes | GPU train s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in r["tasks"]:
        b_nll, b_gen = r["nll"].get(t.name, None), r["gen"].get(t.name, None)
        if t.name in r["adapters"]:
            a_nll, a_gen = r["nll"].get(t.name, t.name), r["gen"].get(t.name, t.name)
            e = log.get(t.name, {})
            extra = [f"{a_gen.metric:.1f}", f"{b_nll.nll:.3f}", f"{a_nll.nll:.3f}",
                     f"{100 * (a_nll.nll - b_nll.nll) / b_nll.nll:+.0f}%", str(t.lora_rank),
                     str(e.get("adapter_bytes", "-")), f"{e['train_seconds']:.0f}" if e else "-"]  # fmt: skip
        else:
            extra = ["(no adapter)", f"{b_nll.nll:.3f}", "-", "-", "-", "-", "-"]
        lines.append(f"| {t.name} | {t.metric} | {b_gen.metric:.1f} | " + " | ".join(extra) + " |")
    return lines


def cross_table(r: dict[str, Any]) -> list[str]:
    lines = ["| adapter | evaluated on | base NLL | adapter NLL | adapter better than base? |", "|---|---|---|---|---|"]
    for task, adapter in r["cross"]:
        b, a = r["nll"].get(task, None).nll, r["nll"].get(task, adapter).nll
        lines.append(f"| {adapter} | {task} | {b:.3f} | {a:.3f} | {'**yes**' if a < b else 'no'} |")
    return lines


def to_markdown(r: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    s = r["seconds"]
    n_better = sum(r["nll"].get(t, a).nll < r["nll"].get(t, None).nll for t, a in r["cross"])
    head = [
        "# Task suite: bundled SmolLM2-135M-Instruct base vs its demo adapters", "",
        f"Command: `{command}`", "",
        f"Run on {args.device_name} through our engine (`inlaid.tasks.evaluate`). "
        f"NLL: answer-token NLL in nats on the first {args.limit} test examples per task (teacher forcing, "
        f"our model forward + LoRA pool; equals transformers+PEFT). Metric: greedy generation on the first "
        f"{args.gen_limit} test examples per task, max new tokens capped at {args.max_new_tokens_cap} "
        "(translations and long answers are truncated, for base and adapter alike), generation stopped at any "
        "special token. With so few examples the metric columns are an indication only; the NLL is the "
        "stable measure. Adapter bytes and GPU (H100) training seconds (6 training processes sharing the GPU) come from "
        "`benchmarks/results/adapter_training_log.json`.", "",
        f"Wall time: load {s['load']:.0f} s, NLL {s['nll']:.0f} s, generation {s['generate']:.0f} s.", "",
    ]  # fmt: skip
    cross = ["", "## Cross-task check: each adapter on two tasks of other kinds (NLL, same examples)", "",
             f"An adapter is task-specific if it is not better than the base on unrelated tasks. "
             f"Here {n_better} of {len(r['cross'])} pairs are better than the base.", ""]  # fmt: skip
    return "\n".join(head + ["## Base vs adapter, per task", ""] + main_table(r, args.train_log) + cross + cross_table(r)) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="all")
    p.add_argument("--limit", type=int, default=6, help="test examples per task for the NLL")
    p.add_argument("--gen-limit", type=int, default=4, help="test examples per task for the generated metric")
    p.add_argument("--max-new-tokens-cap", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS / "tasks.md"))
    p.add_argument("--model", default="default", help="base model (default: the bundled SmolLM2)")
    p.add_argument("--adapters-dir", default=None, help="directory of <task>/ adapters (default: the demo adapters)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-log", default=None, help="training log JSON (default: benchmarks/results/adapter_training_log.json)")
    p.add_argument("--defer-metrics", action="store_true",
                   help="keep predictions, score later with --rescore (for machines without sacrebleu/rouge-score)")
    p.add_argument("--rescore", default=None, metavar="JSON",
                   help="no evaluation: score the predictions saved in JSON (from a --defer-metrics run) and write --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rescore:
        r, args, command = rescore(Path(args.rescore), args.out)
    else:
        args.device_name = _device_name(args.device)
        r = run(args)
        command = "PYTHONPATH=. python benchmarks/tasks_table.py " + " ".join(sys.argv[1:])
    if not args.defer_metrics:
        Path(args.out).write_text(to_markdown(r, args, command))
    saved = {k: getattr(args, k) for k in ("limit", "gen_limit", "max_new_tokens_cap", "device_name", "train_log")}
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": command, "args": saved, "tasks": [t.name for t in r["tasks"]], "adapters": sorted(r["adapters"]),
         "main": r["main"], "cross": r["cross"], "seconds": r["seconds"], "nll": r["nll"].to_json(),
         "generation": r["gen"].to_json(True)}, indent=1) + "\n")  # fmt: skip
    logger.info("wrote %s", args.out)


def rescore(path: Path, out: str) -> tuple[dict[str, Any], argparse.Namespace, str]:
    """Rebuild a run's results from its JSON and score the saved predictions here."""
    from inlaid.tasks.evaluate import EvalResults
    from inlaid.tasks.registry import resolve_tasks

    d = json.loads(path.read_text())
    args = argparse.Namespace(**d["args"], out=out, defer_metrics=False)
    r = {"tasks": resolve_tasks(",".join(d["tasks"])), "adapters": set(d["adapters"]),
         "main": [tuple(x) for x in d["main"]], "cross": [tuple(x) for x in d["cross"]],
         "nll": EvalResults.from_json(d["nll"]), "gen": EvalResults.from_json(d["generation"]).rescored(),
         "seconds": d["seconds"]}  # fmt: skip
    return r, args, d["command"] + f" (metrics scored with --rescore {path.name})"


if __name__ == "__main__":
    main()

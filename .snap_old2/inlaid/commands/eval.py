"""``inlaid eval``: run task test splits through the engine, one mixed batch, metric + answer NLL.

    inlaid eval --tasks all --limit 40 --base-too --out eval.json --markdown eval.md
    inlaid eval --model DIR --adapter math_gsm=adapters/math_gsm --tasks math_gsm,definitions

An adapter whose NAME is a task name is that task's adapter; tasks without one
are evaluated on the bare base. With the default model and no ``--adapter``, the
demo adapters in ``inlaid/adapters/<task>/`` are used (task i with adapter i).
``--base-too`` adds a bare-base run of every task (in the same engine call).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from inlaid.cli import add_engine_args

    p = sub.add_parser("eval", help="evaluate tasks of the suite through the engine (metric + answer NLL)")
    add_engine_args(p)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="PEFT adapter; NAME = a task name makes it that task's adapter (repeatable)")  # fmt: skip
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: all)")
    p.add_argument("--base-too", action="store_true", help="also evaluate every task on the bare base")
    p.add_argument("--no-nll", action="store_true", help="skip the answer-token NLL")
    p.add_argument("--no-generate", action="store_true", help="skip generation (NLL only; metric is '-')")
    p.add_argument("--data-dir", default=None, help="task data root (default: the package's inlaid/tasks/data)")
    p.add_argument("--out", default=None, help="write results (with predictions) as JSON here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.set_defaults(func=run)


def task_runs(tasks: list[str], adapters: dict[str, str], base_too: bool) -> list[tuple[str, str | None]]:
    """(task, adapter) runs: each task with its same-named adapter (or the base), plus base runs if asked."""
    runs: list[tuple[str, str | None]] = [(t, t if t in adapters else None) for t in tasks]
    if base_too:
        runs += [(t, None) for t in tasks if (t, None) not in runs]
    return runs


def run(args: argparse.Namespace) -> int:
    import logging

    from inlaid.cli import engine_config_from_args, parse_adapters
    from inlaid.commands.serve import demo_adapters
    from inlaid.engine.llm import LLM
    from inlaid.tasks.evaluate import evaluate_runs, write_results
    from inlaid.tasks.registry import resolve_tasks

    tasks = [t.name for t in resolve_tasks(args.tasks)]
    adapters = parse_adapters(args.adapter)
    if not adapters and args.model == "default":
        adapters = {k: v for k, v in demo_adapters().items() if k in tasks}
    unused = sorted(set(adapters) - set(tasks))
    if unused:
        logging.getLogger(__name__).warning("adapters %s are not named after an evaluated task; unused", unused)
    llm = LLM.from_config(engine_config_from_args(args), adapters)
    results = evaluate_runs(llm, task_runs(tasks, adapters, args.base_too), args.split, args.limit,
                            nll=not args.no_nll, generate=not args.no_generate,
                            data_dir=Path(args.data_dir) if args.data_dir else None)  # fmt: skip
    header = f"Command: `inlaid {' '.join(sys.argv[1:]) if sys.argv[1:2] == ['eval'] else 'eval ...'}`\n\n"
    write_results(results, Path(args.out) if args.out else None, Path(args.markdown) if args.markdown else None, header)
    sys.stdout.write(results.to_markdown())
    sys.stdout.write(json.dumps({"seconds": {k: round(v, 2) for k, v in results.seconds.items()}}) + "\n")
    return 0

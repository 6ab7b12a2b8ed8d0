"""``inlaid bench``: scheduling simulator study and offline engine throughput.

- ``inlaid bench sim``: run the simulator (real ``core`` scheduler, step-cost
  model) for the given policies, request rates and task counts; print a table.
- ``inlaid bench offline``: submit N prompts at once through the Python API on a
  model (dummy weights with ``--dummy``) and print requests/s and tokens/s.
- ``inlaid bench serve``: drive a running server over HTTP with a generated
  workload (``inlaid.bench.serve_client``), print a summary, write JSON.
- ``inlaid bench plot``: PNGs of ``bench serve`` results (``inlaid.bench.plot``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inlaid.bench.serve_client import ServeBenchConfig


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("bench", help="benchmarks: simulator study (sim), offline throughput (offline), HTTP load (serve), plots (plot)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser("sim", help="simulate policies at given rates and task counts, print a table")
    s.add_argument("--policies", nargs="+", default=["fifo", "mlfq", "inlaid"])
    s.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0], help="request rates (req/s)")
    s.add_argument("--tasks", type=int, nargs="+", default=[10], help="numbers of tasks (adapters)")
    s.add_argument("--requests", type=int, default=500)
    s.add_argument("--cost-model", default=None, metavar="FILE", help="fitted cost-model JSON (default: built-in)")
    s.add_argument("--lengths", default="auto", choices=["auto", "suite", "synthetic"])
    s.add_argument("--slots", type=int, default=16, help="device adapter slots")
    s.add_argument("--num-blocks", type=int, default=1024, help="KV blocks of 16 tokens")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--beta", type=int, default=10, help="inlaid: max distinct adapters per step")
    s.add_argument("--aging-s", type=float, default=None, help="starvation bound (default: the policy's)")
    s.add_argument("--json", action="store_true", help="print one JSON object per row")
    s.set_defaults(func=run_sim)
    o = bsub.add_parser("offline", help="offline throughput through the Python API")
    o.add_argument("--model", default="default")
    o.add_argument("--dummy", action="store_true", help="random weights of the model's shapes")
    o.add_argument("--device", default="auto")
    o.add_argument("--num-prompts", type=int, default=16)
    o.add_argument("--prompt-len", type=int, default=32)
    o.add_argument("--max-tokens", type=int, default=32)
    o.add_argument("--adapters", type=int, default=0, help="random rank-16 adapters, round-robin over prompts")
    o.add_argument("--max-num-seqs", type=int, default=64)
    o.set_defaults(func=run_offline)
    _register_serve(bsub)
    _register_plot(bsub)


def _register_serve(bsub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    v = bsub.add_parser("serve", help="drive a running server over HTTP (streaming), write JSON, print a summary")
    v.add_argument("--url", default="http://127.0.0.1:8000")
    v.add_argument("--num-requests", type=int, default=200)
    v.add_argument("--rate", type=float, default=4.0, help="mean arrival rate (req/s)")
    v.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times")
    v.add_argument("--popularity", default="powerlaw", choices=["uniform", "powerlaw", "zipf"])
    v.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    v.add_argument("--tasks", default="10", help="number of tasks (the first N served adapters) or comma-separated "
                   "served model names")
    v.add_argument("--adapter-prefix", default=None, help="tasks map to PREFIX0, PREFIX1, ...")
    v.add_argument("--lengths", default="auto", choices=["auto", "suite", "synthetic"])
    v.add_argument("--max-tokens", type=int, default=512, help="cap on output lengths")
    v.add_argument("--max-prompt", type=int, default=1024, help="cap on prompt lengths")
    v.add_argument("--jobs", type=int, default=1, help="requests per job (JCT is per job)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--max-duration", type=float, default=600.0, help="seconds; nothing is sent after, "
                   "running requests are cancelled")
    v.add_argument("--slo-scale", type=float, default=5.0, help="SLO: latency <= K x isolated time")
    v.add_argument("--ttft-slo", type=float, default=None, help="SLO: TTFT <= S seconds")
    v.add_argument("--tpot-slo", type=float, default=None, help="SLO: TPOT <= S seconds")
    v.add_argument("--calibrate", type=int, default=4, help="isolated probe requests (0: no isolated time)")
    v.add_argument("--token-id-range", type=int, nargs=2, default=[16, 256], metavar=("LO", "HI"),
                   help="prompt token ids are drawn from [LO, HI)")
    v.add_argument("--label", default="server", help="system/policy name (line name in `bench plot`)")
    v.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE", help="facts copied to the JSON")
    v.add_argument("--api-key", default=os.environ.get("INLAID_API_KEY"))
    v.add_argument("--out", default=None, metavar="FILE", help="write the JSON result here")
    v.set_defaults(func=run_serve)


def _register_plot(bsub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = bsub.add_parser("plot", help="PNG plots of `bench serve` results against rate or task count")
    p.add_argument("results", nargs="+", help="JSON files written by `inlaid bench serve --out`")
    p.add_argument("--x", default="rate", choices=["rate", "tasks"])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--prefix", default="serving", help="file name prefix of the PNGs")
    p.set_defaults(func=run_plot)


def run_sim(args: argparse.Namespace) -> int:
    from inlaid.sim.cost_model import StepCostModel, load_cost_model
    from inlaid.sim.simulator import EngineShape
    from inlaid.sim.study import StudySetup, markdown_table, sweep

    cost = load_cost_model(args.cost_model)[0] if args.cost_model else StepCostModel()
    setup = StudySetup(shape=EngineShape(num_blocks=args.num_blocks, num_adapter_slots=args.slots),
                       cost=cost, max_num_seqs=args.max_num_seqs, beta=args.beta, aging_s=args.aging_s,
                       lengths=args.lengths)
    rows = sweep(setup, args.requests, args.rates, args.tasks, tuple(args.policies))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        sys.stdout.write(markdown_table(rows, ["tasks", "rate", "policy"]))
    return 0


def run_offline(args: argparse.Namespace) -> int:
    from inlaid.bench.engine_driver import build_bench_engine, offline_throughput
    from inlaid.config import SchedulerConfig
    from inlaid.engine.setup import resolve_device
    from inlaid.sampling import SamplingParams

    if args.num_prompts < 1 or args.prompt_len < 1 or args.max_tokens < 1:
        raise ValueError("--num-prompts, --prompt-len and --max-tokens must be >= 1")
    device = str(resolve_device(args.device))
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_queue_len=max(args.num_prompts, 1024))
    eng = build_bench_engine(args.model, device, slots=max(args.adapters, 1), num_adapters=args.adapters,
                             num_blocks=max(64, args.num_prompts * -(-(args.prompt_len + args.max_tokens) // 16)),
                             sched=sched, dummy=args.dummy)
    vocab = eng.parts.arch.vocab_size
    prompts = [[(7 * i + j) % vocab for j in range(args.prompt_len)] for i in range(args.num_prompts)]
    adapters = [f"t{i % args.adapters}" if args.adapters else None for i in range(args.num_prompts)]
    res = offline_throughput(eng, prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), adapters)
    print(json.dumps({"model": args.model, "device": device, **res}))
    return 0


def _serve_config(args: argparse.Namespace) -> "ServeBenchConfig":
    from inlaid.bench.serve_client import ServeBenchConfig
    from inlaid.bench.workload import WorkloadConfig

    names: tuple[str, ...] = ()
    if args.tasks.strip().isdigit():
        num_tasks = int(args.tasks)
    else:
        names = tuple(x.strip() for x in args.tasks.split(",") if x.strip())
        num_tasks = len(names)
    extra = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--extra expects KEY=VALUE, got {item!r}")
        extra[key] = value
    wl = WorkloadConfig(num_requests=args.num_requests, rate=args.rate, cv=args.cv, num_tasks=num_tasks,
                        popularity=args.popularity, alpha=args.alpha, job_size=args.jobs, max_tokens=args.max_tokens,
                        max_prompt=args.max_prompt, seed=args.seed, lengths=args.lengths)
    return ServeBenchConfig(workload=wl, url=args.url.rstrip("/"), label=args.label, task_names=names,
                            adapter_prefix=args.adapter_prefix, max_duration=args.max_duration,
                            slo_scale=args.slo_scale, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo,
                            api_key=args.api_key, calibrate=args.calibrate,
                            token_id_range=tuple(args.token_id_range), extra=extra)


def run_serve(args: argparse.Namespace) -> int:
    import httpx

    from inlaid.bench.serve_client import bench_serve, summary_table

    cfg = _serve_config(args)
    try:
        result = bench_serve(cfg)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the server at {cfg.url} ({type(exc).__name__}: {exc}); "
                         "start it with `inlaid serve` or fix --url") from exc
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, allow_nan=False))
    sys.stdout.write(summary_table(result))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from inlaid.bench.plot import plot_results

    paths = plot_results(args.results, args.x, args.out, prefix=args.prefix)
    for p in paths:
        print(p)
    return 0

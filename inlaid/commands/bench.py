"""``inlaid bench``: scheduling simulator study and offline engine throughput.

- ``inlaid bench sim``: run the simulator (real ``core`` scheduler, step-cost
  model) for the given policies, request rates and task counts; print a table.
- ``inlaid bench offline``: submit N prompts at once through the Python API on a
  model (dummy weights with ``--dummy``) and print requests/s and tokens/s.
- ``inlaid bench serve``: the HTTP benchmark is not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("bench", help="benchmarks: simulator study (sim), offline throughput (offline)")
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
    v = bsub.add_parser("serve", help="HTTP serving benchmark (not yet)")
    v.set_defaults(func=run_serve)


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


def run_serve(args: argparse.Namespace) -> int:
    raise ValueError("`inlaid bench serve` (HTTP load against a running server) is not implemented yet; "
                     "use `inlaid bench offline` or `inlaid bench sim`")

"""``inlaid generate``: one-shot generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from inlaid.cli import add_engine_args

    p = sub.add_parser("generate", help="generate text for one or more prompts (offline)")
    add_engine_args(p)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="load a PEFT adapter (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--use-adapter", default=None, metavar="NAME", help="adapter to apply to every prompt")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inlaid.cli import engine_config_from_args, parse_adapters
    from inlaid.engine.llm import LLM
    from inlaid.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    with LLM.from_config(engine_config_from_args(args), parse_adapters(args.adapter)) as llm:  # stops TP workers
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, args.use_adapter)
        else:
            outs = llm.generate(args.prompt, params, args.use_adapter)
    for prompt, out in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "adapter": out.adapter}))
        else:
            sys.stdout.write(f"{out.text}\n")
    return 0

"""``inlaid serve``: the OpenAI-compatible HTTP server.

With no ``--model`` and no ``--adapter`` it serves the bundled SmolLM2-135M-Instruct
with the demo adapters shipped in ``inlaid/adapters/`` (one per task of the suite).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEMO_ADAPTER_DIR = Path(__file__).resolve().parent.parent / "adapters"


def demo_adapters() -> dict[str, str]:
    """name -> path of every PEFT adapter bundled with the package."""
    if not DEMO_ADAPTER_DIR.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(DEMO_ADAPTER_DIR.iterdir()) if (p / "adapter_config.json").is_file()}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from inlaid.cli import add_engine_args

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: bundled model + demo adapters)")
    add_engine_args(p)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="load a PEFT adapter (repeatable)")
    p.add_argument("--no-demo-adapters", action="store_true", help="with the default model, load no demo adapters")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("INLAID_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $INLAID_API_KEY; none = open)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inlaid.cli import engine_config_from_args, parse_adapters
    from inlaid.server.serve import run_server

    adapters = parse_adapters(args.adapter)
    if not adapters and args.model == "default" and not args.no_demo_adapters:
        adapters = demo_adapters()
    return run_server(engine_config_from_args(args), adapters, host=args.host, port=args.port, api_key=args.api_key)

"""The ``inlaid`` command line: serve | generate | quantize | eval | tasks | bench.

Engine flags are derived from the config dataclasses (``inlaid.config``): every
field of ModelConfig, CacheConfig, SchedulerConfig and LoRAConfig becomes
``--field-name`` with the field's docstring as help, so the CLI and the Python
API never disagree. Subcommands live in ``inlaid/commands/``; this module only
wires them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
import typing
from typing import Any, Callable

from inlaid.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig

_AREAS = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, ParallelConfig)


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (the convention in config.py)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = str(node.value.value)  # type: ignore[union-attr]
    return docs


def _arg_type(annotation: Any) -> Callable[[str], Any]:
    if annotation in (int, float):  # str(int) is "<class 'int'>", which the text match below misses
        return annotation
    text = str(annotation)
    for name, fn in (("int", int), ("float", float)):
        if text.startswith(name) or f"{name} |" in text or f"| {name}" in text:
            return fn
    return str


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per engine config field (plus --device)."""
    for cls in _AREAS:
        group = parser.add_argument_group(cls.__name__)
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(flag, dest=f.name, type=_arg_type(hints[f.name]), default=default,
                               help=f"{docs.get(f.name, '')} (default: {default})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kwargs = {f.name: getattr(args, f.name) for cls in _AREAS for f in dataclasses.fields(cls)}
    return EngineConfig.from_kwargs(device=args.device, **kwargs)


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    """``NAME=PATH`` pairs -> dict; a malformed item raises ValueError."""
    adapters: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=PATH, got {item!r}")
        if name in adapters:
            raise ValueError(f"adapter name {name!r} given twice")
        adapters[name] = path
    return adapters


def build_parser() -> argparse.ArgumentParser:
    from inlaid.commands import register_all

    parser = argparse.ArgumentParser(prog="inlaid", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"inlaid {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

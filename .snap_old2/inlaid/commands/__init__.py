"""Subcommands of the ``inlaid`` CLI, one module each, registered here.

Each module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed args and returning an exit code.
Heavy imports (torch, the engine) happen inside the commands, so ``inlaid --help``
is instant.
"""

from __future__ import annotations

import argparse
import importlib

_COMMANDS = ("serve", "generate", "quantize", "bench", "eval", "add-adapter")


def register_all(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    for name in _COMMANDS:
        importlib.import_module(f"inlaid.commands.{name.replace('-', '_')}").register(sub)

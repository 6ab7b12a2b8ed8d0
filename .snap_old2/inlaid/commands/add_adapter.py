"""``inlaid add-adapter``: register an adapter with a running server, optionally re-quantizing its base.

    inlaid add-adapter --server http://127.0.0.1:8000 --name de --path adapters/de --calib de.jsonl --wait

``--calib FILE`` is read here (JSONL rows: prompt/completion, text or input_ids)
and sent inline as ``calibration_samples``; ``--server-calib PATH`` names a file
on the server instead. Without either the adapter is served on the current base.
``--wait`` polls ``GET /v1/adapters/NAME`` until the re-quantization is done
(exit 0) or failed (exit 1) and prints the final status JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("add-adapter", help="add a LoRA adapter to a running server (with background re-quantization)")
    p.add_argument("--server", required=True, help="base URL of the running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--name", required=True, help="served name of the adapter")
    p.add_argument("--path", required=True, help="PEFT adapter directory (as the server sees it)")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration JSONL read here, sent inline")
    p.add_argument("--server-calib", default=None, metavar="PATH", help="calibration JSONL on the server")
    p.add_argument("--max-samples", type=int, default=128, help="rows of --calib to send")
    p.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    p.add_argument("--wait", action="store_true", help="wait for the re-quantization to finish")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait")
    p.set_defaults(func=run)


def read_rows(path: str, max_samples: int) -> list[dict[str, Any]]:
    """The first ``max_samples`` JSON-object rows of a calibration JSONL file (clear error when malformed or empty)."""
    from inlaid.quant.calibrate import iter_calibration_rows

    rows = [row for _, row in itertools.islice(iter_calibration_rows(path), max_samples)]
    if not rows:
        raise ValueError(f"calibration file {path} has no rows; give at least one JSONL line")
    return rows


def _body(args: argparse.Namespace) -> dict[str, Any]:
    if args.calib and args.server_calib:
        raise ValueError("give --calib or --server-calib, not both")
    body: dict[str, Any] = {"lora_name": args.name, "lora_path": args.path}
    if args.calib:
        body["calibration_samples"] = read_rows(args.calib, args.max_samples)
    elif args.server_calib:
        body["calibration_path"] = args.server_calib
    return body


def run(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.server.rstrip("/")
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
        r = client.post("/v1/load_lora_adapter", json=_body(args))
        if r.status_code != 200:
            raise ValueError(f"server refused the adapter ({r.status_code}): {_message(r)}")
        sys.stdout.write(r.text.strip() + "\n")
        if not args.wait or not (args.calib or args.server_calib):
            return 0
        deadline = time.monotonic() + args.timeout
        while True:
            status = client.get(f"/v1/adapters/{args.name}").json()
            if status.get("quantization") in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    sys.stdout.write(json.dumps(status) + "\n")
    return 0 if status.get("quantization") == "done" else 1


def _message(r: Any) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text

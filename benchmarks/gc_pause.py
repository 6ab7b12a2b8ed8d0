"""Python's full garbage collections inside engine steps, with the heap as built and frozen (``inlaid.engine.gc_heap``).

Builds an engine on ``--model`` (dummy weights; default the bundled SmolLM2 shapes), then times ``--runs`` decode
runs of ``--batch`` sequences x ``--new-tokens`` tokens twice: with the heap as built (``plain``, as before
``inlaid serve`` froze it) and inside ``frozen_heap`` (as ``inlaid serve`` runs). Per run it reports the longest
decode step (every step after the first, which holds the prefill) and each generation-2 collection (its duration,
from ``gc.callbacks``). ``freeze_heap``'s own collection happens before the frozen runs and is not counted.

    python benchmarks/gc_pause.py --device cuda --out benchmarks/results/gc_pause_h100
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inlaid.bench.engine_driver import build_bench_engine
from inlaid.bench.pages import write_results
from inlaid.config import SchedulerConfig
from inlaid.engine.gc_heap import frozen_heap
from inlaid.sampling import SamplingParams


class Gen2Timer:
    """Durations (ms) of the generation-2 collections since ``clear``, from a ``gc.callbacks`` hook."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._t0 = 0.0
        gc.callbacks.append(self._hook)

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms.append((time.perf_counter() - self._t0) * 1e3)

    def clear(self) -> None:
        self.ms.clear()

    def close(self) -> None:
        gc.callbacks.remove(self._hook)


def decode_run(eng: Any, batch: int, new_tokens: int, tag: str) -> list[float]:
    """Milliseconds of each ``step()`` of one run of ``batch`` random 32-token prompts."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, eng.parts.arch.vocab_size, (batch, 32), generator=gen).tolist()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, params, None)
    steps = []
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        eng.step()
        steps.append((time.perf_counter() - t0) * 1e3)
    if eng.parts.device.type == "cuda":
        torch.cuda.synchronize()
    return steps


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    sched = SchedulerConfig(max_num_seqs=max(args.batch, 1), max_num_batched_tokens=8192)
    eng = build_bench_engine(args.model, args.device, 1, 0, 16, args.num_blocks, sched)
    timer = Gen2Timer()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                           "command": " ".join(["python benchmarks/gc_pause.py", *argv]),
                           "tracked_objects": len(gc.get_objects()), "modes": {}}
    try:
        for mode in ("plain", "frozen"):
            ctx = frozen_heap() if mode == "frozen" else contextlib.nullcontext()
            with ctx:
                decode_run(eng, args.batch, 4, f"warm-{mode}")  # graphs captured, kernels compiled
                timer.clear()
                runs = []
                for r in range(args.runs):
                    steps = decode_run(eng, args.batch, args.new_tokens, f"{mode}-{r}")
                    runs.append({"total_ms": sum(steps), "max_decode_step_ms": max(steps[1:], default=0.0),
                                 "median_step_ms": sorted(steps)[len(steps) // 2]})
                res["modes"][mode] = {"runs": runs, "gen2_ms": list(timer.ms)}
    finally:
        timer.close()
    return res


def to_markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    title = (f"# Full garbage collections in engine steps ({res['device']}, {Path(args.model).name}, batch "
             f"{args.batch}, {args.new_tokens} new tokens)")
    about = (f"{res['tracked_objects']:,} objects tracked by the collector after the engine was built. Per mode, "
             f"{args.runs} runs; `max step` is the longest decode step of a run (the first step, with the prefill, "
             "left out); `gen-2` lists every generation-2 collection during the runs.")
    lines = [title, "", f"Command: `{res['command']}`", "", about, "",
             "| mode | max step per run (ms) | median step (ms) | gen-2 collections (ms) |", "|---|---|---|---|"]
    for mode, m in res["modes"].items():
        maxes = " / ".join(f"{r['max_decode_step_ms']:.1f}" for r in m["runs"])
        med = sorted(r["median_step_ms"] for r in m["runs"])[len(m["runs"]) // 2]
        gen2 = ", ".join(f"{v:.1f}" for v in m["gen2_ms"]) or "none"
        lines.append(f"| {mode} | {maxes} | {med:.2f} | {gen2} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "smollm2-135m"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/gc_pause")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    res = measure(args, argv)
    write_results(args.out, res, to_markdown(res, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

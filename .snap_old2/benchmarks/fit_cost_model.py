"""Fit the simulator's step-cost model from timed steps of the real engine.

Runs ``LLMEngine.step()`` over a grid of step shapes -- decode batch size D,
distinct adapters A, extra prefill tokens P, and adapter loads (adapters rotate
through a pool larger than the device slots, so new cells load them) -- records
every step's ``SchedulerOutput`` features (``StepCostModel.features``) and its
wall time, fits ``StepCostModel`` by least squares (``fit_cost_model``) and writes
the coefficients, R², sample count and device to JSON:

    PYTHONPATH=. python benchmarks/fit_cost_model.py                   # CPU -> results/cost_model.json
    PYTHONPATH=. python benchmarks/fit_cost_model.py --device cuda \
        --out benchmarks/results/cost_model_cuda.json                  # on the GPU box

On CPU the step time is the process CPU time with one torch thread (the
machine is shared: wall time would measure the neighbours). Model shapes: the bundled SmolLM2-135M config with dummy weights by default
(``--model`` takes any model the engine takes). The simulator study loads the
file with ``--cost-model``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from inlaid.bench.engine_driver import build_bench_engine
from inlaid.config import SchedulerConfig
from inlaid.engine.llm_engine import LLMEngine
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel, cost_model_to_json, fit_cost_model, r_squared

log = logging.getLogger("fit_cost_model")
HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = str(HERE / "configs" / "smollm2-135m")
Sample = tuple[list[float], float]


def build_engine(model: str, device: str, slots: int, num_adapters: int, rank: int, num_blocks: int) -> LLMEngine:
    """Engine with dummy weights, ``slots`` device adapter slots and ``num_adapters`` random adapters on the host."""
    sched = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096, max_queue_len=100_000)
    return build_bench_engine(model, device, slots, num_adapters, rank, num_blocks, sched, name_prefix="a")


class TimedEngine:
    """Wraps an engine so each ``step()`` records (features of its SchedulerOutput, wall seconds)."""

    def __init__(self, engine: LLMEngine, sync: Callable[[], None], timer: Callable[[], float]) -> None:
        self.engine = engine
        self.sync = sync
        self.timer = timer
        self.samples: list[Sample] = []
        self._last = None
        inner = engine.scheduler.schedule

        def capture():  # noqa: ANN202 - same signature as Scheduler.schedule
            self._last = inner()
            return self._last

        engine.scheduler.schedule = capture  # type: ignore[method-assign]

    def step(self, record: bool = True) -> None:
        self.sync()
        t0 = self.timer()
        self.engine.step()
        self.sync()
        dt = self.timer() - t0
        if record and self._last is not None and not self._last.is_empty:
            self.samples.append((StepCostModel.features(self._last), dt))

    def drain(self, record: bool = True) -> None:
        while self.engine.has_unfinished_requests():
            self.step(record)


def run_cell(te: TimedEngine, cell: tuple[int, int, int], adapters: list[str], steps: int, vocab: int,
             tag: str) -> None:
    """One grid cell: D decoding requests over A adapters, then one P-token prefill joins mid-decode."""
    d, a, p = cell
    params = SamplingParams(max_tokens=steps, ignore_eos=True)
    for i in range(d):
        ad = adapters[i % a] if a else None
        te.engine.add_request(f"{tag}-d{i}", [(7 * i + j) % vocab for j in range(16)], params, ad)
    te.step()  # prefill of the batch (+ adapter loads)
    if p:
        te.step()
        te.engine.add_request(f"{tag}-p", [(3 * j) % vocab for j in range(p)], SamplingParams(max_tokens=2,
                              ignore_eos=True), adapters[0] if a else None)
    te.drain()


def measure(te: TimedEngine, grid: list[tuple[int, int, int]], num_adapters: int, steps: int, vocab: int) -> None:
    """Run every cell; adapters rotate through the host pool so cells also exercise loads."""
    cursor = 0
    for k, cell in enumerate(tqdm(grid, desc="cost-model grid")):
        a = cell[1]
        adapters = [f"a{(cursor + j) % num_adapters}" for j in range(a)]
        cursor += max(a // 2, 1)
        run_cell(te, cell, adapters, steps, vocab, f"c{k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model path or name (dummy weights of its shapes)")
    ap.add_argument("--slots", type=int, default=8, help="device adapter slots (max_loras)")
    ap.add_argument("--adapters", type=int, default=24, help="adapters registered on the host")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--decode", type=int, nargs="+", default=[1, 8, 24])
    ap.add_argument("--distinct", type=int, nargs="+", default=[0, 1, 4, 8])
    ap.add_argument("--prefill", type=int, nargs="+", default=[0, 256])
    ap.add_argument("--steps", type=int, default=4, help="decode steps per cell")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 on a shared machine: spinning OpenMP threads thrash)")
    ap.add_argument("--clock", choices=["auto", "process", "wall"], default="auto",
                    help="process CPU time (default on CPU: immune to other processes on a shared machine) "
                         "or wall time (default on CUDA)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cost_model.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    eng = build_engine(args.model, args.device, args.slots, args.adapters, args.rank, num_blocks=2048)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clock = args.clock if args.clock != "auto" else ("wall" if args.device.startswith("cuda") else "process")
    te = TimedEngine(eng, sync, time.process_time if clock == "process" else time.perf_counter)
    vocab = eng.parts.arch.vocab_size
    run_cell(te, (4, 1, 64), ["a0"], 3, vocab, "warmup")
    te.samples.clear()
    grid = [c for c in itertools.product(args.decode, args.distinct, args.prefill) if c[1] <= c[0]]
    t0 = time.time()
    for _ in range(args.repeats):
        measure(te, grid, args.adapters, args.steps, vocab)
    model = fit_cost_model(te.samples)
    r2 = r_squared(model, te.samples)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {"device": device, "model": Path(args.model).name, "dtype": str(eng.parts.dtype), "rank": args.rank,
            "slots": args.slots, "samples": len(te.samples), "r2": r2, "seconds": round(time.time() - t0, 1),
            "adapter_bytes": adapter_bytes(eng, args.rank), "clock": clock, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(cost_model_to_json(model, meta))
    log.info("fit %s  R²=%.3f over %d steps -> %s", model, r2, len(te.samples), args.out)


def adapter_bytes(eng: LLMEngine, rank: int) -> int:
    """Bytes of one rank-``rank`` adapter on every projection of every layer, in the engine's dtype."""
    arch = eng.parts.arch
    elem = torch.tensor([], dtype=eng.parts.dtype).element_size()
    per_layer = sum(rank * (i + o) for i, o in arch.lora_module_shapes().values())
    return per_layer * arch.num_layers * elem


if __name__ == "__main__":
    main()

"""Per-step host overhead of the engine (issue 8, "steps must not be launch-bound"), split into phases.

Builds a real ``LLMEngine`` and runs decode steps at batch 1 / 32 / 128, with no adapter and with N adapters
(sequence i uses adapter ``i % N``, N = min(batch, --max-adapters)), and times every ``LLMEngine.step`` split into:

- ``schedule``: ``Scheduler.schedule``;
- ``prepare``: ``build_forward_batch`` (host index math + H2D copies), adapter loads, the LoRA pool's per-batch
  metadata (``LoRAPool.prepare``) and the CUDA graph's static-buffer fill;
- ``forward``: the model forward (eager) or graph replay, host time (on CUDA: launch time; the GPU time is
  reported separately from CUDA events around it);
- ``sample``: logits of the sampling rows, the sampler and the one device->host copy of the sampled ids (on CUDA
  this is where the host waits for the GPU: the engine's only synchronisation; ``ModelRunner.collect``);
- ``output``: ``Scheduler.update`` (append tokens, stop checks) and the engine's output processing
  (incremental detokenization, stop strings, ``RequestOutput``);
- ``other``: the rest of ``step`` (runner glue, between-steps callbacks, bookkeeping).

Phases are exclusive (a nested phase pauses its parent) and timed by wrapping the engine's methods from here (the
engine carries no timer), on ``--clock``: this thread's CPU time on CPU (other processes on a shared box do not
inflate it), ``time.perf_counter`` on CUDA. The wrappers' own cost (~1-2 us per phase call, measured at start)
is subtracted from ``host_non_forward``. Nothing here adds a synchronisation the engine does not already do.
Steps are not overlapped here (``LLMEngine.overlap`` off): with overlap one step's phases would interleave with
the next one's (``e2e_decode.py --overlap ab`` measures what overlapping saves).

``--profile`` adds a cProfile top-20 (by internal time) of the timed decode steps of each configuration.
``--baseline old.json`` adds a before/after table to the markdown (non-forward host time per step).

CPU (default: a tiny random 2-layer Llama from ``tests/tiny.py``, forward small); before vs after, alternating:

    git archive 225cb6b | tar -x -C /tmp/before
    python benchmarks/step_overhead.py --ab-before-tree /tmp/before --rounds 5 --steps 40 \
        --out benchmarks/results/step_overhead_cpu

GPU (the lead; python3, no network, results under $OUT; each run builds one engine, so the model is built once):

    export PYTHONPATH=$PWD
    timeout 120 python3 benchmarks/step_overhead.py --device cuda --model benchmarks/configs/smollm2-135m \
        --load-format dummy --out $OUT/step_overhead_smollm2
    timeout 240 python3 benchmarks/step_overhead.py --device cuda --model llama2-7b-shapes --load-format dummy \
        --quant w4 --batches 1 32 --steps 20 --out $OUT/step_overhead_7b_w4

(SmolLM2 shapes from the config dir have no tokenizer, so detokenization is skipped there; ``--model default``
uses the bundled checkpoint with its tokenizer where it is installed.) On CUDA the clock is wall time: ``sample``
then includes the wait for the GPU at the token copy, and ``forward_gpu`` (CUDA events) is the GPU time of the
forward (graph replay + static-buffer fill).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inlaid.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig  # noqa: E402
from inlaid.engine.llm_engine import LLMEngine  # noqa: E402
from inlaid.sampling import SamplingParams  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "output", "other")


class PhaseTimer:
    """Exclusive wall time per phase: entering a nested phase pauses the enclosing one."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.totals: dict[str, float] = {p: 0.0 for p in PHASES}
        self.calls = 0
        self._stack: list[list[Any]] = []  # [name, start]
        self.enabled = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.calls += 1
        now = self.clock()
        if self._stack:
            top = self._stack[-1]
            self.totals[top[0]] += now - top[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            end = self.clock()
            top = self._stack.pop()
            self.totals[top[0]] += end - top[1]
            if self._stack:
                self._stack[-1][1] = end

    def reset(self) -> None:
        self.totals = {p: 0.0 for p in PHASES}
        self.calls = 0


def _wrap(obj: Any, attr: str, timer: PhaseTimer, name: str, after: Callable[[], None] | None = None) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a: Any, **kw: Any) -> Any:
        with timer.phase(name):
            res = fn(*a, **kw)
            if after is not None:
                after()
            return res

    setattr(obj, attr, wrapped)


class GpuForwardTimer:
    """CUDA events around each forward; elapsed times are read after the run (no extra sync)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.pairs, self.active = enabled, [], False

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **kw: Any) -> Any:
            if not (self.enabled and self.active):
                return fn(*a, **kw)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = fn(*a, **kw)
            end.record()
            self.pairs.append((start, end))
            return res
        return wrapped

    def take_ms(self) -> list[float]:
        if not self.pairs:
            return []
        torch.cuda.synchronize()
        out = [s.elapsed_time(e) for s, e in self.pairs]
        self.pairs = []
        return out


def instrument(eng: LLMEngine, timer: PhaseTimer, gpu: GpuForwardTimer) -> None:
    """Wrap the engine's step parts (instance attributes and the runner module's build_forward_batch)."""
    import inlaid.worker.model_runner as mr

    runner = eng.runner
    _wrap(eng.scheduler, "schedule", timer, "schedule")
    if hasattr(eng, "_process_outputs"):
        _wrap(eng, "_process_outputs", timer, "output")
    else:  # engines before the step-overhead work: per request (the timer's calls are accounted for below)
        _wrap(eng.scheduler, "update", timer, "output")
        _wrap(eng, "_progress_output", timer, "output")
    _wrap(runner, "load_adapters", timer, "prepare")
    _wrap(runner.lora_pool, "prepare", timer, "prepare")
    for name in ("build_forward_batch", "build_forward_inputs"):  # module globals the runner calls
        if hasattr(mr, name):
            _wrap_global(mr, name, timer)
    runner._forward = gpu.wrap(runner._forward)
    _wrap(runner, "_forward", timer, "forward")
    _wrap(runner, "_sample", timer, "sample")
    if hasattr(runner, "collect"):  # the token read-back moved out of _sample with overlapped steps
        _wrap(runner, "collect", timer, "sample")
    if runner.graphs is not None:
        _wrap(runner.graphs.buffers, "fill", timer, "prepare")


def _wrap_global(module: Any, name: str, timer: PhaseTimer) -> None:
    """Re-point ``module.name`` at a "prepare" wrapper of the original (idempotent across engines)."""
    key = f"_unwrapped_{name}"
    if not hasattr(module, key):
        setattr(module, key, getattr(module, name))
    base = getattr(module, key)

    def wrapped(*a: Any, **kw: Any) -> Any:
        with timer.phase("prepare"):
            return base(*a, **kw)

    setattr(module, name, wrapped)


def build_engine(args: argparse.Namespace, n_adapters: int, tmp: Path) -> LLMEngine:
    """An engine on ``args.model`` ("tiny": a random 2-layer Llama of tests/tiny.py) with random rank-16 adapters."""
    from inlaid.lora.synthetic import random_adapter

    model, fmt = args.model, args.load_format
    if model == "tiny":
        from tests.tiny import make_tiny_llama_dir

        model = str(make_tiny_llama_dir(tmp / "tiny", num_hidden_layers=2, max_position_embeddings=512))
    slots = max(n_adapters, 1)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    cfg = EngineConfig(
        model=ModelConfig(model=model, load_format=fmt, dtype=dtype),
        cache=CacheConfig(num_blocks=args.num_blocks, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=8192),
        lora=LoRAConfig(max_loras=slots, max_lora_rank=args.rank),
        device=args.device,
    )
    eng = LLMEngine(cfg)
    eng.overlap = False  # one step at a time, so the phases are this step's (module docstring)
    if args.quant == "w4":
        from e2e_decode import make_w4

        make_w4(eng.parts.model, args.device, eng.parts.dtype)
    arch = eng.parts.arch
    for i in range(n_adapters):
        eng.registry.add(random_adapter(f"a{i}", arch.lora_module_shapes(), arch.num_layers, args.rank, seed=i))
    return eng


def run_config(eng: LLMEngine, timer: PhaseTimer, gpu: GpuForwardTimer, batch: int, n_ad: int,
               args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Prefill ``batch`` requests, warm up, then time ``args.steps`` decode steps where all are running."""
    vocab = eng.parts.arch.vocab_size
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=args.warmup + args.steps + 2, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, params, f"a{i % n_ad}" if n_ad else None)
    for _ in range(1 + args.warmup):  # prefill, then warm-up decode steps (graph capture, kernel compile)
        eng.step()
    if eng.scheduler.num_running != batch:
        raise RuntimeError(f"expected {batch} running requests after prefill, got {eng.scheduler.num_running}")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    prof = cProfile.Profile() if args.profile else None
    timer.reset()
    timer.enabled, gpu.active = True, True
    step_times = []
    if prof:
        prof.enable()
    clock = timer.clock
    for _ in range(args.steps):
        t0 = clock()
        eng.step()
        step_times.append(clock() - t0)
    if prof:
        prof.disable()
    timer.enabled, gpu.active = False, False
    gpu_ms = gpu.take_ms()
    while eng.has_unfinished_requests():
        eng.step()
    total = sum(step_times)
    ph = dict(timer.totals)
    ph["other"] = total - sum(v for k, v in ph.items() if k != "other")
    row: dict[str, Any] = {"batch": batch, "adapters": n_ad, "steps": args.steps,
                           "step_ms": 1e3 * total / args.steps,
                           **{f"{k}_ms": 1e3 * v / args.steps for k, v in ph.items()}}
    row["timer_calls_per_step"] = timer.calls / args.steps
    # the wrappers' own cost (calls x measured cost per call) is taken out of the host time
    row["host_non_forward_ms"] = row["step_ms"] - row["forward_ms"] - row["timer_calls_per_step"] * args.timer_us / 1e3
    if gpu_ms:
        row["forward_gpu_ms"] = statistics.mean(gpu_ms)
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        row["profile"] = s.getvalue()
    return row


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timer_overhead_us(clock: Callable[[], float]) -> float:
    """Cost of one phase call, in the benchmark's clock (the minimum of 5 rounds: contention only adds)."""
    t = PhaseTimer(clock)
    t.enabled = True
    n, best = 5000, float("inf")
    for _ in range(5):
        t0 = clock()
        for _ in range(n):
            with t.phase("prepare"):
                pass
        best = min(best, (clock() - t0) / n)
    return 1e6 * best


def aggregate(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every *_ms field, plus min/max of step and host_non_forward time."""
    row = {k: v for k, v in reps[0].items() if not k.endswith("_ms") and k != "profile"}
    for k in reps[0]:
        if k.endswith("_ms"):
            row[k] = statistics.median(r[k] for r in reps)
    for k in ("step_ms", "host_non_forward_ms"):
        row[k + "_min"] = min(r[k] for r in reps)
        row[k + "_max"] = max(r[k] for r in reps)
    row["repeats"] = len(reps)
    return row


def measure_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """One engine (one model build) with min(max batch, --max-adapters) adapters registered; the adapter-free
    rows run first (no slot loaded yet, so the forward has no LoRA work, as on an engine without adapters)."""
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as d:
        n_eng = min(args.max_adapters, max(args.batches))
        eng = build_engine(args, n_eng, Path(d))
        timer, gpu = PhaseTimer(CLOCKS[args.clock]), GpuForwardTimer(args.device.startswith("cuda"))
        instrument(eng, timer, gpu)
        for n_max in sorted({0, n_eng}):
            for batch in args.batches:
                n_ad = min(batch, n_max)
                reps = [run_config(eng, timer, gpu, batch, n_ad, args, f"r{r}b{batch}a{n_ad}")
                        for r in range(args.repeats)]
                row = aggregate(reps)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.profile:
                    profiles.append(f"### batch {batch}, adapters {n_ad} (last repeat)\n\n```\n"
                                    f"{reps[-1]['profile']}```\n")
        del eng
    return rows, profiles


def to_markdown(res: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    cols = ["batch", "adapters", "step_ms", "host_non_forward_ms"] + [f"{p}_ms" for p in PHASES]
    if any("forward_gpu_ms" in r for r in res["rows"]):
        cols.append("forward_gpu_ms")
    lines = [f"# Per-step host overhead ({res['device_name']}, model {res['model']}, {res['quant']})", "",
             f"Command: `{res['command']}`", "",
             f"Clock: {res['clock']} ({'this thread' + chr(39) + 's CPU time' if res['clock'] == 'thread' else 'perf_counter'}). "
             f"Prompt {res['prompt_len']} tokens, {res['steps']} timed decode steps per run after "
             f"{res['warmup']} warm-up steps, median of {res['repeats']} repeats (ms per step); "
             f"`host_non_forward` = step - forward host time - the phase timer's own cost (calls per step x "
             f"{res['timer_overhead_us']:.2f} us measured per call); medians are per column, so columns need "
             "not add up.", "",
             "| " + " | ".join(c.removesuffix("_ms") for c in cols) + " | step min..max |",
             "|" + "---|" * (len(cols) + 1)]
    for r in res["rows"]:
        cells = [str(r[c]) if isinstance(r.get(c), int) else f"{r.get(c, float('nan')):.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + f" | {r['step_ms_min']:.3f}..{r['step_ms_max']:.3f} |")
    if baseline:
        lines += ["", f"## Before / after (before: `{res['baseline_path']}`)", "",
                  "| batch | adapters | non-forward before | after | ratio | step before | after |", "|---|---|---|---|---|---|---|"]
        old = {(r["batch"], r["adapters"]): r for r in baseline["rows"]}
        for r in res["rows"]:
            b = old.get((r["batch"], r["adapters"]))
            if b:
                lines.append(f"| {r['batch']} | {r['adapters']} | {b['host_non_forward_ms']:.3f} | "
                             f"{r['host_non_forward_ms']:.3f} | {b['host_non_forward_ms'] / r['host_non_forward_ms']:.2f}x "
                             f"| {b['step_ms']:.3f} | {r['step_ms']:.3f} |")
    if res.get("notes"):
        lines += ["", res["notes"]]
    return "\n".join(lines) + "\n"


def _child_argv(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--load-format", args.load_format, "--quant", args.quant, "--device", args.device,
           "--batches", *map(str, args.batches), "--clock", args.clock]
    for k in ("max_adapters", "rank", "prompt_len", "steps", "warmup", "repeats", "num_blocks"):
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out


def run_ab(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate runs of the tree in ``--ab-before-tree`` (this script copied into it) and this tree, ``--rounds``
    times each (ABAB...: both see the same load over time); per configuration the minimum and the median over
    rounds of every per-step figure."""
    before = Path(args.ab_before_tree).resolve()
    shutil.copy(Path(__file__), before / "benchmarks" / "step_overhead.py")
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for label, root in (("before", before), ("after", ROOT)):
                out = Path(d) / f"{label}{r}"
                cmd = [sys.executable, str(root / "benchmarks" / "step_overhead.py"), *_child_argv(args), "--out", str(out)]
                subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                               stdout=subprocess.DEVNULL, timeout=900)
                runs[label].append(json.loads(out.with_suffix(".json").read_text()))
                print(f"round {r} {label}: done", flush=True)
    res: dict[str, Any] = {}
    for label, reps in runs.items():
        keys = [(row["batch"], row["adapters"]) for row in reps[0]["rows"]]
        for stat, fn in (("min", min), ("median", statistics.median), ("max", max)):
            rows = []
            for i, key in enumerate(keys):
                per = [rep["rows"][i] for rep in reps]
                rows.append({"batch": key[0], "adapters": key[1],
                             **{k: fn(p[k] for p in per) for k in per[0] if k.endswith("_ms")}})
            res[f"{label}_{stat}"] = rows
    res["timer_overhead_us"] = runs["after"][0]["timer_overhead_us"]
    return res


def ab_markdown(res: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    cols = ["step_ms", "host_non_forward_ms"] + [f"{p}_ms" for p in PHASES]
    lines = [f"# Per-step host overhead: before vs after (model {args.model}, {args.device}, clock {args.clock})", "",
             f"Command: `{command}`", "",
             f"Before: the tree in `{args.ab_before_tree}` ({args.before_label}); after: this tree. "
             f"{args.rounds} alternating rounds (before, after, before, ...), each {args.steps} timed decode steps "
             f"after {args.warmup} warm-up steps, prompt {args.prompt_len}; ms per step. `host_non_forward` = step - "
             f"forward - the phase timer's own cost ({res['timer_overhead_us']:.2f} us per phase call). "
             "Figures per column are over rounds, so columns need not add up.", ""]
    for stat in ("min", "median"):
        for label in ("before", "after"):
            lines += [f"## {label} ({stat} over rounds)", "", "| batch | adapters | " +
                      " | ".join(c.removesuffix("_ms") for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
            lines += [f"| {r['batch']} | {r['adapters']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
                      for r in res[f"{label}_{stat}"]]
            lines.append("")
    lines += ["## Non-forward host time per step, before / after", "",
              "| batch | adapters | before min | after min | ratio (min) | before median | after median | ratio (median) "
              "| before min..max | after min..max | step before (median) | step after (median) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    k = "host_non_forward_ms"
    for bm, am, bd, ad, bx, ax in zip(*(res[f"{label}_{stat}"] for stat in ("min", "median", "max")
                                        for label in ("before", "after"))):
        lines.append(f"| {am['batch']} | {am['adapters']} | {bm[k]:.3f} | {am[k]:.3f} | {bm[k] / am[k]:.2f}x | "
                     f"{bd[k]:.3f} | {ad[k]:.3f} | {bd[k] / ad[k]:.2f}x | {bm[k]:.3f}..{bx[k]:.3f} | "
                     f"{am[k]:.3f}..{ax[k]:.3f} | {bd['step_ms']:.3f} | {ad['step_ms']:.3f} |")
    if args.notes:
        lines += ["", args.notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help='"tiny" (random 2-layer Llama), an HF dir, or llama2-7b-shapes')
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    ap.add_argument("--quant", default="none", choices=("none", "w4"), help="w4: random W4 g128 GPTQ linears")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32, 128])
    ap.add_argument("--max-adapters", type=int, default=32, help="adapter rows use min(batch, this) adapters")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"),
                    help="thread: this thread's CPU time (robust to other processes on a shared box; "
                         "default on CPU); wall: perf_counter (default on CUDA: includes waits for the GPU)")
    ap.add_argument("--profile", action="store_true", help="cProfile top-20 of the timed steps")
    ap.add_argument("--baseline", default=None, help="JSON of an earlier run: adds a before/after table")
    ap.add_argument("--notes", default="", help="free text appended to the markdown")
    ap.add_argument("--ab-before-tree", default=None,
                    help="a checkout of the code before (e.g. git archive REV | tar -x -C DIR): alternate runs of it "
                         "and of this tree, report both and the ratio")
    ap.add_argument("--before-label", default="", help="what the before tree is (e.g. its commit)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of --ab-before-tree")
    ap.add_argument("--out", default="benchmarks/results/step_overhead_cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    t0 = time.monotonic()
    if args.clock == "auto":
        args.clock = "thread" if args.device == "cpu" else "wall"
    command = "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.ab_before_tree:
        res = run_ab(args)
        res.update(command=command, before_tree=args.ab_before_tree, before_label=args.before_label,
                   args=_child_argv(args), elapsed_s=time.monotonic() - t0)
        return _write(Path(args.out), res, ab_markdown(res, args, command))
    args.timer_us = timer_overhead_us(CLOCKS[args.clock])
    rows, profiles = measure_all(args)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (shared 2-core box, 1 torch thread)"
    res = {"device_name": dev, "model": args.model, "quant": args.quant, "prompt_len": args.prompt_len,
           "steps": args.steps, "warmup": args.warmup, "clock": args.clock, "repeats": args.repeats, "rows": rows,
           "timer_overhead_us": args.timer_us, "elapsed_s": time.monotonic() - t0,
           "command": command,
           "baseline_path": args.baseline, "notes": args.notes}
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    md = to_markdown(res, baseline) + ("\n## cProfile (top 20 by internal time)\n\n" + "\n".join(profiles)
                                       if profiles else "")
    return _write(Path(args.out), res, md)


def _write(out: Path, res: dict[str, Any], md: str) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out.with_suffix('.md')} and .json in {res['elapsed_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

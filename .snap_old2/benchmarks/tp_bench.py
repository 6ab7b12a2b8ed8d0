"""Tensor-parallel benchmark (issue 10): TP=1 vs TP=N on a random-W4 (GPTQ 4-bit) model of real shapes.

For each world size (1, then N) one engine is built on the same checkpoint and
measured in the same way:

1. correctness: the prefill logits of a few token-id prompts (rank 0's
   ``compute_logits`` output, captured) and the greedy tokens of a short decode;
   the report gives max |logits_TPN - logits_TP1| / max |logits_TP1| and how many
   prompts have identical greedy tokens;
2. decode speed at batch 1 and 32: tokens/s over ``--decode-steps`` timed decode
   steps (eager for both world sizes: CUDA graphs are off under TP, so they are
   switched off at TP=1 too, for a like-for-like comparison);
3. communication share: a few more decode steps with rank 0's collectives timed
   (CUDA-synchronized around each all-reduce / all-gather): comm time / step time.

GPU (the lead runs ``benchmarks/device/tp.sh`` on 2 GPUs)::

    python3 benchmarks/tp_bench.py --out $OUT --layers 10

CPU plumbing check (tiny random Llama shapes, gloo, 2 ranks, < 1 min)::

    PYTHONPATH=. python benchmarks/tp_bench.py --device cpu --quick --out /tmp/tp_quick

Writes ``tp.json`` and ``tp.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_matrix import dummy_w4_dir  # noqa: E402  (the random GPTQ W4 writer of the serving matrix)

from inlaid import LLM, SamplingParams  # noqa: E402
from inlaid.model.loader import CONFIGS_DIR  # noqa: E402

logger = logging.getLogger("tp_bench")


def model_dirs(a: argparse.Namespace, work: Path) -> Path:
    """A config-only dir (13B shapes with ``--layers``, or tiny shapes with --quick) and its random W4 twin."""
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import tiny_llama_config

        config = tiny_llama_config(num_hidden_layers=a.layers or 2)
    else:
        config = json.loads((CONFIGS_DIR / "llama2-13b-shapes" / "config.json").read_text())
        config["num_hidden_layers"] = a.layers
    cfg_dir = work / f"cfg-{config['num_hidden_layers']}l"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(config))
    return dummy_w4_dir(cfg_dir, work / f"w4-{config['num_hidden_layers']}l", seed=0)


def prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def capture_logits(llm: LLM) -> list[torch.Tensor]:
    """Record every ``compute_logits`` output of rank 0's model (full vocab, fp32, on the host)."""
    model = llm.engine.parts.model
    seen: list[torch.Tensor] = []
    original = model.compute_logits

    def wrapped(hidden: torch.Tensor) -> torch.Tensor:
        out = original(hidden)
        seen.append(out.detach().float().cpu())
        return out

    model.compute_logits = wrapped  # type: ignore[method-assign]
    return seen


def correctness(llm: LLM, a: argparse.Namespace, vocab: int) -> dict[str, Any]:
    seen = capture_logits(llm)
    ps = prompts(vocab, a.num_prompts, a.prompt_len)
    outs = llm.generate(ps, SamplingParams(max_tokens=a.greedy_tokens, temperature=0.0, ignore_eos=True))
    return {"prefill_logits": seen[0], "greedy": [o.token_ids for o in outs]}


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def decode_speed(llm: LLM, a: argparse.Namespace, batch: int, vocab: int) -> dict[str, float]:
    """tokens/s over timed decode steps, then the collective share of a step from timed steps."""
    eng = llm.engine
    ps = prompts(vocab, batch, a.prompt_len)
    n_steps = a.warmup_steps + a.decode_steps + a.comm_steps + 2
    for p in ps:
        eng.add_request(None, p, SamplingParams(max_tokens=n_steps, temperature=0.0, ignore_eos=True))
    eng.step()  # prefill (one step: batch * prompt_len tokens fit the token budget)
    for _ in range(a.warmup_steps):
        eng.step()
    sync(a.device)
    t0 = time.perf_counter()
    for _ in range(a.decode_steps):
        eng.step()
    sync(a.device)
    dt = time.perf_counter() - t0
    ctx = getattr(getattr(eng.runner, "group", None), "ctx", None)
    share = float("nan")
    if ctx is not None:
        ctx.timing, ctx.comm_time_s = True, 0.0
        sync(a.device)
        t1 = time.perf_counter()
        for _ in range(a.comm_steps):
            eng.step()
        sync(a.device)
        share = ctx.comm_time_s / (time.perf_counter() - t1)
        ctx.timing = False
    eng.abort_request([r for r in list(eng._requests)])
    while eng.has_unfinished_requests():
        eng.step()
    return {"tokens_per_s": batch * a.decode_steps / dt, "step_ms": 1000 * dt / a.decode_steps, "comm_share": share}


def run_world(model: Path, tp: int, a: argparse.Namespace, vocab: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(model=str(model), device=a.device, dtype=a.dtype, tensor_parallel_size=tp, num_blocks=a.num_blocks,
              distributed_timeout_s=a.timeout_s,
              max_num_seqs=max(a.batches), max_num_batched_tokens=max(a.batches) * a.prompt_len)
    try:
        if hasattr(llm.engine.runner, "graphs"):
            llm.engine.runner.graphs = None  # eager at every world size (see the module docstring)
        res: dict[str, Any] = {"tp": tp, "build_s": time.perf_counter() - t0}
        res.update(correctness(llm, a, vocab))
        res["decode"] = {str(b): decode_speed(llm, a, b, vocab) for b in a.batches}
        logger.info("TP=%d: %s", tp, res["decode"])
        return res
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if a.device != "cpu":
            torch.cuda.empty_cache()


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    ref, got = base["prefill_logits"], other["prefill_logits"]
    same = sum(x == y for x, y in zip(base["greedy"], other["greedy"]))
    return {"max_abs_dlogits": float((got - ref).abs().max()), "max_abs_logits": float(ref.abs().max()),
            "rel_dlogits": float((got - ref).abs().max() / ref.abs().max()),
            "greedy_equal": f"{same}/{len(base['greedy'])}",
            "first_divergence": [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
                                 for x, y in zip(base["greedy"], other["greedy"])]}


def environment(a: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": a.device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if a.device != "cpu":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def write_report(out: Path, a: argparse.Namespace, env: dict[str, Any], runs: list[dict[str, Any]],
                 checks: list[dict[str, Any]]) -> None:
    data = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "env": env, "checks": checks,
            "runs": [{k: v for k, v in r.items() if k != "prefill_logits"} for r in runs]}
    (out / "tp.json").write_text(json.dumps(data, indent=2, default=str))
    shapes = "CPU quick check, tiny shapes" if a.quick else "Llama-2-13B shapes"
    lines = [f"# Tensor parallelism: TP=1 vs TP={a.tp} ({shapes}, random GPTQ W4 g{a.group_size}, {a.layers} "
             f"decoder layers, {a.dtype})", "",
             f"Environment: {json.dumps(env)}", "", "## Correctness (prefill logits, greedy tokens)", "",
             "| TP | max abs Δlogits | rel. to max abs logit | greedy tokens equal | first divergence |",
             "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['tp']} | {c['max_abs_dlogits']:.3g} | {c['rel_dlogits']:.3g} | {c['greedy_equal']} "
                     f"| {c['first_divergence']} |")
    lines += ["", "## Decode (eager, both world sizes)", "",
              "| TP | batch | tokens/s | step ms | collectives share of a step (rank 0) |", "|---|---|---|---|---|"]
    for r in runs:
        for b, d in r["decode"].items():
            lines.append(f"| {r['tp']} | {b} | {d['tokens_per_s']:.1f} | {d['step_ms']:.2f} | {_pct(d['comm_share'])} |")
    lines += ["", f"Command: `python3 benchmarks/tp_bench.py {' '.join(sys.argv[1:])}`", ""]
    (out / "tp.md").write_text("\n".join(lines))


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/inlaid_tp"), help="tp.json and tp.md go here")
    p.add_argument("--work", type=Path, default=Path("/tmp/inlaid_tp_work"), help="the random W4 checkpoint")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 10; --quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU plumbing check)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--comm-steps", type=int, default=5)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--timeout-s", type=float, default=120.0)
    a = p.parse_args(argv)
    a.layers = a.layers or (2 if a.quick else 10)
    a.dtype = a.dtype or ("float32" if a.device == "cpu" else "float16")
    if a.quick:
        a.batches, a.decode_steps, a.prompt_len, a.num_prompts = [1, 4], 5, 8, 3
    return a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model = model_dirs(a, a.work)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    a.group_size = json.loads((model / "quantize_config.json").read_text())["group_size"]
    env = environment(a)
    runs, checks = [], []
    for tp in (1, a.tp):
        logger.info("building TP=%d on %s", tp, model)
        runs.append(run_world(model, tp, a, vocab))
        if tp != 1:
            checks.append({"tp": tp, **compare(runs[0], runs[-1])})
        write_report(a.out, a, env, runs, checks)  # partial results survive a later failure
    print((a.out / "tp.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

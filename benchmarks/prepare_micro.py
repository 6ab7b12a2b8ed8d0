"""Host cost of the parts of a graphed decode step's input preparation, each timed alone (GPU idle, as after
the previous step's token read-back). CUDA only; an engine on SmolLM2 shapes with dummy weights, ``--batches``
running requests, then one scheduled decode step whose inputs are rebuilt many times.

Columns (median host us of 200 calls): ``decode_arrays`` / ``pack`` / ``upload`` (the numpy inputs, their two
packed arrays, the two pinned host->device copies) and ``build_forward_inputs`` (all of it, plus the
ForwardBatch views); ``fill`` (copying a batch into the graph's static buffers); ``replay`` (launching the
captured graph); ``graphs.run`` (fill + replay); ``logits+sample+tolist`` (logits of the graph's output,
sampling, the token read-back); ``execute`` (a whole runner step, GPU forward included, median of 50).

    python benchmarks/prepare_micro.py --batches 1 32 --out benchmarks/results/prepare_micro_h200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inlaid.bench.pages import write_results
from inlaid.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig  # noqa: E402
from inlaid.engine.llm_engine import LLMEngine  # noqa: E402
from inlaid.sampling import SamplingParams  # noqa: E402
from inlaid.worker import forward_batch as fb  # noqa: E402


def timed(fn, n: int = 200) -> float:
    """Median host microseconds of ``fn()`` with the GPU drained before each call."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = EngineConfig(model=ModelConfig(model=str(ROOT / "benchmarks/configs/smollm2-135m"), load_format="dummy",
                                         dtype="bfloat16"),
                       cache=CacheConfig(num_blocks=1024, block_size=16),
                       scheduler=SchedulerConfig(max_num_seqs=max(args.batches), max_num_batched_tokens=8192),
                       lora=LoRAConfig(max_loras=1, max_lora_rank=16), device="cuda")
    eng = LLMEngine(cfg)
    runner = eng.runner
    rows = []
    for b in args.batches:
        for i in range(b):
            eng.add_request(f"b{b}-{i}", list(range(3, 19)), SamplingParams(max_tokens=400, ignore_eos=True))
        for _ in range(4):
            eng.step()
        out = eng.scheduler.schedule()  # one more decode step's plan; its inputs are re-built below, many times
        seqs = out.scheduled
        batch, _ = fb.build_forward_inputs(out, runner.block_size, runner.device, runner._staging)
        graphs = runner.graphs
        size = next(s for s in graphs.sizes if s >= b)
        graph, hidden = next(v for k, v in graphs.graphs.items() if k[0] == size)
        arrays = fb._decode_arrays(seqs, runner.block_size)
        i64 = [arrays[k] for k in fb._I64]
        i32 = [arrays[k] for k in fb._I32]
        (p64, _), (p32, _) = fb._pack(i64, fb.np.int64), fb._pack(i32, fb.np.int32)
        row = {
            "batch": b,
            "decode_arrays": timed(lambda: fb._decode_arrays(seqs, runner.block_size)),
            "pack": timed(lambda: (fb._pack(i64, fb.np.int64), fb._pack(i32, fb.np.int32))),
            "upload": timed(lambda: runner._staging.upload(p64, p32)),
            "build_forward_inputs": timed(lambda: fb.build_forward_inputs(out, runner.block_size, runner.device,
                                                                          runner._staging)),
            "fill": timed(lambda: graphs.buffers.fill(batch, size)),
            "replay": timed(graph.replay),
            "graphs.run": timed(lambda: graphs.run(batch)),
            "logits+sample+tolist": timed(lambda: runner._sample(hidden[:b], batch,
                                                                 [s for s in seqs if s.sample]).tolist()),
            "execute": timed(lambda: runner.execute(out), 50),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        eng.abort_request([f"b{b}-{i}" for i in range(b)])
        while eng.has_unfinished_requests():
            eng.step()
    lines = ["# Host microseconds of the graphed decode step's parts (median of 200, GPU drained before each; "
             f"{torch.cuda.get_device_name()}, SmolLM2-135M shapes, dummy weights)", "",
             "Command: `python benchmarks/prepare_micro.py " + " ".join(sys.argv[1:]) + "`", "",
             "| batch | " + " | ".join(k for k in rows[0] if k != "batch") + " |",
             "|---" * len(rows[0]) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    write_results(args.out, rows, "\n".join(lines) + "\n", indent=0, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""aten ops per eager prefill step, by region of the model (issue 8: eager prefill is host-bound on the GPU).

A narrow Llama (hidden 128, 32 layers, dummy weights, 2 random adapters) on CPU, where every op is dispatched
like on the GPU: one prefill step of 5 x 200 tokens (half with an adapter) is counted op by op with a
``TorchDispatchMode`` and attributed to the innermost region (norm, rotary, KV write, attention, projection
incl. its LoRA delta, other); then, without adapters, every aten op of one step as ``torch.profiler`` counts
them (nested ops included: ``linear`` and the ``mm`` under it both count) and the median wall time of 15
steps (1 thread).

    python benchmarks/prefill_ops.py
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import inlaid.model.layers as layers  # noqa: E402
from inlaid.kernels import rotary_kv  # noqa: E402
import inlaid.model.llama as llama  # noqa: E402
from decode_baseline import build_engine  # noqa: E402
from inlaid.sampling import SamplingParams  # noqa: E402

REGIONS = ((layers.RMSNorm, "forward", "rmsnorm"), (rotary_kv, "apply_rotary_ref", "rotary"),
           (rotary_kv, "write_kv", "write_kv"),
           (llama, "paged_attention", "paged_attention"), (llama, "_project", "projection (incl. LoRA)"))


class _Count(TorchDispatchMode):
    def __init__(self, stack: list[str], counts: collections.Counter) -> None:
        super().__init__()
        self.stack, self.counts = stack, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.counts[self.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


def _wrap(owner: object, name: str, label: str, stack: list[str]) -> None:
    fn = getattr(owner, name)

    def wrapped(*a, **k):  # noqa: ANN002, ANN003, ANN202
        stack.append(label)
        try:
            return fn(*a, **k)
        finally:
            stack.pop()

    setattr(owner, name, wrapped)


def _prefill(eng, tag: str, adapters: bool) -> float:  # noqa: ANN001
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for i in range(5):
        eng.add_request(f"{tag}-{i}", [(7 * i + j) % 500 + 5 for j in range(200)], params,
                        "a0" if adapters and i % 2 else None)
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    torch.set_num_threads(1)
    cfg = json.loads((ROOT / "inlaid/model/configs/llama2-7b-shapes/config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
               num_hidden_layers=32, vocab_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        eng = build_engine(tmp, "cpu", 2048, 2)
        for k in range(3):
            _prefill(eng, f"w{k}", adapters=True)
        times = [_prefill(eng, f"t{k}", adapters=False) for k in range(15)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _prefill(eng, "prof", adapters=False)
        profiled = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        stack, counts = ["other"], collections.Counter()
        for owner, name, label in REGIONS:
            _wrap(owner, name, label, stack)
        with _Count(stack, counts):
            _prefill(eng, "count", adapters=True)
    layers_n = cfg["num_hidden_layers"]
    print(f"aten ops per prefill step (5 x 200 tokens, half with an adapter): {sum(counts.values())}")
    for label, n in counts.most_common():
        print(f"  {label:24s} {n:6d}  ({n / layers_n:.1f} per layer)")
    print(f"without adapters: {profiled} aten ops per step (torch.profiler, nested included)")
    print(f"wall time per prefill step without adapters (CPU, 1 thread): median {statistics.median(times):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-sequence eager prefill of the dummy Llama-2-7B-shaped W4 g128 engine (issue 8): wall time (min of 5
steps) and the step's kernel time (torch.profiler), at 256 and 1,024 prompt tokens. A request with
``max_tokens=1`` makes the prefill step the whole request. Run it on two trees in one device call to compare
(``PYTHONPATH=<tree>``, alternating).

    python benchmarks/prefill_single.py --out benchmarks/results/prefill_single_h100   # GPU, ~30 s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_baseline import MODELS  # noqa: E402
from e2e_decode import build_engine, make_w4  # noqa: E402

from inlaid.sampling import SamplingParams  # noqa: E402

ATTENTION_KERNELS = ("attention", "sdpa", "flash", "fmha", "index", "gather")


def prefill_ms(eng, plen: int, tag: str) -> float:  # noqa: ANN001
    eng.add_request(tag, torch.randint(3, eng.parts.arch.vocab_size, (plen,)).tolist(),
                    SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write <out>.md")
    args = ap.parse_args()
    eng = build_engine(MODELS["llama2-7b"], "cuda", 2048, 0)
    make_w4(eng.parts.model, "cuda", eng.parts.dtype)
    lines = []
    for plen in (256, 1024):
        for k in range(2):
            prefill_ms(eng, plen, f"w{plen}-{k}")
        wall = min(prefill_ms(eng, plen, f"m{plen}-{k}") for k in range(5))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            prefill_ms(eng, plen, f"p{plen}")
        kern = sum(e.device_time_total for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        attn = sum(e.self_device_time_total for e in p.key_averages() if any(s in e.key for s in ATTENTION_KERNELS))
        lines.append(f"prefill 1 x {plen}: wall ms {wall:.2f}, kernel ms {kern / 1e3:.2f}, "
                     f"attention+index kernels ms {attn / 1e3:.2f}")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out + ".md").write_text(f"# One-sequence 7B W4 prefill ({torch.cuda.get_device_name()})\n\n"
                                          + "\n".join(f"- {x}" for x in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

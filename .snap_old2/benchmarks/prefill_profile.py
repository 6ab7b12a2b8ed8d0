"""Where a prefill step's time goes (issue 8): prefill steps of the 7B-shaped dummy engine timed by size and
number of adapters, with the prefill LoRA path as the segmented Triton kernel and as the torch SGMV loop,
then one step of each profiled (torch.profiler: top CUDA kernels, top CPU ops), then 5 eager decode steps of
a batch of 8 with 8 adapters profiled (kernel times are what a graph replay runs).

Every point runs once on both paths untimed first (Triton compiles, cuDNN attention plans), then each path is
timed. The first (session 4) run lacked that shared warm-up: its first block's wall times carry compiles.

    python benchmarks/prefill_profile.py --quant fp16 --out benchmarks/results/prefill_profile_h200   # GPU
    python benchmarks/prefill_profile.py --device cpu --model <tiny HF dir> --out /tmp/pp             # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_baseline import build_engine  # noqa: E402
from e2e_decode import make_w4  # noqa: E402

from inlaid.sampling import SamplingParams  # noqa: E402

POINTS = ((1, 200, 0), (5, 200, 0), (5, 200, 5), (24, 200, 8), (5, 1000, 5), (1, 16, 1))


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _activities(dev: str) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else acts


def prefill(eng, dev: str, n: int, plen: int, adapters: int, tag: str, vocab: int, lines: list[str],  # noqa: ANN001
            profile: bool = False) -> None:
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"{tag}-{i}", [(7 * i + j) % (vocab - 5) + 5 for j in range(plen)], params,
                        f"a{i % adapters}" if adapters else None)
    _sync(dev)
    t0 = time.perf_counter()
    if profile:
        with torch.profiler.profile(activities=_activities(dev)) as p:
            while eng.has_unfinished_requests():
                eng.step()
            _sync(dev)
        key = "cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        lines += [p.key_averages().table(sort_by=key, row_limit=30),
                  p.key_averages().table(sort_by="cpu_time_total", row_limit=25)]
    else:
        while eng.has_unfinished_requests():
            eng.step()
        _sync(dev)
    lines.append(f"prefill n={n} plen={plen} adapters={adapters}: {(time.perf_counter() - t0) * 1000:.1f} ms")


def decode_profile(eng, dev: str, vocab: int, lines: list[str]) -> None:  # noqa: ANN001
    graphs, eng.runner.graphs = eng.runner.graphs, None  # eager: per-kernel times are those a replay runs
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for i in range(8):
        eng.add_request(f"dec-{i}", [(3 * i + j) % (vocab - 5) + 5 for j in range(32)], params, f"a{i % 8}")
    eng.step()
    eng.step()
    with torch.profiler.profile(activities=_activities(dev)) as p:
        for _ in range(5):
            eng.step()
        _sync(dev)
    lines.append("== decode b8 a8, 5 eager steps")
    key = "cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    lines.append(p.key_averages().table(sort_by=key, row_limit=30))
    while eng.has_unfinished_requests():
        eng.step()
    eng.runner.graphs = graphs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b-shapes")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quant", choices=("fp16", "w4"), default="fp16")
    ap.add_argument("--out", required=True, help="writes <out>.md")
    args = ap.parse_args()
    eng = build_engine(args.model, args.device, 4096, 8)
    if args.quant == "w4":
        make_w4(eng.runner.model, args.device, torch.float16 if args.device == "cuda" else torch.float32)
    vocab = eng.runner.arch.vocab_size
    lines: list[str] = []
    pool = eng.runner.lora_pool
    warm: list[str] = []
    for seg in (True, False):  # one untimed pass of every point on both paths: compiles, cuDNN plans
        pool.triton_prefill = seg and args.device == "cuda"
        for n, plen, ad in POINTS:
            prefill(eng, args.device, n, plen, ad, f"w{n}-{plen}-{ad}-{seg}", vocab, warm)
    for seg in (True, False):
        pool.triton_prefill = seg and args.device == "cuda"
        lines.append(f"== segment kernel {pool.triton_prefill}")
        for n, plen, ad in POINTS:
            prefill(eng, args.device, n, plen, ad, f"t{n}-{plen}-{ad}-{seg}", vocab, lines)
        prefill(eng, args.device, 5, 200, 5, f"prof{seg}", vocab, lines, profile=True)
    decode_profile(eng, args.device, vocab, lines)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    head = [f"# Prefill and decode step profile ({dev}, {args.model}, {args.quant})", "",
            f"Command: `python benchmarks/prefill_profile.py --quant {args.quant} --out ...`. See the script's "
            "docstring for the method and its caveat.", "", "```"]
    Path(args.out + ".md").write_text("\n".join(head + lines + ["```", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

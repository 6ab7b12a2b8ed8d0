"""Small-M W4A16 kernel (``w4a16_small_m``, 2 <= M <= 16) vs the torch GPTQ reference ``gptq_dequant.gptq_linear``.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` on tiny shapes; with CUDA the same tests run compiled,
plus ``gpu`` tests at Llama-2-7B shapes and one CUDA-graph replay. Weights are packed here one nibble at a time
(independent of the module's pack helpers), the reference reads the original, un-permuted g_idx, and every output
starts NaN-poisoned so an unwritten element fails the check. Every entry of ``SMALL_M_CONFIGS`` is checked at
M in {2, 3, 5, 16}; across the configs each M meets fp16 and bf16, group 32 and 128, act-order on and off.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from triton_setup import (  # skips the module without triton
    DEVICE,
    HAS_CUDA,
    TOL,
    assert_close,
    capture_graph,
    gptq_case,
    gptq_reference,
    kernel_module,
)

from inlaid.kernels import gptq_dequant

wk = kernel_module("w4a16_gemm")  # (re)loads the shared kernel modules under the interpreter first
sm = kernel_module("w4a16_small_m")
Cfg = sm.SmallMConfig
NAMES = sorted(sm.SMALL_M_CONFIGS)
# (dtype, group_size, act_order) combos, rotated over the configs so that every M meets each of them.
COMBOS = [(torch.float16, 32, True), (torch.bfloat16, 128, False), (torch.bfloat16, 32, False),
          (torch.float16, 128, True)]  # fmt: skip
MS = (2, 3, 5, 16)


def _run(x: torch.Tensor, packed, cfg) -> torch.Tensor:
    out = torch.full((x.shape[0], packed.out_features), float("nan"), device=DEVICE, dtype=x.dtype)
    y = sm.w4a16_small_m(x, packed.qweight, packed.qzeros, packed.scales, packed.perm, packed.group_size, cfg,
                         out=out, locks=packed.locks)  # fmt: skip
    assert y.data_ptr() == out.data_ptr() and y.dtype == x.dtype
    assert int(packed.locks.abs().sum()) == 0, "fixup mode must leave its semaphores zeroed for the next call"
    return y


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mi", range(len(MS)))
def test_every_candidate_matches_reference(name: str, mi: int) -> None:
    m = MS[mi]
    dtype, gs, act_order = COMBOS[(mi + NAMES.index(name)) % len(COMBOS)]
    k, n = 256, 48  # 2-4 K tiles (split-K > 1 on any GPU size); n = 48 leaves partial N tiles
    tensors, packed = gptq_case(k, n, gs, act_order, seed=m * 100 + gs + act_order)
    assert (packed.perm is not None) == act_order
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    assert_close(_run(x, packed, name), gptq_reference(x, *tensors), TOL[dtype])


@pytest.mark.parametrize(
    "cfg,k,gs,m,dtype",
    [
        (Cfg("dot", "f32", 32, 128, split_k=1), 256, 128, 4, torch.float16),  # no split: direct store
        (Cfg("dot", "h16", 32, 128, split_k=3, mode="reduce"), 576, 128, 7, torch.float16),  # partial last group
        (Cfg("dot", "f32", 16, 256, split_k=2, mode="fixup"), 576, 128, 9, torch.bfloat16),  # 2 groups per tile
        (Cfg("dot", "h16", 32, 16, split_k=4, mode="fixup"), 128, 32, 16, torch.bfloat16),  # smallest K tile
        (Cfg("fma", "h16", 16, 32, split_k=2, mode="reduce"), 192, -1, 6, torch.float16),  # one group per column
        (Cfg("fma", "f32", 32, 128, split_k=2), 256, 64, 1, torch.bfloat16),  # M = 1 works too
        (Cfg("fma", "f32", 32, 128, split_k=3, mode="fixup"), 576, 128, 5, torch.float16),  # fma, partial K tile
        (Cfg("dot", "h16", 32, 64, split_k=2), 128, 64, 3, torch.float32),  # fp32 x (TF32 dots on a GPU)
    ],
)
def test_edge_cases(cfg, k: int, gs: int, m: int, dtype: torch.dtype) -> None:
    tensors, packed = gptq_case(k, 48, gs, act_order=gs in (32, 128), seed=k + m)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    tol = 5e-3 if dtype == torch.float32 and HAS_CUDA else TOL[dtype]
    assert_close(_run(x, packed, cfg), gptq_reference(x, *tensors), tol)


def test_split_count_and_defaults() -> None:
    cfg = sm.SMALL_M_CONFIGS["dot_f32_n128"]
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536)):
        split, per = sm.small_m_split(k, n, cfg, num_sms=132)
        k_tiles = -(-k // cfg.block_k)
        assert 1 <= split <= k_tiles and per % cfg.block_k == 0
        assert (split - 1) * per < k <= split * per, "every split has work and all of K is covered"
    assert sm.small_m_split(4096, 4096, Cfg(split_k=12), 132) == (11, 384)  # 32 tiles in 3s: 11 splits, none empty
    assert sm.small_m_split(256, 4096, Cfg(split_k=64), 132)[0] == 2  # capped at the K tiles


def test_bad_inputs_raise_value_error() -> None:
    _, packed = gptq_case(64, 16, 16, act_order=False, seed=1)
    x = torch.randn(2, 64, device=DEVICE).half()
    with pytest.raises(ValueError, match="unknown small-M config"):
        sm.w4a16_small_m(x, packed.qweight, packed.qzeros, packed.scales, None, 16, "nope")
    with pytest.raises(ValueError, match="M <= 16"):
        sm.w4a16_small_m(torch.randn(17, 64, device=DEVICE).half(), packed.qweight, packed.qzeros, packed.scales,
                         None, 16)  # fmt: skip
    with pytest.raises(ValueError, match="features"):
        sm.w4a16_small_m(torch.randn(2, 32, device=DEVICE).half(), packed.qweight, packed.qzeros, packed.scales,
                         None, 16)  # fmt: skip
    with pytest.raises(ValueError, match="out must be"):
        sm.w4a16_small_m(x, packed.qweight, packed.qzeros, packed.scales, None, 16,
                         out=torch.empty(2, 16, device=DEVICE, dtype=torch.float32))  # fmt: skip
    for bad in ({"variant": "wmma"}, {"unpack": "int8"}, {"mode": "spin"}, {"block_n": 96}, {"block_k": 8},
                {"split_k": -1}):  # fmt: skip
        with pytest.raises(ValueError, match="SmallMConfig"):
            Cfg(**bad)
    assert sm.w4a16_small_m(x[:0], packed.qweight, packed.qzeros, packed.scales, None, 16).shape == (0, 16)


def _gpu_case(k: int, n: int, gs: int, act_order: bool):
    g = torch.Generator(device="cuda").manual_seed(k + n + gs)
    groups = -(-k // gs)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (groups, n // 8), device="cuda", dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, device="cuda", generator=g) * 0.02 + 1e-3).half()
    order = torch.randperm(k, device="cuda", generator=g) if act_order else torch.arange(k, device="cuda")
    g_idx = (order // gs).to(torch.int32)
    return (qweight, qzeros, scales, g_idx), wk.prepare_w4(qweight, qzeros, scales, g_idx, gs)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n,gs,act_order", [(4096, 4096, 128, False), (11008, 4096, 128, True),
                                              (4096, 11008, 32, True)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama7b_shapes_every_candidate(k: int, n: int, gs: int, act_order: bool, dtype: torch.dtype) -> None:
    tensors, packed = _gpu_case(k, n, gs, act_order)
    for m in (2, 5, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = gptq_dequant.gptq_linear(x.float(), tensors[0], tensors[1], tensors[2].float(), tensors[3], 4).double()
        for name in NAMES:
            assert_close(_run(x, packed, name), ref, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dot_f32_n128", "dot_f32_n128_fixup"])
def test_gpu_cuda_graph_replay_with_new_inputs(name: str) -> None:
    tensors, packed = _gpu_case(4096, 4096, 128, act_order=True)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty(8, 4096, device="cuda", dtype=torch.float16)
    call = lambda: sm.w4a16_small_m(x, packed.qweight, packed.qzeros, packed.scales, packed.perm,
                                    packed.group_size, name, out=out, locks=packed.locks)
    graph = capture_graph(call)
    for _ in range(3):  # replays see fresh inputs: no stale workspace, semaphores reset
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = gptq_dequant.gptq_linear(x.float(), tensors[0], tensors[1], tensors[2].float(), tensors[3], 4)
        assert_close(out, ref.double(), TOL[torch.float16])
    assert int(packed.locks.abs().sum()) == 0


def _load_bench():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "small_m_bench.py"
    spec = importlib.util.spec_from_file_location("small_m_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_path_checks_every_named_candidate(tmp_path) -> None:
    smb = _load_bench()
    names = ["dot_f32_n128_fixup", "fma_f32_n64"]
    rc = smb.main(["--out", str(tmp_path / "sm"), "--device", DEVICE, "--quick", "--configs", ",".join(names)])
    data = json.loads((tmp_path / "sm.json").read_text())
    assert rc == 0 and set(data["configs"]) == set(names)
    checks = [r for r in data["rows"] if r["event"] == "check"]
    assert len(checks) == len(smb.QUICK_SHAPES) * 5 * len(names) and all(r["err"] < 1e-2 for r in checks)
    assert "| 576x48 | 16 | fma_f32_n64 | check |" in (tmp_path / "sm.md").read_text()


def test_bench_timing_path_plumbing_with_a_wall_clock(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA section end to end on tiny shapes, a host timer standing in for CUDA-graph replay (numbers
    meaningless; what is checked: every (shape, M, impl) row is produced, checked, and lands in the page)."""
    smb = _load_bench()
    monkeypatch.setattr(smb, "SHAPES", [(256, 64)])
    monkeypatch.setattr(smb, "MS", (2, 32))
    monkeypatch.setattr(smb, "l2_bytes", lambda torch: 1)
    monkeypatch.setattr(smb, "graph_time", lambda torch, call, copies: _wall_us(call, copies))
    args = smb.parse_args(["--out", str(tmp_path / "x"), "--device", "cpu", "--quick", "--configs",
                           "dot_h16_n64,dot_f32_n128"])  # fmt: skip
    b = smb.Bench(args)
    b.dev = DEVICE
    smb.run_cuda(b)
    timed = {(r["m"], r["impl"]) for r in b.rows if r["event"] == "time"}
    assert timed == {(2, "cublas_fp16"), (2, "installed"), (2, "dot_h16_n64"), (2, "dot_f32_n128"),
                     (32, "cublas_fp16"), (32, "installed")}  # fmt: skip
    args.quick = False
    page = smb.to_markdown(b, {"device": "test", "torch": "-", "triton": "-", "command": "-", "peak_tbps": 4.8}, 1.0)
    assert "| 256x64 | 2 | dot_h16_n64 |" in page and "## Best per shape and M" in page


def _wall_us(call, copies) -> float:
    t = time.perf_counter()
    for c in copies:
        call(c)
    return (time.perf_counter() - t) * 1e6 / len(copies)

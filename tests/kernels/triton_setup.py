"""Shared set-up of the Triton kernel tests: interpreter on CPU, device, tolerances.

Importing this module skips the importing test module when triton is missing or
was imported before ``TRITON_INTERPRET=1`` could take effect (tests/conftest.py
sets it first on CPU machines).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first `import triton`: triton's own jit helpers read it at import
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if not HAS_CUDA and type(sys.modules["triton"].language.standard.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels in its own process",
                allow_module_level=True)

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

_KERNEL_MODULES = ("w4_dequant", "w4a16_gemv", "w4a16_configs", "w4a16_small_m", "w4a16_tc", "w4a16_gemm",
                   "lora_sgmv_triton",
                   "lora_segment_triton", "rms_norm", "silu_mul", "rotary_kv",
                   "paged_attention_triton")  # dependency order: a reload must see reloaded dependencies


def kernel_module(name: str) -> ModuleType:
    """The kernel module, (re)imported so that on CPU its kernels run in the Triton interpreter."""
    mod = importlib.import_module(f"inlaid.kernels.{name}")
    if not HAS_CUDA and not mod.kernels_interpreted():  # imported before TRITON_INTERPRET=1 was set
        importlib.reload(importlib.import_module("inlaid.kernels._triton"))
        for dep in _KERNEL_MODULES:
            if f"inlaid.kernels.{dep}" in sys.modules:
                importlib.reload(sys.modules[f"inlaid.kernels.{dep}"])
        mod = importlib.import_module(f"inlaid.kernels.{name}")
    return mod


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes [8R, C] along dim 0: row 8r+j at bits 4j..4j+3 of word r (plain loop, independent of the
    package's pack helpers)."""
    rows, cols = codes.shape
    words = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows):
        words[r // 8] |= codes[r].to(torch.int64) << (4 * (r % 8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def capture_graph(call) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``call()``, run once on a side stream first (Triton compiles outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def gptq_case(k: int, n: int, gs: int, act_order: bool, seed: int):
    """Random 4-bit GPTQ tensors ``[qweight, qzeros, scales, g_idx]`` on DEVICE (packed with ``pack_nibbles``)
    and their kernel-ready ``PackedW4`` (``gs=-1``: one group per column)."""
    from inlaid.kernels.w4_layout import prepare_w4

    g = torch.Generator().manual_seed(seed)
    gs_eff = k if gs == -1 else gs
    groups = -(-k // gs_eff)
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 17, (groups, n), generator=g)  # 16 = stored 15 (+1 without wrap)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = ((torch.randperm(k, generator=g) if act_order else torch.arange(k)) // gs_eff).to(torch.int32)
    qweight = pack_nibbles(codes)
    qzeros = pack_nibbles((zeros - 1).t().contiguous()).t().contiguous()
    tensors = [t.to(DEVICE) for t in (qweight, qzeros, scales, g_idx)]
    return tensors, prepare_w4(*tensors[:3], None if gs == -1 else tensors[3], gs)


def assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Every element of ``y`` was written (no NaN poison left) and ``max|y - ref| <= rel * max|ref|``."""
    assert torch.isfinite(y).all(), "some output elements were not written (NaN poison survived)"
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * max|ref| {scale:.3g}"


def gptq_reference(x: torch.Tensor, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """``x @ W`` in float64 through the torch GPTQ reference (``gptq_dequant.gptq_linear``)."""
    from inlaid.kernels import gptq_dequant

    return gptq_dequant.gptq_linear(x.double(), qweight, qzeros, scales.double(), g_idx, 4)

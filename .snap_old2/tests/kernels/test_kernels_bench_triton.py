"""Smoke test of ``benchmarks/kernels_bench.py`` on CPU: tiny shapes, Triton interpreter, a wall-clock timer.

Checks that every section runs end to end (correctness checks, timings, tables,
crossover) and produces finite numbers; the real numbers come from a GPU run.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first `import triton`: triton's own jit helpers read it at import
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if not HAS_CUDA and type(sys.modules["triton"].language.standard.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels in its own process",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_setup import kernel_module as _kernel_module  # noqa: E402


@pytest.fixture()
def kb(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("kernels_bench", ROOT / "benchmarks" / "kernels_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not HAS_CUDA:
        for attr, name in (("wk", "w4a16_gemm"), ("lk", "lora_sgmv_triton"), ("pk", "paged_attention_triton")):
            monkeypatch.setattr(mod, attr, _kernel_module(name))

        def one_shot(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        monkeypatch.setattr(mod, "DEVICE", "cpu")
        monkeypatch.setattr(mod, "bench", one_shot)
    monkeypatch.setattr(mod, "SHAPES", [(256, 64)])
    monkeypatch.setattr(mod, "MS", [1, 32])
    monkeypatch.setattr(mod, "CHECK_MS", (3,))
    monkeypatch.setattr(mod, "LAYER", {"q_proj": (128, 64), "gate_proj": (128, 96), "down_proj": (256, 64)})
    monkeypatch.setattr(mod, "LORA_BATCH", 4)
    monkeypatch.setattr(mod, "CHECK_ATTN_LENS", ([40, 7],))
    monkeypatch.setattr(mod, "ATTN_POINTS", [(2, 48)])
    monkeypatch.setattr(mod, "sweep_configs", lambda m: [mod.wk.W4Config(16 if m <= 16 else 32, 32, 64, 2)])
    return mod


def test_bench_sections_run_and_report_finite_numbers(kb) -> None:
    errors: list[str] = []
    checks = kb.check_w4(errors) + kb.check_lora(errors) + kb.check_attention(errors)
    assert errors == []
    assert all(v < 2e-2 for r in checks for k, v in r.items() if k.startswith("rel_err")), checks
    w4 = kb.time_w4(errors, deadline=time.monotonic() + 60)
    lora = [kb.time_lora_rank(4, kb.LORA_BATCH)]
    attn = [kb.time_attention_point(2, 48, kv_heads=32)]
    assert errors == [] and len(w4) == 2
    for row in w4 + lora + attn:
        assert all(math.isfinite(v) and v > 0 for k, v in row.items() if k.endswith(("_ms", "_TBps"))), row
    res = {"env": {"device": "cpu", "torch": "x", "triton": "y"}, "errors": [], "check_w4a16": checks[:1],
           "check_lora": [], "check_attention": [], "w4a16": w4, "w4a16_crossover": kb.crossover(w4),
           "lora": lora, "attention": attn}
    md = kb.to_markdown(res)
    assert "| 256x64 | 1 |" in md and "overhead_vs_w4_base" in md and "linear_tuned_TBps" in md


def test_safe_records_a_failing_variant_and_goes_on(kb) -> None:
    errors: list[str] = []
    assert kb.safe("boom", errors, lambda: 1 / 0) is None
    assert errors and errors[0].startswith("boom: ZeroDivisionError")

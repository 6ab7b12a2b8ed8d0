"""Inputs and checks shared by the W4A16 kernel benchmarks (``benchmarks/small_m_tc_bench.py``, ``tcl_bench.py``).

Random 4-bit GPTQ tensors (uniform codes and zeros, scales in [5e-4, 2.5e-3], monotone g_idx) and the check that
every one-launch split-K call left the shared fp32 sums and semaphores zeroed (``w4a16_gemv.splitk_scratch``).
"""

from __future__ import annotations

import torch


def random_w4(k: int, n: int, group_size: int = 128, device: str = "cuda") -> dict[str, torch.Tensor]:
    """``qweight`` [K/8, N], ``qzeros`` [G, N/8], fp16 ``scales`` [G, N] and ``g_idx`` [K] of a random 4-bit weight."""
    hi, g = 2**31 - 1, -(-k // group_size)
    return {"qweight": torch.randint(-hi - 1, hi, (k // 8, n), dtype=torch.int32, device=device),
            "qzeros": torch.randint(-hi - 1, hi, (g, n // 8), dtype=torch.int32, device=device),
            "scales": (torch.rand(g, n, device=device) * 0.002 + 0.0005).half(),
            "g_idx": torch.arange(k, device=device, dtype=torch.int32) // group_size}


def scratch_clean() -> bool:
    """True when every shared split-K buffer on the GPU is zero again (the kernels re-zero what they use)."""
    from inlaid.kernels.w4a16_gemv import _SCRATCH

    return all(int(a.count_nonzero()) == 0 and int(lk.count_nonzero()) == 0 for kept in _SCRATCH.values()
               for a, lk in kept)

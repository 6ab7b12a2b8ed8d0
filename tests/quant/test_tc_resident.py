"""A served 4-bit linear whose W4A16 words are in the tensor-core layout keeps ONE copy of its weight.

``GPTQLinearMethod.kernel_tensors`` puts the tensor-core words (``w4_layout.to_tc_layout``) in ``qweight`` itself
when there is no act-order permutation; every reader of the checkpoint's layout (the fp32 fallback, the
dequantized cache, ``state_dict``, requant rollback snapshots) goes through ``checkpoint_words``. On CPU the
layout is never chosen, so the CPU test builds the resident state by hand (the layer as a CUDA load leaves it);
the GPU test loads it for real and swaps new tensors in place.
"""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels import w4_layout
from inlaid.kernels import w4a16_gemm as w4k
from inlaid.kernels.gptq_dequant import dequantize_gptq, gptq_linear
from inlaid.model.layers import ParallelLinear
from inlaid.quant.linear import GPTQLinearMethod, _install, swap

K, N, GS = 256, 64, 128


def _tensors(seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (N, K // GS), generator=g)
    return {"qweight": w4_layout.pack4_rows(codes).to(device),
            "qzeros": w4_layout.pack4_rows(zeros).t().contiguous().to(device),
            "scales": (torch.rand(K // GS, N, generator=g) * 0.02 + 1e-3).half().to(device),
            "g_idx": (torch.arange(K) // GS).to(torch.int32).to(device)}


def _layer(device: str) -> ParallelLinear:
    return ParallelLinear(K, N, False, "column", torch.device(device), torch.float32,
                          quant_method=GPTQLinearMethod(4, GS))


def test_resident_layer_reads_back_the_checkpoint_words(monkeypatch) -> None:
    t = _tensors(0, "cpu")
    layer = _layer("cpu")
    _install(layer, t)
    monkeypatch.setattr(w4k, "serving_layout", lambda q, gs: "tc")  # as on a GPU with K, group % 128 == 0
    tc = w4_layout.to_tc_layout(t["qweight"])
    _install(layer, {"qweight": tc, "w4_qweight": tc})  # what kernel_tensors leaves on CUDA
    method = layer.quant_method
    assert method.checkpoint_words(layer._buffers).equal(t["qweight"])
    host = method.checkpoint_words(layer._buffers, "cpu")  # a rollback snapshot's copy, converted on the host
    assert host.equal(t["qweight"]) and host.data_ptr() != layer._buffers["qweight"].data_ptr()
    assert layer.state_dict()["qweight"].equal(t["qweight"])  # the checkpoint's layout, not the kernels'
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4)
    assert method.dequantized(layer._buffers, torch.float32).equal(w)
    x = torch.randn(3, K)
    ref = gptq_linear(x, t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4)
    assert torch.equal(layer(x), ref)  # the CPU path reads the rebuilt checkpoint words
    assert method.kernel_tensors(layer._buffers) == {}  # prepared already: finalize stays idempotent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_resident_layer_swaps_in_place_and_keeps_one_copy() -> None:
    t, t2 = _tensors(1, "cuda"), _tensors(2, "cuda")
    layer = _layer("cuda")
    _install(layer, t)
    layer.quant_method.finalize(layer, torch.float16)
    bufs = layer._buffers
    assert bufs["qweight"] is bufs["w4_qweight"] and not bufs["qweight"].equal(t["qweight"])  # one copy, tc words
    assert layer.state_dict()["qweight"].equal(t["qweight"])
    x = torch.randn(5, K, device="cuda", dtype=torch.float16)
    ref = gptq_linear(x.double(), t["qweight"], t["qzeros"], t["scales"].double(), t["g_idx"], 4)
    assert (layer(x).double() - ref).abs().max() <= 5e-3 * ref.abs().max()
    layer.quant_method.finalize(layer, torch.float16)  # idempotent: the words are not converted twice
    assert (layer(x).double() - ref).abs().max() <= 5e-3 * ref.abs().max()
    ptr = bufs["qweight"].data_ptr()
    swap(layer, t2)
    assert layer._buffers["qweight"].data_ptr() == ptr and layer._buffers["qweight"] is layer._buffers["w4_qweight"]
    ref2 = gptq_linear(x.double(), t2["qweight"], t2["qzeros"], t2["scales"].double(), t2["g_idx"], 4)
    assert (layer(x).double() - ref2).abs().max() <= 5e-3 * ref2.abs().max()
    assert layer.quant_method.checkpoint_words(layer._buffers).equal(t2["qweight"])

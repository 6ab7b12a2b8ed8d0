"""Layer building blocks: RoPE frequencies vs transformers, RMSNorm vs HF, ParallelLinear's quant_method seam."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_llama_config

from inlaid.model.arch import ModelArch
from inlaid.model.layers import DenseLinearMethod, ParallelLinear, RMSNorm, RotaryEmbedding, rope_inv_freq


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    overrides = dict(rope_theta=500000.0, head_dim=32, hidden_size=128)
    if rope:
        overrides["rope_scaling"] = rope
    cfg_dict = tiny_llama_config(**overrides)
    arch = ModelArch.from_dict(cfg_dict)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"}))
    torch.testing.assert_close(rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling), hf_rope.inv_freq,
                               atol=0, rtol=0)
    positions = torch.tensor([0, 1, 7, 63, 64, 200])
    cos, sin = hf_rope(torch.zeros(1, 1, dtype=torch.float32), positions[None])
    ours = RotaryEmbedding(arch.head_dim, 256, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours.cos_cache[positions], cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sin_cache[positions], sin[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours, ref = RMSNorm(32, 1e-5, dtype=dtype), LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        w = torch.rand(32) + 0.5
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


class DoublingMethod(DenseLinearMethod):
    """Stands in for a quantized method: its own tensor, its own math."""

    def create_weights(self, layer, device, dtype):
        layer.packed = torch.nn.Parameter(torch.ones(layer.out_features, layer.in_features), requires_grad=False)

    def apply(self, layer, x):
        return 2 * torch.nn.functional.linear(x, layer.packed, layer.bias)


def test_parallel_linear_dense_and_swappable_method():
    lin = ParallelLinear(4, 3, bias=True, parallel="row")
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).view(3, 4))
        lin.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.ones(2, 4)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    assert tuple(lin.weight.shape) == (3, 4) and lin.parallel == "row" and lin.tp_size == 1
    swapped = ParallelLinear(4, 3, bias=False, parallel="column", quant_method=DoublingMethod())
    assert not hasattr(swapped, "weight") or swapped.weight is None
    torch.testing.assert_close(swapped(x), torch.full((2, 3), 8.0))
    with pytest.raises(ValueError, match="column"):
        ParallelLinear(4, 3, bias=False, parallel="diagonal")  # type: ignore[arg-type]


class SwiGLUTakingMethod(DenseLinearMethod):
    """A method that ``takes_swiglu``: records what it was handed, computes the product itself."""

    takes_swiglu = True

    def __init__(self) -> None:
        self.got: list = []

    def apply(self, layer, x, swiglu=None):
        self.got.append(swiglu)
        return super().apply(layer, x if swiglu is None else swiglu.materialize(x))


def test_forward_local_hands_swiglu_to_a_method_that_takes_it_and_the_product_to_others():
    """``forward_local(gate, swiglu=SwiGLU(up, out))``: the same result on every method; a method that
    ``takes_swiglu`` gets the ``SwiGLU``, any other (and a wrapped ``apply``, as calibration's taps) the product,
    which also lands in ``out``."""
    from inlaid.kernels.silu_mul import SwiGLU, silu_mul

    torch.manual_seed(0)
    gate, up = torch.randn(3, 4) * 3, torch.randn(3, 4)
    prod = silu_mul(gate, up)
    dense = ParallelLinear(4, 2, bias=True, parallel="row")
    torch.nn.init.normal_(dense.weight)
    want = dense(prod)
    taking = ParallelLinear(4, 2, bias=True, parallel="row", quant_method=SwiGLUTakingMethod())
    taking.load_state_dict(dense.state_dict())
    for lin in (dense, taking):
        out = torch.full_like(gate, float("nan"))
        torch.testing.assert_close(lin.forward_local(gate, swiglu=SwiGLU(up, out)), want)
        assert torch.equal(out, prod)
    assert [type(s).__name__ for s in taking.quant_method.got] == ["SwiGLU"]
    seen = []
    taking.quant_method.apply = lambda layer, x: seen.append(x) or DenseLinearMethod.apply(None, layer, x)
    torch.testing.assert_close(taking.forward_local(gate, swiglu=SwiGLU(up)), want)
    assert len(seen) == 1 and torch.equal(seen[0], prod)

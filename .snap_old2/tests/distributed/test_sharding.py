"""Sharding rules without processes: head/KV/vocab slices, bad sizes, GPTQ shards (incl. act-order) sum to the
full linear, groups straddling a shard boundary are refused, LoRA slices, config plumbing."""

from __future__ import annotations

import pytest
import torch

from inlaid.config import EngineConfig
from inlaid.distributed.sharding import check_tp, local_heads, param_shard, projection_shard, vocab_shard
from inlaid.kernels.gptq_dequant import gptq_linear
from inlaid.lora.pool import _slice_lora
from inlaid.model.arch import ModelArch
from inlaid.quant.linear import shard_gptq_layer
from inlaid.quant.pack import pack
from inlaid.quant.rtn import rtn_quantize
from tiny import tiny_llama_config


def _arch(**kw):
    return ModelArch.from_dict(tiny_llama_config(**kw))


def test_head_and_kv_slices_gqa_and_replication():
    a = _arch(num_attention_heads=4, num_key_value_heads=2)
    assert local_heads(a, 2) == (2, 1)
    assert [projection_shard(a, "k_proj", r, 2).start for r in (0, 1)] == [0, 16]
    a1 = _arch(num_attention_heads=4, num_key_value_heads=1)
    assert local_heads(a1, 2) == (2, 1)
    assert [(s.start, s.size) for s in (projection_shard(a1, "v_proj", r, 2) for r in (0, 1))] == [(0, 16)] * 2
    o = projection_shard(a, "o_proj", 1, 2)
    assert (o.dim, o.start, o.size) == (1, 32, 32)
    v = vocab_shard(383, 1, 2)
    assert (v.start, v.size, v.full) == (192, 192, 383)
    assert param_shard("model.layers.0.self_attn.o_proj.bias", a, 1, 2) is None
    assert param_shard("model.layers.0.input_layernorm.weight", a, 1, 2) is None
    assert param_shard("model.layers.0.mlp.up_proj.weight", a, 0, 1) is None


def test_bad_tp_sizes_name_the_fix():
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_tp(_arch(num_attention_heads=4, num_key_value_heads=2), 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_tp(_arch(num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=120), 2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig.from_kwargs(tensor_parallel_size=0)
    assert EngineConfig.from_kwargs(tensor_parallel_size=2).parallel.tensor_parallel_size == 2


def _sum_of_shards(tensors, shard_of, x_of, bits=4):
    out = 0
    for r in (0, 1):
        t, _ = shard_gptq_layer(tensors, shard_of(r), bits, 32)
        out = out + gptq_linear(x_of(r), t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], bits, None)
    return out


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_row_shards_sum_to_full_linear(act_order):
    from inlaid.distributed.sharding import Shard

    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(5, 128)
    t = pack(rtn_quantize(w, 4, 32, sym=False))
    if act_order:  # any row->group map must shard exactly (groups then span both ranks)
        t["g_idx"] = t["g_idx"][torch.randperm(128)].contiguous()
    full = gptq_linear(x, t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4, None)
    got = _sum_of_shards(t, lambda r: Shard(1, 64 * r, 64, 128), lambda r: x[:, 64 * r : 64 * r + 64])
    assert torch.allclose(got, full, atol=1e-4)
    s1, keep_all = shard_gptq_layer(t, Shard(1, 64, 64, 128), 4, 32)
    assert keep_all == act_order and s1["scales"].shape[0] == (4 if act_order else 2)


def test_gptq_column_shard_and_straddle_error():
    from inlaid.distributed.sharding import Shard

    torch.manual_seed(1)
    w, x = torch.randn(48, 96), torch.randn(3, 96)
    t = pack(rtn_quantize(w, 4, 32, sym=False))
    full = gptq_linear(x, t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4, None)
    s, _ = shard_gptq_layer(t, Shard(0, 24, 24, 48), 4, 32)
    part = gptq_linear(x, s["qweight"], s["qzeros"], s["scales"].float(), s["g_idx"], 4, None)
    assert torch.allclose(part, full[:, 24:], atol=1e-5)
    with pytest.raises(ValueError, match="straddle"):
        shard_gptq_layer(t, Shard(1, 48, 48, 96), 4, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        shard_gptq_layer(t, Shard(0, 20, 28, 48), 4, 32)


def test_lora_slices_follow_the_layer_role():
    from inlaid.distributed.sharding import Shard

    a, b = torch.randn(4, 64), torch.randn(32, 4)
    ca, cb = _slice_lora(a, b, Shard(0, 16, 16, 32))
    assert ca is a and torch.equal(cb, b[16:])
    ra, rb = _slice_lora(torch.randn(4, 64), b, Shard(1, 32, 32, 64))
    assert ra.shape == (4, 32) and rb is b


def test_requant_cut_keeps_all_groups_when_the_served_shard_does():
    """A re-quantized layer swapped into a row shard loaded from an act-order layer (every group kept) is cut the
    same way even when its own g_idx is in order; the shards still sum to the full linear."""
    from inlaid.distributed.requant import cut_linear
    from inlaid.distributed.sharding import Shard

    torch.manual_seed(2)
    w, x = torch.randn(48, 128), torch.randn(4, 128)
    t = pack(rtn_quantize(w, 4, 32, sym=False))
    full = gptq_linear(x, t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"], 4, None)
    got = 0
    for r in (0, 1):
        shard = Shard(1, 64 * r, 64, 128)
        own = cut_linear(t, shard, 4, 32)
        keep = cut_linear(t, shard, 4, 32, keep_all_groups=True)
        assert own["scales"].shape[0] == 2 and keep["scales"].shape[0] == 4 and keep["g_idx"].shape[0] == 64
        assert torch.equal(own["qweight"], keep["qweight"])
        got = got + gptq_linear(x[:, 64 * r : 64 * r + 64], keep["qweight"], keep["qzeros"], keep["scales"].float(),
                                keep["g_idx"], 4, None)
    assert torch.allclose(got, full, atol=1e-4)

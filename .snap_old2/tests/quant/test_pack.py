"""GPTQ layout: bit-exact round trips, agreement with AutoGPTQ's packing loop, checkpoint IO and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inlaid.kernels.gptq_dequant import dequantize_gptq
from inlaid.quant.gptq import gptq_quantize
from inlaid.quant.pack import (
    CheckpointError,
    dequantize,
    load_quantized_checkpoint,
    pack,
    pack_rows,
    quantization_config,
    save_quantized_checkpoint,
    unpack,
)
from inlaid.quant.rtn import rtn_quantize

OUT, IN = 64, 256


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop (qlinear_cuda_old), transcribed: [K, N] codes -> [K*bits/32, N]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_matches_autogptq_loop(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (IN, 32), generator=g, dtype=torch.int32)
    ours = pack_rows(codes, bits)
    ref = torch.from_numpy(autogptq_pack(codes.numpy(), bits))
    assert ours.dtype == torch.int32 and tuple(ours.shape) == (IN * bits // 32, 32)
    assert torch.equal(ours, ref)


def _random_result(bits: int, gs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n_in = 128  # keeps GPTQ fast; every group size still fits
    w = torch.randn(32, n_in, generator=g) * 0.05
    x = torch.randn(96, n_in, generator=g)
    h = 2.0 / 96 * x.t() @ x + 0.1 * torch.eye(n_in)
    return gptq_quantize(w, h, bits, gs, sym=seed % 2 == 0, act_order=True, static_groups=seed % 3 == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 64, 128])
def test_round_trip_bit_exact(bits: int, gs: int) -> None:
    res = _random_result(bits, gs, seed=bits * 7 + gs)
    t = pack(res)
    n_out, n_in = res.qweight.shape
    n_groups = 1 if gs == -1 else n_in // gs
    assert tuple(t["qweight"].shape) == (n_in * bits // 32, n_out) and t["qweight"].dtype == torch.int32
    assert tuple(t["qzeros"].shape) == (n_groups, n_out * bits // 32) and t["qzeros"].dtype == torch.int32
    assert tuple(t["scales"].shape) == (n_groups, n_out) and t["scales"].dtype == torch.float16
    assert tuple(t["g_idx"].shape) == (n_in,) and t["g_idx"].dtype == torch.int32
    codes, scales, zeros, g_idx = unpack(t, bits, gs)
    assert torch.equal(codes, res.qweight)
    assert torch.equal(zeros, res.zeros)
    assert torch.equal(g_idx, res.g_idx)
    assert torch.equal(scales.float(), res.scales)
    # what a reader dequantizes is exactly the weight GPTQ committed to
    assert torch.equal(dequantize(t, bits), res.weight)
    assert torch.equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits), res.weight.t().half())


def test_qzeros_store_zero_minus_one() -> None:
    res = rtn_quantize(torch.randn(OUT, IN), 4, 128, sym=True)
    t = pack(res)
    assert (t["qzeros"] == 0x77777777).all()  # 4-bit symmetric zero 8 stored as 7 in every nibble


def _save(tmp_path, bits=4, gs=32, name="q"):
    res = rtn_quantize(torch.randn(OUT, IN), bits, gs, sym=False)
    layers = {"model.layers.0.mlp.down_proj": pack(res), "model.layers.0.self_attn.q_proj": pack(res)}
    other = {"model.embed_tokens.weight": torch.randn(10, IN).half()}
    qc = quantization_config(bits, gs, sym=False, desc_act=False, static_groups=False)
    out = save_quantized_checkpoint(tmp_path / name, layers, qc, other, {"model_type": "llama"})
    return out, res, layers


def test_checkpoint_round_trip(tmp_path) -> None:
    d, res, layers = _save(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "quantize_config.json"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["checkpoint_format"] == "gptq"
    qc = json.loads((d / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym", "static_groups")} == {
        "bits": 4, "group_size": 32, "desc_act": False, "sym": False, "static_groups": False}  # fmt: skip
    ck = load_quantized_checkpoint(d)
    assert ck.bits == 4 and ck.group_size == 32
    assert sorted(ck.layers) == sorted(layers)
    for name, t in layers.items():
        for k, v in t.items():
            assert torch.equal(ck.layers[name][k], v)
    assert torch.equal(dequantize(ck.layers["model.layers.0.mlp.down_proj"], 4), res.weight)
    assert list(ck.other_tensors) == ["model.embed_tokens.weight"]
    # overwrite in place: still one consistent checkpoint, no temp dirs left behind
    _save(tmp_path, bits=8, gs=64)
    assert load_quantized_checkpoint(d).bits == 8
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_truncated_and_corrupt_files(tmp_path) -> None:
    d, _, _ = _save(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized_checkpoint(d)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized_checkpoint(d)


def test_bad_configs_and_shapes(tmp_path) -> None:
    d, _, layers = _save(tmp_path)
    qc_path = d / "quantize_config.json"
    good = json.loads(qc_path.read_text())
    qc_path.write_text(json.dumps({**good, "bits": 5}))
    with pytest.raises(CheckpointError, match="bits=5"):
        load_quantized_checkpoint(d)
    qc_path.write_text(json.dumps({**good, "checkpoint_format": "gptq_v2"}))
    with pytest.raises(CheckpointError, match="checkpoint_format"):
        load_quantized_checkpoint(d)
    qc_path.write_text(json.dumps({**good, "bits": 8}))  # qweight rows no longer match the declared width
    with pytest.raises(CheckpointError, match="shape"):
        load_quantized_checkpoint(d)
    qc_path.unlink()
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no quantize_config.json"):
        load_quantized_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_quantized_checkpoint(tmp_path / "missing")
    bad = dict(layers["model.layers.0.mlp.down_proj"])
    bad["scales"] = bad["scales"][:, :-1]
    with pytest.raises(CheckpointError, match="scales has shape"):
        save_quantized_checkpoint(tmp_path / "x", {"l": bad}, good, {}, {})
    assert not (tmp_path / "x").exists()


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(32, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="divisible by 32"):
        pack_rows(torch.zeros(16, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_rows(torch.full((8, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="group_size"):
        quantization_config(4, 100, True, False, False)

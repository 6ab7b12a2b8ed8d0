"""Quantize the tiny model for its adapters, then serve it: accuracy, exactness, incremental tasks, swap, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inlaid.config import ModelConfig
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.lora.adapter import load_adapter
from inlaid.model.loader import load_model
from inlaid.quant.calibrate import BLOCK_SIZE, calibrate_task, load_calibration, prefill_batch, single_adapter_pool
from inlaid.quant.hessian import HessianStore
from inlaid.quant.linear import GPTQLinearMethod, dense_reference, swap
from inlaid.quant.pack import CheckpointError
from inlaid.quant.quantize_model import REPORT_NAME, QuantConfig, quantize_model, quantize_weights, requantize_layer

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(scope="module")
def qdirs(tiny_llama_dir, tiny_adapters, tmp_path_factory, write_calib):
    """8-bit and 4-bit MLGPTQ checkpoints of the tiny model for adapters a, b."""
    root = tmp_path_factory.mktemp("quant")
    calib = write_calib(root, ["a", "b"], n=12)
    ads = {n: str(tiny_adapters[n]) for n in ("a", "b")}
    dirs = {}
    for bits, gs in ((8, 32), (4, 32)):
        dirs[bits] = root / f"q{bits}"
        quantize_model(str(tiny_llama_dir), ads, calib, "mlgptq", bits, gs, dirs[bits])
    return dirs


def _logits(model, arch, adapter, tokens):
    pool = single_adapter_pool(adapter, arch, CPU, F32) if adapter else None
    model.set_lora_hook(pool)
    batch, n_blocks = prefill_batch(tokens, CPU, 0 if pool else -1)
    caches = allocate_kv_caches(arch.num_layers, n_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, F32, CPU)
    with torch.no_grad():
        out = model.compute_logits(model(batch, caches))
    model.set_lora_hook(None)
    return out


TOKENS = [[5, 9, 3, 200, 17, 44, 81, 12], [7, 300, 2, 99, 45]]


# the tiny random model (weight std 0.15) amplifies weight error a lot: 4-bit is loose there
@pytest.mark.parametrize("bits, tol", [(8, 0.03), (4, 0.4)])
def test_quantized_logits_close_to_fp_and_exact_vs_dequantized_reference(qdirs, tiny_llama_dir, tiny_adapters,
                                                                          bits, tol):  # fmt: skip
    fp, arch, _ = load_model(ModelConfig(model=str(tiny_llama_dir)), CPU, F32)
    q, qarch, _ = load_model(ModelConfig(model=str(qdirs[bits])), CPU, F32)
    assert dataclasses.replace(qarch, name=arch.name) == arch
    assert isinstance(q.model.layers[1].mlp.down_proj.quant_method, GPTQLinearMethod)
    adapter = load_adapter("b", tiny_adapters["b"])
    ref = _logits(fp, arch, adapter, TOKENS)
    got = _logits(q, qarch, adapter, TOKENS)
    rel = float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())  # relative RMS error
    assert rel < tol, rel
    assert rel > 0  # it really is quantized
    # a dense model holding exactly the dequantized weights computes the same logits, bit for bit
    with torch.no_grad():
        for name, w in dense_reference(q).items():
            mod = fp.get_submodule(name[: -len(".weight")])
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
    assert torch.equal(_logits(fp, arch, adapter, TOKENS), got)


def test_engine_serves_quantized_base_with_adapters(qdirs, tiny_llama_dir, tiny_adapters, tmp_path):
    from inlaid import LLM, SamplingParams

    ads = {n: str(tiny_adapters[n]) for n in ("a", "b", "c")}
    # a dense HF dir whose weights are the dequantized ones: greedy outputs must agree token for token
    dense = tmp_path / "dense"
    shutil.copytree(tiny_llama_dir, dense)
    q, _, _ = load_model(ModelConfig(model=str(qdirs[4])), CPU, F32)
    state = load_file(str(dense / "model.safetensors"))
    state.update({k: v.contiguous() for k, v in dense_reference(q).items()})
    save_file(state, str(dense / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts, which = ["Hello world", "Translate: cat", "Das ist", "0123"], ["a", "b", "c", None]
    outs = []
    for model in (qdirs[4], dense):
        llm = LLM(model=str(model), adapters=ads, device="cpu", num_blocks=64)
        outs.append([o.token_ids for o in llm.generate(prompts, params, adapter=which)])
    assert all(len(t) == 6 for t in outs[0])
    assert outs[0] == outs[1]


def test_adding_a_task_through_the_store_is_bit_identical(tiny_llama_dir, tiny_adapters, tmp_path, write_calib):
    calib = write_calib(tmp_path, ["a", "b", "c"], n=12)
    ads = {n: str(tiny_adapters[n]) for n in ("a", "b", "c")}
    two = tmp_path / "ab"
    quantize_model(str(tiny_llama_dir), {k: ads[k] for k in "ab"}, {k: calib[k] for k in "ab"}, "mlgptq", 4, 32, two)
    fp, arch, _ = load_model(ModelConfig(model=str(tiny_llama_dir)), CPU, F32)
    from transformers import AutoTokenizer

    store = HessianStore(two / "hessians")
    samples = load_calibration(calib["c"], AutoTokenizer.from_pretrained(str(tiny_llama_dir)))
    calibrate_task(fp, arch, "c", samples, load_adapter("c", ads["c"]), store, CPU, F32)
    fp_state = dict(fp.named_parameters())
    added = quantize_weights(fp_state, store, ["a", "b", "c"], "mlgptq", 4, 32)
    three = tmp_path / "abc"
    quantize_model(str(tiny_llama_dir), ads, calib, "mlgptq", 4, 32, three)
    at_once = load_file(str(three / "model.safetensors"))
    flat = {f"{n}.{k}": t for n, d in added.items() for k, t in d.items()}
    assert set(flat) <= set(at_once)
    for key, t in flat.items():
        assert torch.equal(t, at_once[key]), key
    before = load_file(str(two / "model.safetensors"))
    assert any(not torch.equal(before[k], flat[k]) for k in flat if k.endswith("qweight"))
    # per layer, as the background re-quantizer calls it
    qcfg = QuantConfig("mlgptq", 4, 32)
    layer1 = {rel: fp_state[f"model.layers.1.{rel}.weight"] for rel in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    per_layer = requantize_layer(1, layer1, store, ["a", "b", "c"], qcfg)
    for rel, d in per_layer.items():
        for k, t in d.items():
            assert torch.equal(t, at_once[f"model.layers.1.{rel}.{k}"])


def test_swap_replaces_all_tensors_or_nothing(qdirs, tiny_llama_dir):
    q8, _, _ = load_model(ModelConfig(model=str(qdirs[8])), CPU, F32)
    layer = q8.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    other = load_file(str(qdirs[8] / "model.safetensors"))
    new = {k: other[f"model.layers.1.self_attn.q_proj.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    bad = dict(new, scales=new["scales"][:, :-1])
    before = layer(x)
    with pytest.raises(CheckpointError):
        swap(layer, bad)
    assert torch.equal(layer(x), before)
    swap(layer, new)
    expect = layer.quant_method.dequantized(new, F32)
    assert torch.equal(layer(x), x @ expect)
    # the cached-dequantized variant computes the same thing
    layer.quant_method = GPTQLinearMethod(8, 32, cache_dequantized=True)
    swap(layer, new)
    assert layer.dq_weight is not None and torch.equal(layer(x), x @ expect)


def test_bad_quantization_settings():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantConfig(group_size=48)
    with pytest.raises(ValueError, match="method must be one of"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="needs task="):
        QuantConfig(method="gptq-single")


def test_bad_inputs_to_quantize_model(tiny_llama_dir, tiny_adapters, tmp_path, qdirs, write_calib):
    calib = write_calib(tmp_path, ["a"], n=12)
    base = str(tiny_llama_dir)
    with pytest.raises(ValueError, match="no calibration file"):
        quantize_model(base, {"b": str(tiny_adapters["b"])}, calib, "mlgptq", 4, 32, tmp_path / "o1")
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(base, {}, {}, "mlgptq", 4, 32, tmp_path / "o2")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(base, {}, calib, "mlgptq", 4, 96, tmp_path / "o3")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(str(qdirs[4]), {}, calib, "rtn", 4, 32, tmp_path / "o4")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable examples"):
        quantize_model(base, {}, {"a": empty}, "mlgptq", 4, 32, tmp_path / "o5")


def test_rtn_needs_no_calibration(tiny_llama_dir, tmp_path):
    out = tmp_path / "rtn"
    quantize_model(str(tiny_llama_dir), {}, {}, "rtn", 4, 32, out)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["config"]["method"] == "rtn" and report["peak_memory_bytes"] > 0
    assert not (out / "hessians").exists()
    load_model(ModelConfig(model=str(out)), CPU, F32)


def _corrupt(src, dst, how):
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    if how == "truncate":
        st.write_bytes(st.read_bytes()[:1000])
    elif how == "missing":
        tensors = load_file(str(st))
        del tensors["model.layers.0.mlp.up_proj.qzeros"]
        save_file(tensors, str(st))
    elif how == "shape":
        tensors = load_file(str(st))
        tensors["model.norm.weight"] = torch.ones(7)
        save_file(tensors, str(st))
    elif how == "g_idx":  # served forwards skip this check (no host sync): loading must catch it
        tensors = load_file(str(st))
        tensors["model.layers.0.mlp.up_proj.g_idx"][0] = 10_000
        save_file(tensors, str(st))
    elif how == "bits":
        (dst / "quantize_config.json").write_text(json.dumps({"bits": 5, "group_size": 32}))
    return dst


@pytest.mark.parametrize("how, match", [("truncate", "corrupt or truncated"), ("missing", "missing tensors"),
                                        ("shape", "model expects"), ("bits", "bits=5 unsupported"),
                                        ("g_idx", "g_idx values outside")])  # fmt: skip
def test_corrupted_checkpoint_is_a_clear_error(qdirs, tmp_path, how, match):
    bad = _corrupt(qdirs[4], tmp_path / how, how)
    with pytest.raises(CheckpointError, match=match):
        load_model(ModelConfig(model=str(bad)), CPU, F32)


def test_max_aggregate_is_indefinite_and_the_repairs_are_psd(tmp_path):
    from inlaid.quant.quantize_model import aggregate_group

    g = torch.Generator().manual_seed(0)
    store = HessianStore(tmp_path / "h")
    for t in ("a", "b"):
        x = torch.randn(200, 16, generator=g) @ torch.randn(16, 16, generator=g)
        store.write_layer(t, 0, {"qkv": 2 * x.t() @ x / 200}, 200)
    eig = {m: float(torch.linalg.eigvalsh(aggregate_group(store, 0, "qkv", m, ["a", "b"]).double())[0])
           for m in ("mlgptq", "mlgptq-psd", "mlgptq-diag", "gptq-mixed")}  # fmt: skip
    scale = float(torch.diagonal(aggregate_group(store, 0, "qkv", "mlgptq", ["a", "b"])).mean())
    assert eig["mlgptq"] < -1e-3 * scale  # why the repairs exist
    assert all(eig[m] > -1e-5 * scale for m in ("mlgptq-psd", "mlgptq-diag", "gptq-mixed")), eig
    h_a = store.load("a", 0, "qkv")[0]
    assert torch.equal(aggregate_group(store, 0, "qkv", "mlgptq", ["a"]), h_a)
    assert torch.equal(aggregate_group(store, 0, "qkv", "gptq-single", ["a", "b"], task="a"), h_a)


@pytest.mark.parametrize("setting, cached", [("auto", True), ("on", True), ("off", False)])
def test_dequantized_weight_cache_setting_on_cpu(qdirs, setting, cached):
    """CPU has no fused kernels: "auto" keeps GPTQ weights dequantized (same logits as unpacking every step)."""
    model, _, _ = load_model(ModelConfig(model=str(qdirs[4]), gptq_dequant_cache=setting), CPU, F32)
    q = model.model.layers[0].self_attn.q_proj
    assert (q._buffers.get("dq_weight") is not None) == cached
    ref, _, _ = load_model(ModelConfig(model=str(qdirs[4]), gptq_dequant_cache="off"), CPU, F32)
    x = torch.randn(3, q.in_features)
    assert torch.equal(q.forward_local(x), ref.model.layers[0].self_attn.q_proj.forward_local(x))


def test_dequantized_weight_cache_setting_is_validated():
    with pytest.raises(ValueError, match="gptq_dequant_cache"):
        ModelConfig(gptq_dequant_cache="yes")

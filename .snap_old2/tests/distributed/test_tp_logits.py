"""TP=2 (gloo, 2 CPU ranks) prefill logits equal TP=1 for GQA, replicated KV heads, tied embeddings, biases,
an odd vocabulary, and mixed LoRA adapters (column and row layers) in one batch; one spawned session."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from tiny import make_peft_adapter, make_tiny_llama_dir
from tp_helpers import TOKENS, run_two_ranks, tp_logits

from inlaid.distributed.context import TPContext

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_biases(file):
    state = load_file(str(file))
    gen = torch.Generator().manual_seed(9)
    for name, t in state.items():
        if name.endswith(".bias"):
            state[name] = torch.randn(t.shape, generator=gen) * 0.5
    save_file(state, str(file), metadata={"format": "pt"})


def test_tp2_logits_equal_tp1(tiny_llama_dir, tiny_adapters, tmp_path):
    kv1 = make_tiny_llama_dir(tmp_path / "kv1", seed=4, num_key_value_heads=1, tie_word_embeddings=True,
                              vocab_size=383)
    bias = make_tiny_llama_dir(tmp_path / "bias", seed=5, num_key_value_heads=4, attention_bias=True,
                               mlp_bias=True)
    _randomize_biases(bias / "model.safetensors")  # HF initialises them to 0, which would hide bias bugs
    cases = {
        "gqa_kv2": (str(tiny_llama_dir), [str(tiny_adapters[n]) for n in ("a", "b", "c")]),
        "kv1_tied_odd_vocab": (str(kv1), [str(make_peft_adapter(kv1, tmp_path / "kv1_ad", 4, ALL7, seed=6))]),
        "mha_bias": (str(bias), [str(make_peft_adapter(bias, tmp_path / "bias_ad", 8, ALL7, seed=7))]),
    }
    ref = tp_logits(TPContext.single(), cases)
    out = tmp_path / "tp2.pt"
    run_two_ranks(tp_logits, cases, str(out))
    got = torch.load(out)
    for name, logits in ref.items():
        assert got[name].shape == logits.shape == (sum(map(len, TOKENS[: 1 + len(cases[name][1])])),
                                                    logits.shape[1])
        diff = (got[name] - logits).abs().max().item()
        assert diff < 1e-4, f"{name}: max |TP2 - TP1| = {diff}"
    # the adapters matter (else the LoRA half of the check would be vacuous): adapter rows differ from base rows
    base = tp_logits(TPContext.single(), cases, base_only=True)
    n0 = len(TOKENS[0])
    for name in cases:
        assert torch.allclose(base[name][:n0], ref[name][:n0], atol=1e-5)
        assert (base[name][n0:] - ref[name][n0:]).abs().max() > 1e-2, name

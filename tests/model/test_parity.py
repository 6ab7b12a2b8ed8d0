"""Our forward vs transformers on tiny random checkpoints (fp32, atol 1e-4).

Each config is checked on (a) a batched prefill of sequences of different
lengths, (b) step-by-step decode through the paged cache (block_size 4,
shuffled non-contiguous blocks, several sequences at different lengths in one
step), (c) chunked prefill mixed with decodes and a fresh prefill.
Reference: HF logits of each full sequence run alone, at the same positions.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from batching import PagedSequences, make_batch
from tiny import make_tiny_llama_dir

from inlaid.config import ModelConfig
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.model.loader import load_model

BLOCK = 4
ATOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    "llama_gqa": {},
    "llama_mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_biases": dict(attention_bias=True, mlp_bias=True),
    "qwen2_bias": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    "mistral_window": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=6),
}


def _randomize_biases(path):
    """HF initialises biases to 0, which would make bias handling untestable: make them random."""
    file = path / "model.safetensors"
    state = load_file(str(file))
    gen = torch.Generator().manual_seed(1)
    n = 0
    for name, t in state.items():
        if name.endswith(".bias"):
            state[name] = torch.randn(t.shape, generator=gen) * 0.5
            n += 1
    save_file(state, str(file), metadata={"format": "pt"})
    return n


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(our model, HF model, vocab) for one tiny config."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama_dir(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    if "bias" in request.param:
        assert _randomize_biases(path) > 0
    ours, arch, _ = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, ref, arch


def _hf_logits(ref, tokens):
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0].float()


def _caches(arch, num_blocks=48):
    return allocate_kv_caches(arch.num_layers, num_blocks, BLOCK, arch.num_kv_heads, arch.head_dim,
                              torch.float32, "cpu")


def _run(ours, batch, caches):
    with torch.no_grad():
        return ours.compute_logits(ours(batch, caches))


def _seqs(arch, lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(arch.vocab_size) for _ in range(n)] for n in lengths]


def test_batched_prefill(pair):
    ours, ref, arch = pair
    seqs = _seqs(arch, [5, 11, 1, 8], seed=0)
    paged = PagedSequences(48, BLOCK, seed=0)
    batch = make_batch([paged.step_item(i, s) for i, s in enumerate(seqs)], BLOCK)
    logits = _run(ours, batch, _caches(arch))
    expected = torch.cat([_hf_logits(ref, s) for s in seqs])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_decode_through_paged_cache(pair):
    ours, ref, arch = pair
    prompts = _seqs(arch, [3, 7, 2], seed=1)
    continuations = _seqs(arch, [9, 9, 9], seed=2)
    paged, caches = PagedSequences(48, BLOCK, seed=3), _caches(arch)
    batch = make_batch([paged.step_item(i, p) for i, p in enumerate(prompts)], BLOCK)
    got = [[row] for row in _run(ours, batch, caches)[batch.logits_indices]]
    for step in range(9):
        batch = make_batch([paged.step_item(i, [c[step]]) for i, c in enumerate(continuations)], BLOCK)
        assert batch.is_decode_only
        for i, row in enumerate(_run(ours, batch, caches)):
            got[i].append(row)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        expected = _hf_logits(ref, p + c)[len(p) - 1:]
        torch.testing.assert_close(torch.stack(got[i]), expected, atol=ATOL, rtol=0)


def test_chunked_prefill_mixed_with_decode(pair):
    ours, ref, arch = pair
    long_prompt, short, fresh = _seqs(arch, [13, 4, 6], seed=4)
    paged, caches = PagedSequences(48, BLOCK, seed=5), _caches(arch)
    # step 1: first chunk of the long prompt + a short prompt's prefill
    b1 = make_batch([paged.step_item(0, long_prompt[:6]), paged.step_item(1, short)], BLOCK)
    l1 = _run(ours, b1, caches)
    # step 2: rest of the long prompt (chunk) + one decode + a fresh prefill
    extra = _seqs(arch, [1], seed=6)[0]
    b2 = make_batch([paged.step_item(0, long_prompt[6:]), paged.step_item(1, extra),
                     paged.step_item(2, fresh)], BLOCK)
    l2 = _run(ours, b2, caches)
    torch.testing.assert_close(torch.cat([l1[:6], l2[:7]]), _hf_logits(ref, long_prompt), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([l1[6:], l2[7:8]]), _hf_logits(ref, short + extra), atol=ATOL, rtol=0)
    torch.testing.assert_close(l2[8:], _hf_logits(ref, fresh), atol=ATOL, rtol=0)


def test_single_sequence_prefill_takes_the_fresh_path(pair, monkeypatch):
    """One sequence with no cached context: attention runs on the step's own k, v (no paged gather), for every
    layer whose sliding window covers the prompt; the logits still equal HF's. A later chunk of the same
    sequence (context in the cache) goes through the paged path."""
    import inlaid.model.llama as llama

    ours, ref, arch = pair
    calls = []
    real = llama.fresh_prefill_attention
    monkeypatch.setattr(llama, "fresh_prefill_attention", lambda *a: calls.append(1) or real(*a))
    seq = _seqs(arch, [11], seed=7)[0]
    paged, caches = PagedSequences(48, BLOCK, seed=5), _caches(arch)
    logits = _run(ours, make_batch([paged.step_item(0, seq[:8])], BLOCK), caches)
    windows = arch.sliding_windows
    assert len(calls) == sum(w is None or w >= 8 for w in windows)
    torch.testing.assert_close(logits, _hf_logits(ref, seq[:8]), atol=ATOL, rtol=0)
    calls.clear()
    logits = _run(ours, make_batch([paged.step_item(0, seq[8:])], BLOCK), caches)
    assert calls == []
    torch.testing.assert_close(logits, _hf_logits(ref, seq)[8:], atol=ATOL, rtol=0)

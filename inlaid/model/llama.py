"""Our Llama-family forward (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

Owns the module tree (named exactly like Hugging Face's, so checkpoint names
map 1:1: ``model.layers.N.self_attn.q_proj.weight`` ...), the forward over a
``ForwardBatch`` and the weight loading.

Invariants:
- ``forward(batch, kv_caches)`` -> final-normed hidden states [T, hidden] for
  every token of the batch; ``compute_logits(hidden_rows)`` -> fp32 [N, vocab].
- Each layer writes the step's K/V into ``kv_caches[layer]`` (layout of
  ``inlaid.kernels.paged_attention``) before attending, so prefills, chunked
  prefills and decodes mix in one batch.
- With a LoRA hook set, ``hook.prepare(batch)`` runs once per forward and
  ``hook.apply(layer_idx, module, x, out, batch)`` after every one of the seven
  projections (q/k/v/o/gate/up/down are separate modules for that reason).
- Tied embeddings: no ``lm_head`` module; logits use ``embed_tokens.weight``.
- Decode-only fp16/bf16 batches on CUDA attend with the Triton paged decode kernel
  (``inlaid.kernels.paged_attention_triton``); the decode forward then has no
  host sync and no data-dependent shape (CUDA-graph capturable, see
  ``inlaid.worker.cuda_graphs``). Prefill, mixed and fp32 batches use the
  reference (the kernel's tl.dot would run fp32 as TF32).
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import nn

from inlaid.kernels import paged_attention_triton as pat
from inlaid.kernels.paged_attention import paged_attention, write_kv
from inlaid.model.arch import ModelArch
from inlaid.model.batch import ForwardBatch
from inlaid.model.layers import GatedMLP, ParallelLinear, RMSNorm, RotaryEmbedding, apply_rotary
from inlaid.model.lora_hook import LoRAHook

logger = logging.getLogger(__name__)

# checkpoint tensors that carry no weights of ours (old HF checkpoints store rotary buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _project(parent: nn.Module, name: str, layer_idx: int, x: torch.Tensor, batch: ForwardBatch,
             hook: LoRAHook | None) -> torch.Tensor:
    """``parent.<name>(x)`` plus the LoRA deltas of the batch's adapters, if a hook is set."""
    out = getattr(parent, name)(x)
    if hook is not None:
        out = hook.apply(layer_idx, name, x, out, batch)
    return out


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, device: torch.device | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.sliding_window = arch.sliding_windows[layer_idx]
        h = arch.hidden_size
        self.q_proj = ParallelLinear(h, arch.q_size, arch.qkv_bias, "column", device, dtype)
        self.k_proj = ParallelLinear(h, arch.kv_size, arch.qkv_bias, "column", device, dtype)
        self.v_proj = ParallelLinear(h, arch.kv_size, arch.qkv_bias, "column", device, dtype)
        self.o_proj = ParallelLinear(arch.q_size, h, arch.o_bias, "row", device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, hook: LoRAHook | None) -> torch.Tensor:
        t = x.shape[0]
        q = _project(self, "q_proj", self.layer_idx, x, batch, hook).view(t, self.num_heads, self.head_dim)
        k = _project(self, "k_proj", self.layer_idx, x, batch, hook).view(t, self.num_kv_heads, self.head_dim)
        v = _project(self, "v_proj", self.layer_idx, x, batch, hook).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(k, v, kv_cache, batch.slot_mapping)
        if batch.is_decode_only and q.is_cuda and pat.HAS_TRITON and q.dtype != torch.float32:  # no sync, graph-safe
            attn = pat.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, batch.max_seq_len,
                                              self.scale, sliding_window=self.sliding_window)
        else:
            attn = paged_attention(
                q, kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                batch.max_query_len, batch.max_seq_len, self.scale, sliding_window=self.sliding_window,
            )
        return _project(self, "o_proj", self.layer_idx, attn.reshape(t, -1), batch, hook)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, device: torch.device | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(arch, layer_idx, device, dtype)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias, device, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, hook: LoRAHook | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, batch, hook)
        h = self.post_attention_layernorm(x)
        if hook is None:
            return x + self.mlp(h)
        gate = _project(self.mlp, "gate_proj", self.layer_idx, h, batch, hook)
        up = _project(self.mlp, "up_proj", self.layer_idx, h, batch, hook)
        inner = nn.functional.silu(gate) * up
        return x + _project(self.mlp, "down_proj", self.layer_idx, inner, batch, hook)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, device: torch.device | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, device, dtype) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, device)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor], hook: LoRAHook | None) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.layers)}), got {len(kv_caches)}")
        x = self.embed_tokens(batch.input_ids)
        cos, sin = self.rotary_emb.cos_sin(batch.positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, batch, hook)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The causal LM: ``forward`` -> hidden [T, hidden]; ``compute_logits`` -> fp32 logits."""

    def __init__(self, arch: ModelArch, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 lora_hook: LoRAHook | None = None, max_positions: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, max_positions or arch.max_position_embeddings, device, dtype)
        self.lm_head = (None if arch.tie_word_embeddings
                        else ParallelLinear(arch.hidden_size, arch.vocab_size, False, "column", device, dtype))
        self.lora_hook = lora_hook

    def set_lora_hook(self, hook: LoRAHook | None) -> None:
        """Attach (or detach with None) the LoRA pool called after every projection."""
        self.lora_hook = hook

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        hook = self.lora_hook
        if hook is not None:
            hook.prepare(batch)
        return self.model(batch, kv_caches, hook)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in fp32 for hidden rows [N, hidden] (select rows first)."""
        if self.lm_head is None:
            return nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     targets: Mapping[str, torch.Tensor] | None = None) -> None:
        """Copy HF-named tensors into ``targets`` (default: the parameters; a quantized model adds its
        GPTQ buffers); ValueError on missing/unexpected/misshaped ones."""
        params = dict(targets) if targets is not None else dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.lm_head is None and name == "lm_head.weight"):
                continue
            param = params.get(name)
            if param is None:
                unexpected.append(name)
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name}: the checkpoint has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(param.shape)} (does config.json match the weights?)")
            param.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if unexpected or missing:
            raise ValueError(f"checkpoint does not match {self.arch.architecture}: "
                             f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        logger.info("loaded %d tensors into %s", len(loaded), self.arch.name)

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
  projections (q/k/v/o/gate/up/down are separate modules for that reason); q/k/v
  and gate/up, which read the same x, reach it through one ``hook.apply_group``.
- Tied embeddings: no ``lm_head`` module; logits use ``embed_tokens.weight``.
- Tensor parallelism (``tp`` with world > 1, layout in ``inlaid.distributed.sharding``):
  each rank holds its heads, its KV heads (KV cache sharded the same way),
  its MLP columns and its vocab rows. Collectives per decoder layer: one
  all-reduce after o_proj and one after down_proj (LoRA deltas of row layers are
  added to the partial sums before it); plus one all-reduce after the embedding
  and one all-gather of the logits (every rank gets the full fp32 logits).
  ``load_weights`` accepts full (unsharded) tensors and slices them, or
  tensors already sliced by the loader.
- The residual stream is carried as ``(h, residual)`` between layers (vLLM's form): each residual add is
  fused into the following RMSNorm (``inlaid.kernels.rms_norm``), the last one into ``model.norm``.
  ``DecoderLayer`` called plainly (calibration) still maps a hidden state to the next one. On CUDA
  fp16/bf16 the norms, SwiGLU's ``silu * up`` and RoPE + KV write are fused Triton kernels; CPU and fp32
  run the torch references (the previous code, same bits). SwiGLU's product reaches down_proj as ``SwiGLU``
  (gate, up): a W4 launch at M = 1 computes it as it loads its input (no ``silu_mul`` launch), every other path
  runs ``silu_mul`` first; same bits either way.
- Decode-only fp16/bf16 batches on CUDA attend with the Triton paged decode kernel
  (``inlaid.kernels.paged_attention_triton``); where that launch has few programs (small batches,
  ``rope_pays``) it also does the step's RoPE and K/V write (``DecodeRope``: one launch instead of two, same
  cache bits). The decode forward has no
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
from inlaid.kernels import rotary_kv
from inlaid.kernels.paged_attention import attention_layout, fresh_prefill_attention, paged_attention
from inlaid.model.arch import ModelArch
from inlaid.model.batch import ForwardBatch
from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import Shard, check_tp, local_heads, param_shard, vocab_shard
from inlaid.kernels.silu_mul import SwiGLU
from inlaid.kernels.w4a16_gemv import PendingSums
from inlaid.model.layers import (
    GatedMLP,
    ParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabParallelEmbedding,
    forward_group,
    wants_x_half,
)
from inlaid.model.lora_hook import LoRAHook

logger = logging.getLogger(__name__)

# checkpoint tensors that carry no weights of ours (old HF checkpoints store rotary buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _project(parent: nn.Module, name: str, layer_idx: int, x: torch.Tensor, batch: ForwardBatch,
             hook: LoRAHook | None, up: torch.Tensor | None = None,
             defer_cast: bool = False) -> torch.Tensor | PendingSums:
    """``parent.<name>(x)`` plus the LoRA deltas of the batch's adapters, if a hook is set.

    With ``up`` the input is ``silu(x) * up`` (SwiGLU's down_proj): the base launch may compute it as it loads x
    (``SwiGLU``); with a hook it also stores it, for the hook's own shrink where the launch did not take the offer.
    Under TP a row layer's deltas (from this rank's slice of x) join its partial sum before the one all-reduce.
    ``defer_cast`` (o_proj, down_proj: the caller hands the result to an RMSNorm with a residual): the result
    may be the base launch's uncast ``PendingSums``, where the hook takes them (``takes_pending_sums``).
    """
    layer: ParallelLinear = getattr(parent, name)
    swiglu, h = None, x
    if up is not None:  # x is the gate
        swiglu = SwiGLU(up, None if hook is None else torch.empty(x.shape, device=x.device, dtype=x.dtype))
        h = swiglu.out  # the hook's input: the product, once the launch has written it
    offer = getattr(hook, "offer_shrink", None)  # optional (lora_hook): the base launch may run the LoRA shrink
    defer_cast = defer_cast and (hook is None or getattr(hook, "takes_pending_sums", False))
    out = layer.forward_local(x, None if offer is None else offer(layer_idx, (name,), h, batch), swiglu,
                              defer_cast=defer_cast)
    if hook is not None:
        out = hook.apply(layer_idx, name, h, out, batch)
    return layer.reduce(out)


def _project_group(parent: nn.Module, names: tuple[str, ...], layer_idx: int, x: torch.Tensor, batch: ForwardBatch,
                   hook: LoRAHook | None, x_half: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``_project`` for sibling projections of the same ``x`` (q/k/v, gate/up): the base through
    ``layers.forward_group`` (which may read ``x_half``, x's fp16 copy from the norm) and one ``hook.apply_group``
    call, so both can batch their kernels."""
    layers: list[ParallelLinear] = [getattr(parent, n) for n in names]
    offer = getattr(hook, "offer_shrink", None)  # optional (lora_hook): the base launch may run the LoRA shrink
    outs = forward_group(layers, x, None if offer is None else offer(layer_idx, names, x, batch), x_half)
    if hook is not None:
        outs = hook.apply_group(layer_idx, names, x, outs, batch)
    return [layer.reduce(out) for layer, out in zip(layers, outs)]


def _layout(batch: ForwardBatch, num_tokens: int, window: int | None):  # noqa: ANN202
    """The batch's attention layout for ``window``, built by the first layer that asks (cached on the batch)."""
    if batch.attn_meta is None:
        batch.attn_meta = {}
    layout = batch.attn_meta.get(window)
    if layout is None:
        layout = attention_layout(batch.query_start_loc, batch.seq_lens, num_tokens, batch.max_query_len,
                                  batch.max_seq_len, window)
        batch.attn_meta[window] = layout
    return layout


def _fresh_single_sequence(batch: ForwardBatch, num_tokens: int, window: int | None) -> bool:
    """One sequence whose step holds all its tokens (no cached context), so causal attention over the step's own
    k and v is the whole attention (host-side ints only: no device read-back)."""
    return (num_tokens > 1 and batch.num_seqs == 1 and batch.max_seq_len == num_tokens
            and (window is None or num_tokens <= window))


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, device: torch.device | None, dtype: torch.dtype | None,
                 tp: TPContext | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        world = tp.world_size if tp is not None else 1
        (self.num_heads, self.num_kv_heads), self.head_dim = local_heads(arch, world), arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.sliding_window = arch.sliding_windows[layer_idx]
        h, q, kv = arch.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = ParallelLinear(h, q, arch.qkv_bias, "column", device, dtype, tp=tp)
        self.k_proj = ParallelLinear(h, kv, arch.qkv_bias, "column", device, dtype, tp=tp)
        self.v_proj = ParallelLinear(h, kv, arch.qkv_bias, "column", device, dtype, tp=tp)
        self.o_proj = ParallelLinear(q, h, arch.o_bias, "row", device, dtype, tp=tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, hook: LoRAHook | None,
                x_half: torch.Tensor | None = None) -> torch.Tensor | PendingSums:
        """The attention block's output: o_proj's, possibly uncast (``PendingSums``: the caller's norm finishes
        them). ``x_half``: x's fp16 copy x * 2**-7 for q/k/v (``layers.wants_x_half``)."""
        t = x.shape[0]
        q, k, v = _project_group(self, ("q_proj", "k_proj", "v_proj"), self.layer_idx, x, batch, hook, x_half)
        q = q.view(t, self.num_heads, self.head_dim)
        k, v = k.view(t, self.num_kv_heads, self.head_dim), v.view(t, self.num_kv_heads, self.head_dim)
        if batch.is_decode_only and q.is_cuda and pat.HAS_TRITON and q.dtype != torch.float32:  # no sync, graph-safe
            rope = None
            if rotary_kv.fused_ok(q, kv_cache) and pat.rope_pays(t, self.num_kv_heads):
                # RoPE and the KV write run inside the attention launch
                rope = pat.DecodeRope(k, v, cos, sin, batch.slot_mapping)
            else:
                q, k = rotary_kv.rotary_and_write_kv(q, k, v, cos, sin, kv_cache, batch.slot_mapping)
            attn = pat.paged_decode_attention(q, kv_cache, batch.block_tables, batch.seq_lens, batch.max_seq_len,
                                              self.scale, sliding_window=self.sliding_window, rope=rope)
            return _project(self, "o_proj", self.layer_idx, attn.reshape(t, -1), batch, hook, defer_cast=True)
        # RoPE on q and k, k_rot and v into the cache (one kernel on CUDA fp16/bf16, the torch reference otherwise)
        q, k = rotary_kv.rotary_and_write_kv(q, k, v, cos, sin, kv_cache, batch.slot_mapping)
        if _fresh_single_sequence(batch, t, self.sliding_window):  # its K/V are this step's k, v: no gather
            attn = fresh_prefill_attention(q, k, v, self.scale)
        else:
            attn = paged_attention(
                q, kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                batch.max_query_len, batch.max_seq_len, self.scale, sliding_window=self.sliding_window,
                layout=_layout(batch, t, self.sliding_window),
            )
        return _project(self, "o_proj", self.layer_idx, attn.reshape(t, -1), batch, hook, defer_cast=True)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, device: torch.device | None, dtype: torch.dtype | None,
                 tp: TPContext | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        world = tp.world_size if tp is not None else 1
        self.self_attn = Attention(arch, layer_idx, device, dtype, tp)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size // world, arch.mlp_bias, device, dtype, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch, hook: LoRAHook | None, residual: torch.Tensor | None = None,
                return_residual: bool = False, x_half: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One pre-norm layer. Plain call: ``x`` is the hidden state, returns the next one.

        Fused residual (``LlamaModel``): ``x + residual`` is the hidden state (``residual`` None: ``x`` alone);
        with ``return_residual`` it returns ``(mlp_out, residual)`` whose sum is the next hidden state, so
        each residual add happens inside the next RMSNorm kernel. Both give the same bits.

        ``x_half`` (fp16, x's shape; ``LlamaModel`` passes one where ``layers.wants_x_half``): both norms also write
        their output * 2**-7 into it, which the q/k/v and gate/up W4 launches read as pairs. One buffer serves
        every norm: in stream order a launch has read it before the next norm writes it.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x, x_half=x_half)
        else:
            h, residual = self.input_layernorm(x, residual, x_half)
        h = self.self_attn(h, cos, sin, kv_cache, batch, hook, x_half)  # o_proj's result may be PendingSums: the
        h, residual = self.post_attention_layernorm(h, residual, x_half)  # norm finishes them
        out = self._mlp(h, batch, hook, return_residual, x_half)  # the next norm finishes down_proj's sums
        return (out, residual) if return_residual else residual + out

    def _mlp(self, h: torch.Tensor, batch: ForwardBatch, hook: LoRAHook | None, defer_cast: bool = False,
             x_half: torch.Tensor | None = None) -> torch.Tensor | PendingSums:
        if hook is None:
            return self.mlp(h, defer_cast, x_half)
        gate, up = _project_group(self.mlp, ("gate_proj", "up_proj"), self.layer_idx, h, batch, hook, x_half)
        return _project(self.mlp, "down_proj", self.layer_idx, gate, batch, hook, up=up, defer_cast=defer_cast)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, device: torch.device | None,
                 dtype: torch.dtype | None, tp: TPContext | None = None) -> None:
        super().__init__()
        if tp is not None and tp.world_size > 1:
            vs = vocab_shard(arch.vocab_size, tp.rank, tp.world_size)
            self.embed_tokens: nn.Embedding = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, vs.start,
                                                                     vs.size, tp, device, dtype)
        else:
            self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, device=device, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, device, dtype, tp) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device, dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, device)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor], hook: LoRAHook | None) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.layers)}), got {len(kv_caches)}")
        x = self.embed_tokens(batch.input_ids)
        cos, sin = self.rotary_emb.cos_sin(batch.positions, x.dtype)
        residual: torch.Tensor | None = None
        half = (torch.empty(x.shape, device=x.device, dtype=torch.float16)  # the norms' fp16 copy of a bf16 row
                if self.layers and wants_x_half(self.layers[0].self_attn.q_proj, x) else None)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, cos, sin, kv_cache, batch, hook, residual, return_residual=True, x_half=half)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The causal LM: ``forward`` -> hidden [T, hidden]; ``compute_logits`` -> fp32 logits."""

    def __init__(self, arch: ModelArch, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 lora_hook: LoRAHook | None = None, max_positions: int | None = None,
                 tp: TPContext | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.tp = tp if tp is not None else TPContext.single()
        check_tp(arch, self.tp.world_size)
        rows = vocab_shard(arch.vocab_size, self.tp.rank, self.tp.world_size).size
        self.model = LlamaModel(arch, max_positions or arch.max_position_embeddings, device, dtype, tp)
        self.lm_head = (None if arch.tie_word_embeddings
                        else ParallelLinear(arch.hidden_size, rows, False, "column", device, dtype, tp=tp))
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
        """Logits [N, vocab] in fp32 for hidden rows [N, hidden] (select rows first); under TP every rank
        computes its vocab rows and one all-gather assembles the full row."""
        if self.lm_head is None:
            local = nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            local = self.lm_head(hidden)
        return self.tp.all_gather_last(local.float(), self.arch.vocab_size)

    def shard_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of checkpoint tensor ``name`` (unchanged at world 1 or when already sliced)."""
        tp = self.tp
        if tp.world_size == 1:
            return tensor
        shard = param_shard(name, self.arch, tp.rank, tp.world_size)
        if shard is None:
            if name.endswith(".bias") and name.split(".")[-2] in ("o_proj", "down_proj") and tp.rank > 0:
                return torch.zeros_like(tensor)  # row-parallel bias: added once, by rank 0
            return tensor
        return slice_shard(tensor, shard)

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
            tensor = self.shard_tensor(name, tensor)
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


def slice_shard(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``tensor``'s slice ``shard``: narrowed if it has the full extent, then zero-padded to ``shard.size``
    (the last vocab rank); a tensor the loader already sliced is only padded."""
    if tensor.shape[shard.dim] == shard.full and not shard.is_whole:
        tensor = tensor.narrow(shard.dim, shard.start, max(0, min(shard.size, shard.full - shard.start)))
    short = shard.size - tensor.shape[shard.dim]
    if short <= 0:
        return tensor
    pad = list(tensor.shape)
    pad[shard.dim] = short
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=shard.dim)

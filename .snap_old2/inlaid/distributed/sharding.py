"""Which slice of each weight a tensor-parallel rank holds (shape math only; imports no torch).

Layout (vLLM / Megatron style), for ``world`` ranks and rank ``r``:

- column-parallel q/k/v/gate/up: the output dim is split; rank r holds rows
  ``[start, start+size)`` of ``W [out, in]`` (and of the bias);
- row-parallel o/down: the input dim is split (columns of ``W``); the partial
  outputs are summed by one all-reduce; a bias is added once (rank 0 holds it,
  other ranks hold zeros);
- attention heads: rank r holds query heads ``[r*H/w, (r+1)*H/w)``; KV heads are
  split when ``kv_heads % world == 0``, else (``world % kv_heads == 0``) each KV
  head is replicated on ``world/kv_heads`` consecutive ranks, so the query heads of
  a rank always find their KV head locally (GQA);
- vocab-parallel embedding / LM head: rows ``[r*P, (r+1)*P)`` with
  ``P = ceil(V/w)``; the last rank's tail past V is zero padding.

Invariant: with world 1 every slice is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from inlaid.model.arch import ModelArch

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shard:
    """A contiguous slice ``[start, start+size)`` of dimension ``dim`` of a tensor whose full extent is ``full``."""

    dim: int
    start: int
    size: int
    full: int

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.full


def check_tp(arch: ModelArch, world: int) -> None:
    """ValueError naming the fix when ``arch`` cannot be split over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world}")
    problems = []
    if arch.num_heads % world:
        problems.append(f"num_attention_heads ({arch.num_heads}) is not divisible by it")
    kv = arch.num_kv_heads
    if kv % world and world % kv:
        problems.append(f"num_key_value_heads ({kv}) neither divides nor is divisible by it")
    if arch.intermediate_size % world:
        problems.append(f"intermediate_size ({arch.intermediate_size}) is not divisible by it")
    if problems:
        raise ValueError(f"tensor_parallel_size={world} does not fit {arch.name}: " + "; ".join(problems)
                         + ". Choose a size that divides the head and MLP counts.")


def local_heads(arch: ModelArch, world: int) -> tuple[int, int]:
    """(query heads, KV heads) held by each rank."""
    return arch.num_heads // world, max(1, arch.num_kv_heads // world)


def _kv_head_start(arch: ModelArch, rank: int, world: int) -> int:
    if arch.num_kv_heads >= world:
        return rank * (arch.num_kv_heads // world)
    return rank // (world // arch.num_kv_heads)  # replicated KV heads


def projection_shard(arch: ModelArch, module: str, rank: int, world: int) -> Shard:
    """The slice of projection ``module``'s weight ``[out, in]`` held by ``rank`` (dim 0: out, dim 1: in)."""
    hd = arch.head_dim
    q_local, kv_local = local_heads(arch, world)
    inter = arch.intermediate_size // world
    if module == "q_proj":
        return Shard(0, rank * q_local * hd, q_local * hd, arch.q_size)
    if module in ("k_proj", "v_proj"):
        return Shard(0, _kv_head_start(arch, rank, world) * hd, kv_local * hd, arch.kv_size)
    if module in ("gate_proj", "up_proj"):
        return Shard(0, rank * inter, inter, arch.intermediate_size)
    if module == "o_proj":
        return Shard(1, rank * q_local * hd, q_local * hd, arch.q_size)
    if module == "down_proj":
        return Shard(1, rank * inter, inter, arch.intermediate_size)
    raise ValueError(f"unknown projection {module!r}")


def vocab_shard(vocab_size: int, rank: int, world: int) -> Shard:
    """Rows of the embedding / LM head on ``rank``: ``size`` is the padded per-rank count ceil(V/world)."""
    per = -(-vocab_size // world)
    return Shard(0, rank * per, per, vocab_size)


def param_shard(name: str, arch: ModelArch, rank: int, world: int) -> Shard | None:
    """The shard of HF-named dense tensor ``name`` on ``rank``; None when it is replicated whole."""
    if world == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return vocab_shard(arch.vocab_size, rank, world)
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in COLUMN_MODULES + ROW_MODULES:
        return None  # norms, rotary buffers: replicated
    if parts[-1] not in ("weight", "bias"):
        return None  # GPTQ buffers (qweight, ...) are sliced by inlaid.quant.linear.shard_gptq_layer
    shard = projection_shard(arch, parts[-2], rank, world)
    if parts[-1] == "bias":
        return shard if shard.dim == 0 else None  # row-parallel bias: whole (rank 0) / zeros (others)
    return shard


def lora_shards(arch: ModelArch, rank: int, world: int) -> dict[str, Shard]:
    """Per LoRA module, the slice of the projection held here (column: B rows split; row: A columns split)."""
    return {m: projection_shard(arch, m, rank, world) for m in COLUMN_MODULES + ROW_MODULES}

"""Helpers of the tensor-parallel tests: run a function as rank 0 here and rank 1 in a spawned process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from inlaid import LLM, SamplingParams
from inlaid.config import ModelConfig
from inlaid.distributed.context import TPContext, destroy_tp, init_tp
from inlaid.distributed.sharding import local_heads, lora_shards
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.lora.adapter import load_adapter
from inlaid.lora.pool import LoRAPool
from inlaid.model.loader import load_model
from inlaid.quant.calibrate import BLOCK_SIZE, prefill_batch

CPU = torch.device("cpu")
TOKENS = [[5, 9, 3, 200, 17, 44, 81, 12], [7, 300, 2, 99, 45], [11, 12, 13, 14, 15, 16], [380, 1, 250]]


def _rank_entry(rank: int, world: int, init_method: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    ctx = init_tp(rank, world, "gloo", init_method, 60.0, CPU)
    try:
        fn(ctx, *args)
    finally:
        destroy_tp(ctx)


def run_two_ranks(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(ctx, *args)`` on rank 1 (spawned) and rank 0 (this process) of a 2-rank gloo group."""
    store = Path(tempfile.mkdtemp(prefix="tp-test-")) / "store"
    init_method = "file://" + str(store)
    proc = torch.multiprocessing.get_context("spawn").Process(target=_rank_entry,
                                                              args=(1, 2, init_method, fn, args), daemon=True)
    proc.start()
    try:
        _rank_entry(0, 2, init_method, fn, args)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    assert proc.exitcode == 0, f"rank 1 exited with {proc.exitcode}"


def tp_logits(ctx: TPContext, cases: dict[str, tuple[str, list[str]]], out: str | None = None,
              base_only: bool = False) -> dict[str, Any]:
    """Prefill logits of ``TOKENS`` (sequence 0 base, sequence i+1 with adapter i; all base with ``base_only``)
    for every case's model dir."""
    world = ctx.world_size
    results = {}
    for name, (model_dir, adapters) in cases.items():
        model, arch, _ = load_model(ModelConfig(model=model_dir), CPU, torch.float32, tp=ctx)
        shards = lora_shards(arch, ctx.rank, world) if world > 1 else None
        pool = LoRAPool(3, 8, arch.num_layers, arch.lora_module_shapes(), CPU, torch.float32, shards=shards)
        for slot, path in enumerate(adapters):
            pool.load(slot, load_adapter(f"ad{slot}", path))
        model.set_lora_hook(pool)
        tokens = TOKENS[: 1 + len(adapters)]
        batch, n_blocks = prefill_batch(tokens, CPU, -1)
        batch.lora_slots = torch.cat([torch.full((len(t),), -1 if base_only else i - 1, dtype=torch.int64) for i, t in enumerate(tokens)])
        caches = allocate_kv_caches(arch.num_layers, n_blocks, BLOCK_SIZE, local_heads(arch, world)[1],
                                    arch.head_dim, torch.float32, CPU)
        with torch.no_grad():
            results[name] = model.compute_logits(model(batch, caches))
    if out is not None and ctx.rank == 0:
        torch.save(results, out)
    return results


PROMPTS = ["Hello world", "Translate: cat -> chat.", "def return import", "Das ist ein Test.", "0123456789 + -"]
ADAPTERS = [None, "a", "b", "c", "b"]
OPTS: dict[str, Any] = dict(device="cpu", num_blocks=64, max_num_seqs=8, max_loras=2)
"""Two slots for three adapters: steps load and evict slots, so slot loads are broadcast more than once."""


def generate_tp(model: str, adapters: dict[str, str], tp: int) -> tuple[list[list[int]], LLM]:
    """Greedy token ids of ``PROMPTS`` (mixed adapters and base in one batch) and the LLM (shut it down)."""
    llm = LLM(model=model, adapters=adapters, tensor_parallel_size=tp, **OPTS)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), adapter=ADAPTERS)
    return [o.token_ids for o in outs], llm

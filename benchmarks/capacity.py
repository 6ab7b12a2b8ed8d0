"""Adapter capacity (issue 9): how many device adapter slots a W4 vs an fp16 base holds in one memory budget.

Accounting (no GPU needed): the model is built on the ``meta`` device (fp16 dense, or W4 g128 via
``replace_linears``) and its parameter/buffer bytes summed. The W4A16 kernels' prepared tensors (``w4_*``)
share storage with qweight/qzeros/scales when g_idx is trivial (no act-order, as here); with
``--act-order`` a row-sorted qweight copy and an int64 permutation are counted too. One adapter slot is what ``LoRAPool`` allocates per
slot: A [rank, in] and B [out, rank] for all 7 projections of every layer at ``--rank``. Then

    max adapters = floor((budget - weights - KV reserve - workspace reserve) / slot bytes)

with a KV reserve of ``--kv-tokens`` tokens (``kv_bytes_per_block``) and ``--reserve-gb`` for
activations/CUDA graphs. Verification (``--verify``, CUDA): with
``torch.cuda.set_per_process_memory_fraction(budget / total)`` the real engine is built at N = max
adapters slots (``--num-blocks`` = the KV reserve) and serves a few requests through an adapter (prefill
+ decode, so graphs and activations are allocated), then at N + step slots (step = the slots the workspace
reserve could hide, + 1), which must fail with an error, not kill the process. Output: ``capacity.json``.

    python3 benchmarks/capacity.py --verify --out benchmarks/results/serving     # GPU
    python3 benchmarks/capacity.py --out /tmp/cap                                # accounting only (CPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inlaid.model.arch import ModelArch
from inlaid.model.llama import LlamaForCausalLM
from inlaid.model.loader import resolve_model_path
from inlaid.worker.model_runner import kv_bytes_per_block

logger = logging.getLogger("capacity")
GB = 1024**3


def weight_bytes(arch: ModelArch, quant: str, group_size: int = 128, act_order: bool = False) -> int:
    """Device bytes of the base model's weights (fp16 dense, or W4 GPTQ projections + dense rest)."""
    from inlaid.quant.linear import GPTQLinearMethod, replace_linears

    meta = torch.device("meta")
    model = LlamaForCausalLM(arch, device=meta, dtype=torch.float16)
    if quant == "w4":
        replace_linears(model, GPTQLinearMethod(4, group_size), meta, torch.float16)
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or "rotary" in name:  # the RoPE cos/sin cache (a few MB) is left out
            continue
        n = t.numel() * t.element_size()
        total += n
        if quant == "w4" and act_order and name.endswith("qweight"):
            total += n + t.shape[0] * 8 * 8  # the row-sorted w4_qweight copy + int64 w4_perm
    return total


def slot_bytes(arch: ModelArch, rank: int, elem: int = 2) -> int:
    """``LoRAPool`` bytes per slot: A [rank, in] + B [out, rank] per projection per layer (+ fp32 scalings)."""
    shapes = arch.lora_module_shapes()
    return arch.num_layers * (rank * sum(i + o for i, o in shapes.values()) * elem + 4 * len(shapes))


def account(arch: ModelArch, quant: str, budget_gb: float, rank: int, kv_tokens: int, reserve_gb: float,
            act_order: bool = False, block_size: int = 16) -> dict[str, Any]:
    """The accounting row of one (quant, budget)."""
    w = weight_bytes(arch, quant, act_order=act_order)
    blocks = math.ceil(kv_tokens / block_size)
    kv = blocks * kv_bytes_per_block(arch, block_size, torch.float16)
    s = slot_bytes(arch, rank)
    free = budget_gb * GB - w - kv - reserve_gb * GB
    return {"model": arch.name, "quant": quant, "budget_gb": budget_gb, "weights_gb": w / GB, "slot_mb": s / 2**20,
            "kv_gb": kv / GB, "kv_blocks": blocks, "reserve_gb": reserve_gb, "rank": rank,
            "max_adapters": max(int(free // s), 0),
            "kv_blocks_at_32_slots": max(int((budget_gb * GB - w - 32 * s - reserve_gb * GB)
                                             // kv_bytes_per_block(arch, block_size, torch.float16)), 0)}


def _try_engine(model: str, quant: str, slots: int, blocks: int, rank: int, device: str = "cuda") -> dict[str, Any]:
    """Build the engine with ``slots`` slots and serve 4 requests through one adapter; outcome + peak memory."""
    from inlaid.bench.policy_sweep import EngineSpec, build_engine
    from inlaid.config import SchedulerConfig
    from inlaid.sampling import SamplingParams

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eng, t0 = None, time.perf_counter()
    try:
        eng = build_engine(EngineSpec(model, quant, device, slots, blocks, 1, (rank,), ("q_proj", "v_proj"), 1,
                                      SchedulerConfig(max_num_seqs=64, max_queue_len=1000)))
        for i in range(4):
            eng.add_request(f"c{i}", list(range(3, 3 + min(256, eng.max_model_len // 2))), SamplingParams(max_tokens=8, ignore_eos=True), "t0")
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished and o.error:
                    raise RuntimeError(f"request failed: {o.error}")
        peak = torch.cuda.max_memory_allocated() / GB if cuda else None
        return {"ok": True, "peak_gb": peak, "s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001  (the outcome is the measurement)
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return {"ok": False, "error": f"{type(exc).__name__}: {msg}", "s": time.perf_counter() - t0}
    finally:
        eng = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def verify(row: dict[str, Any], model: str) -> None:
    """Build at N and N + step under the budget (memory fraction); fills verified/peak_gb/fail_error."""
    n = row["max_adapters"]
    step = int(row["reserve_gb"] * 1024 // row["slot_mb"]) + 1
    if n < 1:
        row["verified"] = "N < 1: nothing to build"
        return
    at_n = _try_engine(model, row["quant"], n, row["kv_blocks"], row["rank"])
    row["verified"] = n if at_n["ok"] else f"FAILED at {n}: {at_n['error']}"
    row["peak_gb"] = at_n.get("peak_gb")
    over = _try_engine(model, row["quant"], n + step, row["kv_blocks"], row["rank"])
    row["step"] = step
    row["fail_error"] = (f"N+{step}: {over['error']}" if not over["ok"]
                         else f"N+{step} did NOT fail (peak {over['peak_gb']:.1f} GB): accounting is conservative")
    logger.info("%s %s: N=%d -> %s; N+%d -> %s", row["model"], row["quant"], n, row["verified"], step,
                row["fail_error"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-13b-shapes")
    p.add_argument("--budget-gb", type=float, nargs="+", default=[40.0], help="memory budgets that are verified")
    p.add_argument("--table-budgets", type=float, nargs="*", default=[24, 32, 40, 48, 64, 80],
                   help="budgets for the accounting-only table")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV cache reserve in tokens")
    p.add_argument("--reserve-gb", type=float, default=1.0, help="activations / CUDA-graph workspace reserve")
    p.add_argument("--act-order", action="store_true", help="count the W4A16 kernels' act-order copy (accounting)")
    p.add_argument("--verify", action="store_true", help="build the engines on CUDA under the budget")
    p.add_argument("--out", type=Path, required=True, help="directory for capacity.json")
    a = p.parse_args(argv)
    arch = ModelArch.from_dir(resolve_model_path(a.model), name=Path(a.model).name)
    copy = a.act_order
    rows = [account(arch, q, b, a.rank, a.kv_tokens, a.reserve_gb, copy) for b in a.budget_gb for q in ("fp16", "w4")]
    if a.verify:
        if not torch.cuda.is_available():
            raise ValueError("--verify needs CUDA; drop --verify for the accounting only")
        total = torch.cuda.get_device_properties(0).total_memory
        for r in rows:
            torch.cuda.set_per_process_memory_fraction(min(r["budget_gb"] * GB / total, 1.0))
            verify(r, a.model)
    table = [account(arch, q, b, a.rank, a.kv_tokens, a.reserve_gb, copy) for b in a.table_budgets
             for q in ("fp16", "w4")]
    lines = []
    for fp_row, w4_row in zip(rows[::2], rows[1::2]):
        fp, w4 = fp_row["max_adapters"], w4_row["max_adapters"]
        ratio = w4 / fp if fp else float("inf")
        lines.append(f"At {fp_row['budget_gb']:g} GB: W4 holds {w4} rank-{a.rank} adapter slots, fp16 {fp}: "
                     f"{ratio:.2f}x (issue target: >= 3x) -> {'met' if ratio >= 3 else 'NOT met'}.")
    lines += ["", "Accounting only, other budgets (same KV and workspace reserves):", "",
             "| budget GB | fp16 max adapters | W4 max adapters | W4/fp16 | KV blocks at 32 slots fp16 / W4 |",
             "|---|---|---|---|---|"]
    for b in a.table_budgets:
        f, q = (next(r for r in table if r["budget_gb"] == b and r["quant"] == k) for k in ("fp16", "w4"))
        rat = f"{q['max_adapters'] / f['max_adapters']:.2f}x" if f["max_adapters"] else "fp16 holds none"
        lines.append(f"| {b:g} | {f['max_adapters']} | {q['max_adapters']} | {rat} | "
                     f"{f['kv_blocks_at_32_slots']} / {q['kv_blocks_at_32_slots']} |")
    note = (f"{arch.name}, adapters rank {a.rank} (a slot holds all 7 projections at that rank, as LoRAPool "
            f"allocates), KV reserve {a.kv_tokens} tokens, workspace reserve {a.reserve_gb} GB, W4 = GPTQ 4-bit "
            f"g128{' act-order (+ the kernels sorted copy)' if copy else ' (no act-order: the kernels use the checkpoint tensors in place)'}; "
            + ("verified on CUDA with set_per_process_memory_fraction." if a.verify else "accounting only (not verified)."))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "capacity.json").write_text(json.dumps({"rows": rows, "table": table, "note": note,
                                                     "summary_lines": lines}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

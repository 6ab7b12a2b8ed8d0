"""Adapter capacity (issue 9): how many device adapter slots a W4 vs an fp16 base holds in one memory budget.

Accounting (no GPU needed): the model is built on the ``meta`` device (fp16 dense, or W4 g128 via
``replace_linears``) and its parameter/buffer bytes summed. The W4A16 kernels' prepared tensors (``w4_*``)
share storage with qweight/qzeros/scales when g_idx is trivial (no act-order, as here); with
``--act-order`` a row-sorted qweight copy and an int64 permutation are counted too. One adapter slot is what ``LoRAPool`` allocates per
slot: A [rank, in] and B [out, rank] for each projection the slots hold (``--targets``, the union of the
adapters' target modules: q_proj v_proj for the serving benchmark's adapters; ``all`` = the 7 projections, the
pre-sizing layout) of every layer at ``--rank`` (the largest adapter rank). Then

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
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inlaid.lora.pool import resolve_target_modules
from inlaid.model.arch import ModelArch
from inlaid.model.lora_hook import LORA_MODULES as ALL7
from inlaid.model.llama import LlamaForCausalLM
from inlaid.model.loader import resolve_model_path
from inlaid.worker.model_runner import kv_bytes_per_block

logger = logging.getLogger("capacity")
GB = 1024**3
TARGETS = ("q_proj", "v_proj")
"""The serving benchmark's synthetic adapters (ranks 8-64) target these; a slot is sized to them."""


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


def slot_bytes(arch: ModelArch, rank: int, elem: int = 2, targets: str | Sequence[str] | None = None) -> int:
    """``LoRAPool`` bytes per slot: A [rank, in] + B [out, rank] per held projection per layer (+ fp32 scalings)."""
    shapes = arch.lora_module_shapes()
    held = resolve_target_modules(targets, shapes)
    return arch.num_layers * (rank * sum(shapes[m][0] + shapes[m][1] for m in held) * elem + 4 * len(held))


def account(arch: ModelArch, quant: str, budget_gb: float, rank: int, kv_tokens: int, reserve_gb: float,
            act_order: bool = False, block_size: int = 16, targets: Sequence[str] = TARGETS,
            weights: int | None = None) -> dict[str, Any]:
    """The accounting row of one (quant, budget); ``weights`` = precomputed ``weight_bytes`` (else computed)."""
    w = weights if weights is not None else weight_bytes(arch, quant, act_order=act_order)
    blocks = math.ceil(kv_tokens / block_size)
    kv = blocks * kv_bytes_per_block(arch, block_size, torch.float16)
    s = slot_bytes(arch, rank, targets=targets)
    free = budget_gb * GB - w - kv - reserve_gb * GB
    return {"model": arch.name, "quant": quant, "budget_gb": budget_gb, "weights_gb": w / GB, "slot_mb": s / 2**20,
            "kv_gb": kv / GB, "kv_blocks": blocks, "reserve_gb": reserve_gb, "rank": rank,
            "targets": ",".join(targets),
            "max_adapters": max(int(free // s), 0),
            "kv_blocks_at_32_slots": max(int((budget_gb * GB - w - 32 * s - reserve_gb * GB)
                                             // kv_bytes_per_block(arch, block_size, torch.float16)), 0)}


def _try_engine(model: str, quant: str, slots: int, blocks: int, rank: int, device: str = "cuda",
                targets: tuple[str, ...] = TARGETS) -> dict[str, Any]:
    """Build the engine with ``slots`` slots and serve 4 requests through one adapter; outcome + peak memory."""
    from inlaid.bench.policy_sweep import EngineSpec, build_engine
    from inlaid.config import SchedulerConfig
    from inlaid.sampling import SamplingParams

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eng, t0 = None, time.perf_counter()
    try:
        eng = build_engine(EngineSpec(model, quant, device, slots, blocks, 1, (rank,), targets, 1,
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
    targets = tuple(row["targets"].split(","))
    at_n = _try_engine(model, row["quant"], n, row["kv_blocks"], row["rank"], targets=targets)
    row["verified"] = n if at_n["ok"] else f"FAILED at {n}: {at_n['error']}"
    row["peak_gb"] = at_n.get("peak_gb")
    over = _try_engine(model, row["quant"], n + step, row["kv_blocks"], row["rank"], targets=targets)
    row["step"] = step
    row["fail_error"] = (f"N+{step}: {over['error']}" if not over["ok"]
                         else f"N+{step} did NOT fail (peak {over['peak_gb']:.1f} GB): accounting is conservative")
    logger.info("%s %s: N=%d -> %s; N+%d -> %s", row["model"], row["quant"], n, row["verified"], step,
                row["fail_error"])


def ratio_ge3_up_to(acc: Callable[..., dict[str, Any]], targets: Sequence[str]) -> float | None:
    """Largest budget (GB, 0.5 steps in 8..160) at which W4 holds >= 3x fp16's slots (fp16 holding >= 1)."""
    best = None
    for b in [x / 2 for x in range(16, 321)]:
        fp, w4 = (acc(q, b, targets=targets)["max_adapters"] for q in ("fp16", "w4"))
        if fp >= 1 and w4 >= 3 * fp:
            best = b
    return best


def summary(acc: Callable[..., dict[str, Any]], a: argparse.Namespace, rows: list[dict[str, Any]],
            table: list[dict[str, Any]], targets: Sequence[str]) -> list[str]:
    """Verdict lines for the verified budgets, then the accounting table over ``--table-budgets``."""
    lines = []
    for fp_row, w4_row in zip(rows[::2], rows[1::2]):
        fp, w4 = fp_row["max_adapters"], w4_row["max_adapters"]
        ratio = w4 / fp if fp else float("inf")
        lines.append(f"At {fp_row['budget_gb']:g} GB, slots sized to {', '.join(targets)}: W4 holds {w4} rank-{a.rank} "
                     f"adapter slots, fp16 {fp}: {ratio:.2f}x (issue target: >= 3x) -> "
                     f"{'met' if ratio >= 3 else 'NOT met'}.")
    up_to = ratio_ge3_up_to(acc, targets)
    lines += ["", f"W4/fp16 >= 3x holds for budgets up to {up_to:g} GB (accounting, these reserves)." if up_to else
              "", "Why sizing the slots does not raise the ratio: max adapters = (budget - weights - reserves) / "
              "slot bytes, so W4/fp16 -> (budget - W4 weights - reserves) / (budget - fp16 weights - reserves) "
              "whatever the slot size; smaller slots multiply both counts, and only rounding moves the ratio.",
              "", "Accounting only, other budgets (same KV and workspace reserves; 'all 7' = the pre-sizing slot):", "",
              f"| budget GB | fp16 ({'+'.join(targets)}) | W4 ({'+'.join(targets)}) | W4/fp16 | fp16 (all 7) | "
              "W4 (all 7) | W4/fp16 (all 7) | KV blocks at 32 slots fp16 / W4 |", "|---" * 8 + "|"]
    for b in a.table_budgets:
        f, q, f7, q7 = (next(r for r in table if r["budget_gb"] == b and r["quant"] == k and r["targets"] == t)
                        for t in (",".join(targets), ",".join(ALL7)) for k in ("fp16", "w4"))
        lines.append(f"| {b:g} | {f['max_adapters']} | {q['max_adapters']} | {_rat(q, f)} | {f7['max_adapters']} | "
                     f"{q7['max_adapters']} | {_rat(q7, f7)} | {f['kv_blocks_at_32_slots']} / "
                     f"{q['kv_blocks_at_32_slots']} |")
    return lines


def _rat(w4: dict[str, Any], fp: dict[str, Any]) -> str:
    return f"{w4['max_adapters'] / fp['max_adapters']:.2f}x" if fp["max_adapters"] else "fp16 holds none"


def carried(path: Path | None) -> list[dict[str, Any]]:
    """Verified rows of an earlier capacity.json (slots of all 7 projections when it names no targets)."""
    if path is None or not path.is_file():
        return []
    rows = [dict(r) for r in json.loads(path.read_text()).get("rows", []) if "verified" in r]
    for r in rows:
        r.setdefault("targets", ",".join(ALL7))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-13b-shapes")
    p.add_argument("--budget-gb", type=float, nargs="+", default=[40.0], help="memory budgets that are verified")
    p.add_argument("--table-budgets", type=float, nargs="*", default=[24, 32, 40, 48, 64, 80],
                   help="budgets for the accounting-only table")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--targets", nargs="+", default=list(TARGETS),
                   help="projections a slot holds (the adapters' union; 'all' = the 7 projections)")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV cache reserve in tokens")
    p.add_argument("--reserve-gb", type=float, default=1.0, help="activations / CUDA-graph workspace reserve")
    p.add_argument("--act-order", action="store_true", help="count the W4A16 kernels' act-order copy (accounting)")
    p.add_argument("--verify", action="store_true", help="build the engines on CUDA under the budget")
    p.add_argument("--carry-verified", type=Path, default=None,
                   help="an earlier capacity.json whose GPU-verified rows are kept (as verified_earlier)")
    p.add_argument("--out", type=Path, required=True, help="directory for capacity.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    arch = ModelArch.from_dir(resolve_model_path(a.model), name=Path(a.model).name)
    targets = resolve_target_modules(a.targets if a.targets != ["all"] else None, arch.lora_module_shapes())
    wb = {q: weight_bytes(arch, q, act_order=a.act_order) for q in ("fp16", "w4")}

    def acc(quant: str, budget: float, targets: Sequence[str]) -> dict[str, Any]:
        return account(arch, quant, budget, a.rank, a.kv_tokens, a.reserve_gb, a.act_order, targets=targets,
                       weights=wb[quant])

    rows = [acc(q, b, targets=targets) for b in a.budget_gb for q in ("fp16", "w4")]
    earlier = carried(a.carry_verified)
    if a.verify:
        if not torch.cuda.is_available():
            raise ValueError("--verify needs CUDA; drop --verify for the accounting only")
        total = torch.cuda.get_device_properties(0).total_memory
        for r in rows:
            torch.cuda.set_per_process_memory_fraction(min(r["budget_gb"] * GB / total, 1.0))
            verify(r, a.model)
    table = [acc(q, b, targets=t) for t in {targets: 0, ALL7: 0} for b in a.table_budgets for q in ("fp16", "w4")]
    lines = summary(acc, a, rows, table, targets)
    note = (f"{arch.name}, adapters rank {a.rank}, a slot sized to {', '.join(targets)} at that rank (LoRAPool "
            f"target_modules = the adapters' union), KV reserve {a.kv_tokens} tokens, workspace reserve "
            f"{a.reserve_gb} GB, W4 = GPTQ 4-bit g128"
            f"{' act-order (+ the kernels sorted copy)' if a.act_order else ' (no act-order: the kernels use the checkpoint tensors in place)'}; "
            + ("verified on CUDA with set_per_process_memory_fraction." if a.verify else
               "accounting only: NOT verified on a GPU (no engine built)."))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "capacity.json").write_text(json.dumps({"rows": rows, "table": table, "note": note,
                                                     "summary_lines": lines, "verified_earlier": earlier}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

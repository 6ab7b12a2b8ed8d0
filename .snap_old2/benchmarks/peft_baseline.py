"""transformers + PEFT as the baseline a user without a server would run (issue 9), vs inlaid on the same shapes.

The same workload generator as the serving sweep (``inlaid.bench.workload``: power-law popularity over N
adapters, task-suite lengths, capped) gives R requests. Both systems get identical token-id prompts and
must produce each request's output length:

- **transformers + PEFT**: the requests in arrival order, in static batches of ``--batch`` (left-padded),
  ``generate`` with PEFT's mixed-batch ``adapter_names`` (greedy, ``min_new_tokens = max_new_tokens`` = the
  longest output of the batch: a static batch runs until its longest request is done);
- **inlaid**: every request submitted at once to the engine (continuous batching, ``max_tokens`` = its own
  output length, ``ignore_eos``).

Throughput = the requests' output tokens (the useful ones) / wall time, after one warm-up run each. Model:
the SmolLM2-135M config (``benchmarks/configs/smollm2-135m``) with dummy random weights (the same config
for both), fp16 on CUDA (fp32 on CPU); adapters: random LoRA on q_proj/v_proj, ranks cycling over
``--ranks`` (as the serving sweep); 8 distinct weight sets registered under the N names on both sides
(``hf_peft_model``: PEFT builds 8, the other names alias them, so 100 adapters build in seconds). Writes ``peft_baseline.json``; ``--budget-s`` skips the remaining
adapter counts (listed as skipped).

    python3 benchmarks/peft_baseline.py --device cuda --out benchmarks/results/serving
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inlaid.bench.policy_sweep import EngineSpec, build_engine, device_sync
from inlaid.bench.workload import WorkloadConfig, generate_workload
from inlaid.config import SchedulerConfig
from inlaid.model.loader import resolve_model_path
from inlaid.sampling import SamplingParams
from inlaid.sim.simulator import RequestSpec

logger = logging.getLogger("peft_baseline")
TARGETS = ["q_proj", "v_proj"]
DISTINCT = 8
"""Distinct adapter weight sets on both sides (inlaid's sweep engine registers N names over this many too)."""


def hf_peft_model(model: str, device: str, n_adapters: int, ranks: list[int], distinct: int = DISTINCT) -> Any:
    """transformers model (random weights of ``model``'s config) with PEFT adapters t0..t{n-1}.

    ``min(n, distinct)`` adapters are built by PEFT itself (``get_peft_model`` + ``add_adapter``, random init,
    rank ``ranks[i % len(ranks)]``); t{i} for i >= distinct is registered as an alias of t{i % distinct}
    (``alias_adapter``): the same LoRA modules under another name, as inlaid's sweep engine registers N names
    over ``distinct`` weight sets. PEFT's ``add_adapter`` re-walks the whole (growing) module tree per adapter,
    which took > 65 s for 100 adapters on the H200; aliasing makes N names cost no more than ``distinct``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(resolve_model_path(model)))
    dtype = torch.float16 if device != "cpu" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)

    def cfg(i: int) -> LoraConfig:
        r = ranks[i % len(ranks)]
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)

    peft = get_peft_model(base, cfg(0), adapter_name="t0")
    for i in range(1, min(n_adapters, distinct)):
        peft.add_adapter(f"t{i}", cfg(i))
    peft = peft.to(device=device, dtype=dtype).eval()
    layers = tuner_layers(peft)
    for i in range(distinct, n_adapters):
        alias_adapter(peft, layers, f"t{i % distinct}", f"t{i}")
    return peft


def tuner_layers(peft: Any) -> list[Any]:
    """The PEFT tuner layers (LoRA-wrapped projections) of ``peft``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft.modules() if isinstance(m, BaseTunerLayer)]


def alias_adapter(peft: Any, layers: list[Any], src: str, name: str) -> None:
    """Register adapter ``src`` of ``peft`` again under ``name`` (shared weights), in every tuner layer.

    Every per-adapter container PEFT declares on its layers (``adapter_layer_names`` + ``other_param_names``:
    lora_A/B, r, alpha, scaling, dropout, ...) gets ``name`` -> the entry of ``src``; ``peft_config`` too.
    """
    if name in peft.peft_config:
        raise ValueError(f"adapter name {name!r} already exists")
    for m in layers:
        for attr in (*m.adapter_layer_names, *m.other_param_names):
            box = getattr(m, attr, None)
            if box is not None and hasattr(box, "keys") and src in box.keys():
                box[name] = box[src]
    peft.peft_config[name] = peft.peft_config[src]


def prompts_of(specs: list[RequestSpec], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (s.prompt_len,), generator=g).tolist() for s in specs]


def run_hf(model: Any, specs: list[RequestSpec], prompts: list[list[int]], batch: int, device: str) -> float:
    """Seconds to serve ``specs`` in static batches of ``batch`` (arrival order)."""
    sync = device_sync(device)
    sync()
    t0 = time.perf_counter()
    for k in range(0, len(specs), batch):
        sp, pr = specs[k:k + batch], prompts[k:k + batch]
        width = max(len(p) for p in pr)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in pr], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pr], device=device)
        new = max(s.output_len for s in sp)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, adapter_names=[s.adapter for s in sp])
    sync()
    return time.perf_counter() - t0


def run_inlaid(eng: Any, specs: list[RequestSpec], prompts: list[list[int]], device: str) -> float:
    """Seconds to serve ``specs`` submitted at once (continuous batching)."""
    sync = device_sync(device)
    sync()
    t0 = time.perf_counter()
    for s, p in zip(specs, prompts):
        eng.add_request(None, p, SamplingParams(max_tokens=s.output_len, ignore_eos=True), s.adapter)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished and o.error:
                raise RuntimeError(f"inlaid request {o.request_id} failed: {o.error}")
    sync()
    return time.perf_counter() - t0


def bench_point(a: argparse.Namespace, n: int, hf: Any) -> dict[str, Any]:
    wl = WorkloadConfig(num_requests=a.requests, num_tasks=n, popularity="powerlaw", alpha=a.alpha,
                        max_tokens=a.max_tokens, max_prompt=a.max_prompt, lengths=a.lengths, seed=a.seed)
    specs = generate_workload(wl)
    eng = build_engine(EngineSpec(a.model, "fp16", a.device, slots=min(n, a.slots), num_blocks=a.num_blocks,
                                  num_adapters=n, ranks=tuple(a.ranks), targets=tuple(TARGETS),
                                  distinct_adapters=min(n, DISTINCT),
                                  sched=SchedulerConfig(max_num_seqs=a.max_num_seqs, max_queue_len=100_000)))
    prompts = prompts_of(specs, eng.parts.arch.vocab_size)
    useful = sum(s.output_len for s in specs)
    warm = min(len(specs), a.batch)
    run_inlaid(eng, specs[:warm], prompts[:warm], a.device)
    ours = run_inlaid(eng, specs, prompts, a.device)
    run_hf(hf, specs[:warm], prompts[:warm], a.batch, a.device)
    theirs = run_hf(hf, specs, prompts, a.batch, a.device)
    distinct = [len({s.adapter for s in specs[k:k + a.batch]}) for k in range(0, len(specs), a.batch)]
    row = {"adapters": n, "requests": len(specs), "output_tokens": useful, "batch": a.batch,
           "distinct_per_batch": sum(distinct) / len(distinct), "peft_s": theirs, "inlaid_s": ours,
           "peft_tps": useful / theirs, "inlaid_tps": useful / ours, "ratio": theirs / ours}
    logger.info("%d adapters: PEFT %.0f tok/s, inlaid %.0f tok/s (%.1fx)", n, row["peft_tps"], row["inlaid_tps"],
                row["ratio"])
    return row


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "configs" / "smollm2-135m"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--adapters", type=int, nargs="+", default=[8, 32, 100])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="transformers static batch size")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--lengths", default="suite")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", type=int, default=100, help="inlaid device adapter slots (capped at N)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip remaining adapter counts after this")
    p.add_argument("--out", type=Path, required=True, help="directory for peft_baseline.json")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    rows, skipped = [], []
    hf = hf_peft_model(a.model, a.device, max(a.adapters), a.ranks)
    build_s = time.monotonic() - t0
    logger.info("transformers + PEFT model with %d adapters built in %.1fs", max(a.adapters), build_s)
    for n in a.adapters:
        if time.monotonic() - t0 > a.budget_s:
            skipped.append(f"{n} adapters")
            continue
        try:
            rows.append(bench_point(a, n, hf))
        except Exception as exc:
            logger.exception("%d adapters failed", n)
            skipped.append(f"{n} adapters ({type(exc).__name__}: {str(exc)[:120]})")
    note = (f"{Path(a.model).name} config, dummy random weights, {'fp16' if a.device != 'cpu' else 'fp32'} on "
            f"{a.device}; {a.requests} requests (power-law alpha {a.alpha}, {a.lengths} lengths, output <= "
            f"{a.max_tokens}, prompt <= {a.max_prompt}); PEFT: static batches of {a.batch}, mixed-batch "
            f"adapter_names; inlaid: all requests at once, continuous batching. LoRA on {TARGETS}, ranks {a.ranks}; "
            f"{DISTINCT} distinct weight sets under N names on both sides (PEFT: {DISTINCT} built by add_adapter, "
            f"the other names aliased to them in every LoRA layer; model + {max(a.adapters)} adapters built in "
            f"{build_s:.1f} s).")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peft_baseline.json").write_text(json.dumps({"rows": rows, "skipped": skipped, "note": note,
                                                          "build_s": build_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

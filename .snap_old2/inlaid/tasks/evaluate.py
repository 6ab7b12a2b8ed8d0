"""Evaluating tasks through our engine: one mixed run, a metric and answer NLL per (task, adapter).

Owns ``evaluate`` / ``evaluate_runs``: every (task, adapter) run's test examples
go into ONE ``LLM.generate`` call (greedy, ``max_tokens`` = the task's
``max_new_tokens``, each example with its own adapter), so the engine batches
all tasks and adapters together; the task metric is then computed per run.
Answer-token NLL uses teacher forcing with the engine's own model forward:
prompt+answer sequences are packed into ``ForwardBatch``es (several examples
per forward, mixed adapters through a ``LoRAPool`` hook built for the
evaluation), and log-probs are gathered for the answer tokens only.

Invariants:
- Tokens are exactly training's: ``inlaid.tasks.prompting.encode_example``.
- A run is ``(task name, adapter name | None)``; adapter names are the ones
  registered in the LLM (``None`` = bare base). Results come back in run order.
- Greedy results do not depend on which other runs share the call (tests check
  that all tasks in one run equal each task alone).
- The engine's own LoRA pool and KV cache are never touched: NLL forwards use a
  temporary pool (at most ``max_pool_slots`` adapters at a time) and fresh
  caches, and the model's hook is restored even on error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from inlaid.tasks.dataset import Example, load_split
from inlaid.tasks.metrics import answer_nll, compute_metric
from inlaid.tasks.prompting import encode_example
from inlaid.tasks.registry import Task, get_task

logger = logging.getLogger(__name__)

Run = tuple[str, "str | None"]
"""(task name, adapter name registered in the LLM, or None for the bare base)."""


@dataclass
class RunResult:
    """One (task, adapter) evaluation. ``metric`` is NaN when generation was skipped, ``nll`` when NLL was."""

    task: str
    adapter: str | None
    metric_name: str
    metric: float
    nll: float
    examples: int
    answer_tokens: int
    predictions: list[str] = field(default_factory=list, repr=False)


@dataclass
class EvalResults:
    """All runs of one evaluation plus wall-clock seconds per phase."""

    runs: list[RunResult]
    split: str
    limit: int | None
    seconds: dict[str, float] = field(default_factory=dict)

    def get(self, task: str, adapter: str | None) -> RunResult:
        """The run of ``task`` with ``adapter``; KeyError if it was not evaluated."""
        for r in self.runs:
            if r.task == task and r.adapter == adapter:
                return r
        raise KeyError(f"no run for task {task!r} with adapter {adapter!r}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalResults":
        """The inverse of ``to_json`` (predictions included when they were saved)."""
        return cls([RunResult(**row) for row in data["runs"]], data["split"], data["limit"], dict(data["seconds"]))

    def rescored(self, data_dir: Path | None = None) -> "EvalResults":
        """The same runs with each metric computed again from the saved predictions.

        For runs made where the metric packages are not installed (``evaluate_runs(score=False)``).
        """
        runs = []
        for r in self.runs:
            if not r.predictions:
                raise ValueError(f"run ({r.task!r}, {r.adapter!r}) has no saved predictions to score")
            runs.append(replace(r, metric=score_predictions(r.task, r.predictions, self.split, data_dir)))
        return EvalResults(runs, self.split, self.limit, dict(self.seconds))

    def to_json(self, with_predictions: bool = False) -> dict[str, Any]:
        rows = []
        for r in self.runs:
            d = asdict(r)
            if not with_predictions:
                d.pop("predictions")
            rows.append(d)
        return {"split": self.split, "limit": self.limit, "seconds": self.seconds, "runs": rows}

    def to_markdown(self) -> str:
        """A table: one row per task, metric / NLL for the base (if run) and the task's adapter(s)."""
        lines = ["| task | metric | adapter | examples | metric (0-100) | answer NLL (nats) |", "|---|---|---|---|---|---|"]
        for r in self.runs:
            adapter = r.adapter if r.adapter is not None else "(base)"
            lines.append(f"| {r.task} | {r.metric_name} | {adapter} | {r.examples} | {_fmt(r.metric, 1)} | "
                         f"{_fmt(r.nll, 3)} |")  # fmt: skip
        return "\n".join(lines) + "\n"


def _fmt(x: float, digits: int) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


@dataclass
class _Item:
    run: int
    prompt_ids: list[int]
    answer_ids: list[int]


def score_predictions(task: str, predictions: list[str], split: str = "test", data_dir: Path | None = None) -> float:
    """The task's metric for predictions of the first ``len(predictions)`` examples of ``split``."""
    refs = [e.completion for e in load_split(task, split, len(predictions), data_dir)]
    return compute_metric(get_task(task).metric, predictions, refs)


# ---- public entry points ----------------------------------------------------------
def evaluate(
    llm: Any,
    tasks: Sequence[str | Task],
    adapters: Mapping[str, str | None] | None = None,
    split: str = "test",
    limit: int | None = None,
    nll: bool = True,
    generate: bool = True,
    data_dir: Path | None = None,
) -> EvalResults:
    """Evaluate each task with ``adapters[task]`` (missing key or None = bare base) in one mixed run."""
    names = [t.name if isinstance(t, Task) else get_task(t).name for t in tasks]
    adapters = dict(adapters or {})
    unknown = set(adapters) - set(names)
    if unknown:
        raise ValueError(f"adapters given for tasks that are not evaluated: {', '.join(sorted(unknown))}")
    return evaluate_runs(llm, [(n, adapters.get(n)) for n in names], split, limit, nll, generate, data_dir)


def evaluate_runs(
    llm: Any,
    runs: Sequence[Run],
    split: str = "test",
    limit: int | None = None,
    nll: bool = True,
    generate: bool = True,
    data_dir: Path | None = None,
    max_batch_tokens: int = 2048,
    max_pool_slots: int = 4,
    max_new_tokens_cap: int | None = None,
    score: bool = True,
) -> EvalResults:
    """Evaluate arbitrary (task, adapter) runs, all in one ``generate`` call and shared NLL batches.

    ``max_new_tokens_cap`` lowers every task's generation budget (a speed knob for slow machines;
    the metric is then on truncated outputs and must be labelled so). ``score=False`` keeps the
    predictions but leaves the metric NaN (score later with ``EvalResults.rescored``).
    """
    runs = _check_runs(llm, runs)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; task evaluation needs one (with a chat template)")
    examples = {t: load_split(t, split, limit, data_dir) for t in {t for t, _ in runs}}
    for t, exs in examples.items():
        if not exs:
            raise ValueError(f"task {t!r} has no {split} examples (limit={limit}); nothing to evaluate")
    encoded = {t: [encode_example(tok, get_task(t), e.prompt, e.completion) for e in exs] for t, exs in examples.items()}
    items = [_Item(i, p, a) for i, (t, _) in enumerate(runs) for p, a in encoded[t]]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    preds = _generate(llm, runs, items, max_new_tokens_cap) if generate else {}
    seconds["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logprobs = answer_logprobs(llm, [(it.prompt_ids, it.answer_ids, runs[it.run][1]) for it in items],
                               max_batch_tokens, max_pool_slots) if nll else None  # fmt: skip
    seconds["nll"] = time.perf_counter() - t0
    results = [_score(i, run, examples[run[0]], items, preds, logprobs, score) for i, run in enumerate(runs)]
    return EvalResults(results, split, limit, seconds)


def _check_runs(llm: Any, runs: Sequence[Run]) -> list[Run]:
    if not runs:
        raise ValueError("no (task, adapter) runs to evaluate; give at least one task")
    out: list[Run] = []
    for task, adapter in runs:
        get_task(task)
        if adapter is not None:
            llm.engine.registry.get(adapter)  # UnknownAdapterError names the registered ones
        if (task, adapter) in out:
            raise ValueError(f"run (task {task!r}, adapter {adapter!r}) given twice")
        out.append((task, adapter))
    return out


def _score(i: int, run: Run, examples: list[Example], items: list[_Item], preds: dict[int, list[str]],
           logprobs: list[list[float]] | None, score: bool) -> RunResult:  # fmt: skip
    task = get_task(run[0])
    mine = [k for k, it in enumerate(items) if it.run == i]
    metric = float("nan")
    if preds and score:
        metric = compute_metric(task.metric, preds[i], [e.completion for e in examples])
    value = answer_nll([logprobs[k] for k in mine]) if logprobs is not None else float("nan")
    n_tok = sum(len(items[k].answer_ids) for k in mine)
    return RunResult(task.name, run[1], task.metric, metric, value, len(mine), n_tok, preds.get(i, []))


# ---- generation -----------------------------------------------------------------
def _generate(llm: Any, runs: list[Run], items: list[_Item], cap: int | None = None) -> dict[int, list[str]]:
    """Greedy generation of every item in one engine call; predictions grouped by run (stripped text).

    Besides EOS, generation stops at any special token of the tokenizer (``<|im_start|>`` etc.):
    a chat reply never contains one, and an adapter that ends its answer with the wrong turn
    marker would otherwise ramble into a made-up next turn.
    """
    from inlaid.sampling import SamplingParams

    if cap is not None and cap < 1:
        raise ValueError(f"max_new_tokens_cap must be >= 1 or None, got {cap}")
    stops = tuple(sorted(set(getattr(llm.tokenizer, "all_special_ids", []) or [])))
    params = {i: SamplingParams(max_tokens=min(get_task(t).max_new_tokens, cap or 10**9), temperature=0.0,
                                stop_token_ids=stops) for i, (t, _) in enumerate(runs)}  # fmt: skip
    outs = llm.generate([it.prompt_ids for it in items], [params[it.run] for it in items],
                        adapter=[runs[it.run][1] for it in items], use_tqdm=True)  # fmt: skip
    preds: dict[int, list[str]] = {i: [] for i in range(len(runs))}
    for it, out in zip(items, outs):
        if out.error:
            raise RuntimeError(f"generation failed for task {runs[it.run][0]!r}: {out.error}")
        preds[it.run].append(out.text.strip())
    return preds


# ---- teacher-forced answer log-probs ----------------------------------------------
def answer_logprobs(
    llm: Any,
    examples: Sequence[tuple[list[int], list[int], str | None]],
    max_batch_tokens: int = 2048,
    max_pool_slots: int = 4,
) -> list[list[float]]:
    """log p(answer token | prefix) per example ``(prompt_ids, answer_ids, adapter name | None)``.

    Examples are ordered by adapter and packed into forwards of at most ``max_batch_tokens``
    tokens (one example minimum) holding at most ``max_pool_slots`` distinct adapters.
    """
    if max_batch_tokens < 1 or max_pool_slots < 1:
        raise ValueError(f"max_batch_tokens and max_pool_slots must be >= 1, got {max_batch_tokens}, {max_pool_slots}")
    order = sorted(range(len(examples)), key=lambda k: (examples[k][2] or "", k))
    out: list[list[float]] = [[] for _ in examples]
    parts = llm.engine.parts
    saved = parts.model.lora_hook
    try:
        for chunk in tqdm(_pack(order, examples, max_batch_tokens, max_pool_slots), desc="answer NLL", unit="batch"):
            for k, lps in zip(chunk, _forward_chunk(parts, [examples[k] for k in chunk])):
                out[k] = lps
    finally:
        parts.model.set_lora_hook(saved)
    return out


def _pack(order: list[int], examples: Sequence[tuple[list[int], list[int], str | None]], max_tokens: int,
          max_slots: int) -> list[list[int]]:  # fmt: skip
    chunks: list[list[int]] = [[]]
    used, names = 0, set()
    for k in order:
        n = len(examples[k][0]) + len(examples[k][1])
        name = examples[k][2]
        new_name = name is not None and name not in names
        if chunks[-1] and (used + n > max_tokens or (new_name and len(names) >= max_slots)):
            chunks.append([])
            used, names = 0, set()
        chunks[-1].append(k)
        used += n
        if name is not None:
            names.add(name)
    return [c for c in chunks if c]


@torch.inference_mode()
def _forward_chunk(parts: Any, chunk: list[tuple[list[int], list[int], str | None]]) -> list[list[float]]:
    from inlaid.kernels.paged_attention import allocate_kv_caches
    from inlaid.lora.pool import LoRAPool
    from inlaid.quant.calibrate import BLOCK_SIZE, prefill_batch

    names = sorted({a for _, _, a in chunk if a is not None})
    pool = None
    if names:
        adapters = [parts.registry.get(n) for n in names]
        pool = LoRAPool(len(names), max(a.rank for a in adapters), parts.arch.num_layers,
                        parts.arch.lora_module_shapes(), parts.device, parts.dtype)  # fmt: skip
        for slot, a in enumerate(adapters):
            pool.load(slot, a)
    seqs = [p + a for p, a, _ in chunk]
    batch, n_blocks = prefill_batch(seqs, parts.device)
    slots = torch.tensor([names.index(a) if a is not None else -1 for _, _, a in chunk], dtype=torch.int64)
    batch.lora_slots = torch.repeat_interleave(slots, torch.tensor([len(s) for s in seqs])).to(parts.device)
    arch = parts.arch
    caches = allocate_kv_caches(arch.num_layers, n_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                                parts.dtype, parts.device)  # fmt: skip
    parts.model.set_lora_hook(pool)
    hidden = parts.model(batch, caches)
    return _gather_logprobs(parts.model, hidden, chunk, parts.device)


def _gather_logprobs(model: Any, hidden: torch.Tensor, chunk: list[tuple[list[int], list[int], str | None]],
                     device: torch.device, rows_per_step: int = 512) -> list[list[float]]:  # fmt: skip
    """Answer-token log-probs: rows predicting each answer token, logits in slices of ``rows_per_step``."""
    rows: list[int] = []
    targets: list[int] = []
    start = 0
    for p, a, _ in chunk:
        rows.extend(range(start + len(p) - 1, start + len(p) + len(a) - 1))
        targets.extend(a)
        start += len(p) + len(a)
    row_t = torch.tensor(rows, dtype=torch.int64, device=device)
    tgt_t = torch.tensor(targets, dtype=torch.int64, device=device)
    lps = []
    for s in range(0, len(rows), rows_per_step):
        logits = model.compute_logits(hidden.index_select(0, row_t[s : s + rows_per_step]))
        picked = logits.gather(1, tgt_t[s : s + rows_per_step, None])[:, 0]
        lps.append(picked - torch.logsumexp(logits, dim=-1))
    flat = torch.cat(lps).double().cpu().tolist()
    out, pos = [], 0
    for _, a, _ in chunk:
        out.append(flat[pos : pos + len(a)])
        pos += len(a)
    return out


def write_results(results: EvalResults, json_path: Path | None, markdown_path: Path | None, header: str = "") -> None:
    """Write the JSON (with predictions) and/or Markdown table."""
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results.to_json(with_predictions=True), indent=1) + "\n")
    if markdown_path is not None:
        Path(markdown_path).write_text(header + results.to_markdown())

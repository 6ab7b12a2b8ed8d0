"""Results of ``benchmarks/dynamic.py``: load-test statistics, the paired NLL bootstrap, and the markdown page.

Owns turning a run's result dict (the JSON ``dynamic.py`` writes next to its page) into markdown, and
``merge_page``: several runs (CPU, GPU with the bundled model, GPU with a 7B-shaped dummy) on one page, one
section per run, each with its own status line (device, model, settings) and command. A single run renders
exactly as the driver renders it. Notes (hand-written reading) are appended once, at the end.

    PYTHONPATH=. python benchmarks/dynamic.py --from-json benchmarks/results/dynamic.json,\
        benchmarks/results/dynamic_gpu_smol.json --notes benchmarks/results/dynamic_notes.md \
        --out benchmarks/results/dynamic.md

No torch here: the page can be regenerated on any machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]



# ---- statistics -------------------------------------------------------------------------------
def phase_stats(log: list, marks: dict[str, float]) -> dict[str, dict[str, float]]:
    spans = {"before": (marks["start"], marks["add"]), "during": (marks["add"], marks["done"]),
             "after": (marks["done"], marks["end"])}  # fmt: skip
    out = {}
    for name, (a, b) in spans.items():
        lat = sorted(e - s for s, e, _, _ in log if a <= s < b)
        toks = sum(n for s, e, n, _ in log if a <= e < b)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        done = sum(1 for s, e, _, _ in log if a <= e < b)
        out[name] = {"seconds": b - a, "requests": len(lat), "p50": q[49], "p99": q[98],
                     "mean": statistics.fmean(lat) if lat else float("nan"), "completed": done,
                     "tok_per_s": toks / (b - a) if b > a else float("nan")}  # fmt: skip
    return out


def paired_change(before: list[list[float]], after: list[list[float]], reps: int = 2000,
                  seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Change of the pooled NLL (after - before) over the same examples, with a paired bootstrap 95% interval
    (examples resampled with replacement, the same resample for both bases)."""
    if len(before) != len(after) or any(b[1] != a[1] for b, a in zip(before, after)):
        raise ValueError("paired_change needs the same examples (same token counts) on both bases")
    rng = random.Random(seed)

    def delta(idx: list[int]) -> float:
        n = sum(before[i][1] for i in idx)
        return (sum(after[i][0] for i in idx) - sum(before[i][0] for i in idx)) / n

    k = len(before)
    boots = sorted(delta([rng.randrange(k) for _ in range(k)]) for _ in range(reps))
    return {"delta": delta(list(range(k))), "lo": boots[int(0.025 * reps)], "hi": boots[int(0.975 * reps) - 1],
            "examples": k}  # fmt: skip


# ---- markdown -----------------------------------------------------------------------------------
def _pct(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%" if old and old == old and new == new else "n/a"


def _md_header(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    ident = res.get("identical", {})
    if isinstance(ident, bool):
        ident = {"online": ident, "offline": ident}
    model = "SmolLM2-135M-Instruct (bundled `default`)" if args.model == "default" else Path(args.model).name

    def same(mode: str) -> str:
        v = ident.get(mode)
        return "not compared (the job did not finish)" if v is None else "bit-identical" if v else "DIFFERENT"

    incomplete = [f"**Incomplete run:** {m}" for m in res.get("incomplete", [])]
    return [f"# Dynamic task addition: {model} on {res.get('device', args.device)}", "",
            f"**Status:** measured {res.get('date', '?')} on {res.get('device', args.device)}, model `{args.model}` "
            f"({args.load_format} weights), {args.bits}-bit g{args.group_size} sym, `{args.method}`, "
            f"{args.calib_samples} calibration samples of at most {args.max_seq_len} tokens per task. "
            f"Old tasks: {', '.join(args.old)}; added: **{args.new}**.", "",
            f"Command: `{res['command']}`", "", *[x for m in incomplete for x in (m, "")],
            "## Equivalence: incremental == from scratch", "",
            f"The checkpoint after adding {args.new} to the base quantized for the old tasks, compared tensor by "
            f"tensor (`torch.equal`, every qweight/qzeros/scales/g_idx and unquantized tensor) with quantizing all "
            f"tasks at once (same data, same settings):", "",
            f"- online (added to the running server, layers swapped in between steps): "
            f"**{same('online')}**",
            f"- offline (`Requantizer` without a served model): "
            f"**{same('offline')}**", ""]


def _md_quality(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    ev = res["eval"]
    has_fp, has_metric = "fp" in ev, any("metric" in v for v in ev["old"].values())
    first = ev["old"][args.new]
    lines = [f"## Quality: every task with its adapter, old base vs re-quantized base", "",
             f"Answer NLL: nats/token of the reference answer under teacher forcing, lower is better; first "
             f"{first['nll_examples']} test examples per task" + ("; the interval is a paired bootstrap over those "
             "examples (2000 resamples): a change whose interval contains 0 is within the noise of this "
             "sample." if "paired" in res else ".")]
    if has_metric:
        lines[-1] += (f" Metric: the task's own metric (0-100, higher is better) on greedy outputs of the first "
                      f"{first.get('metric_examples')} test examples"
                      f"{f', generation capped at {args.gen_max_tokens} tokens' if args.gen_max_tokens else ''}.")
    head = "| task | NLL old base | NLL re-quantized | change" + (" [95% CI] |" if "paired" in res else " |") + (" NLL fp base |" if has_fp else "")
    head += " metric | old base | re-quantized |" + (" fp base |" if has_fp else "") if has_metric else ""
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for t in args.old + [args.new]:
        o, r = ev["old"][t], ev.get("requantized", {}).get(t, {"nll": float("nan")})  # nan: not measured
        pc = res.get("paired", {}).get(t)
        ci = f" [{pc['lo']:+.3f}, {pc['hi']:+.3f}]" if pc else ""
        row = f"| {t}{' (new)' if t == args.new else ''} | {o['nll']:.4f} | {r['nll']:.4f} | {r['nll'] - o['nll']:+.4f}{ci} |"
        row += f" {ev['fp'][t]['nll']:.4f} |" if has_fp else ""
        row += f" {o.get('metric_name', '')} | {o.get('metric', float('nan')):.1f} | {r.get('metric', float('nan')):.1f} |" \
            if has_metric else ""
        row += f" {ev['fp'][t].get('metric', float('nan')):.1f} |" if has_metric and has_fp else ""
        lines.append(row)
    return lines + [""]


def _md_load(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    if "phases" not in res.get("load", {}):
        return ["## Serving during the addition", "", "Not measured: the online run did not return "
                f"({res.get('load', {}).get('error', 'no result')}).", ""]
    load, ph = res["load"], res["load"]["phases"]
    lines = [f"## Serving during the addition (closed loop over `AsyncLLM`, {args.clients} clients, greedy, "
             f"{args.max_tokens} tokens/request, old tasks' test prompts; dequantized-weight cache "
             f"{'on' if getattr(args, 'cache_dequantized', False) else 'off'})", "",
             "| phase | seconds | requests started | completed | mean latency s | p50 s | p99 s | tokens/s | "
             "tokens/s vs before |", "|---|---|---|---|---|---|---|---|---|"]
    for name, st in ph.items():
        lines.append(f"| {name} | {st['seconds']:.1f} | {st['requests']} | {st.get('completed', '')} | "
                     f"{st.get('mean', float('nan')):.3f} | {st['p50']:.3f} | {st['p99']:.3f} | "
                     f"{st['tok_per_s']:.1f} | {_pct(st['tok_per_s'], ph['before']['tok_per_s'])} |")
    lines += ["", f"All {load['requests']} requests finished normally: **{load['all_finished']}** "
              f"({load.get('straddling', '?')} of them straddled a phase boundary; each counts in the phase it started "
              f"in for latency and the phase it ended in for tokens/s). Re-quantization worker: "
              f"{args.requant_threads} thread(s), duty cycle {args.duty_cycle}"
              f"; {getattr(args, 'warmup_seconds', 0):g} s of serving before 'before' (warm-up, not counted).",
              f"Throughput dip during the addition: **{_pct(ph['during']['tok_per_s'], ph['before']['tok_per_s'])}**"
              f" (paper: -10 to -13%). Before vs after, same base size and load, no re-quantization running: "
              f"{_pct(ph['after']['tok_per_s'], ph['before']['tok_per_s'])} tokens/s, p50 "
              f"{_pct(ph['after']['p50'], ph['before']['p50'])}: the noise floor of this machine. "
              f"Against the mean of before and after (a drifting machine's baseline at mid-run): tokens/s "
              f"**{_pct(ph['during']['tok_per_s'], (ph['before']['tok_per_s'] + ph['after']['tok_per_s']) / 2)}**, "
              f"p50 {_pct(ph['during']['p50'], (ph['before']['p50'] + ph['after']['p50']) / 2)}, "
              f"p99 {_pct(ph['during']['p99'], (ph['before']['p99'] + ph['after']['p99']) / 2)}.", ""]
    return lines


def _md_cost(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    lines = ["## Cost: full vs incremental (the paper's Table 4 shape)", "",
             "| mode | seconds | peak memory MB | what it includes |", "|---|---|---|---|"]
    what = {"old base (old tasks)": "calibrate the old tasks + quantize (the starting point, for reference)",
            "full (all tasks, from scratch)": "load fp base, calibrate every task, quantize every layer, write",
            "offline incremental": "calibrate the new task only (layer-by-layer fp source), re-quantize, write",
            "online incremental (while serving)": "same as offline plus the per-layer swaps into the served "
                                                  "model, sharing the CPU with serving"}  # fmt: skip
    for mode, c in res["cost"].items():
        lines.append(f"| {mode} | {c['seconds']:.1f} | {c.get('peak_mb', float('nan')):.0f} | {what.get(mode, '')} |")
    on = res["cost"].get("online incremental (while serving)", {})
    if on.get("phases"):
        lines += ["", "Online phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in on["phases"].items()) + "."]
    lines += ["", "Peak memory: process peak RSS on CPU (each mode in its own process: the online row is the "
              f"serving process, {res.get('load', {}).get('rss_serving_mb', float('nan')):.0f} MB resident just before the "
              "addition), `torch.cuda.max_memory_allocated` on CUDA.", ""]
    return lines


def run_markdown(args: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """One run's sections (its title is a level-1 heading)."""
    lines = _md_header(args, res)
    if "eval" in res:
        lines += _md_quality(args, res)
    return lines + _md_load(args, res) + _md_cost(args, res)


def load_run(path: str | Path, defaults: argparse.Namespace | None = None) -> tuple[argparse.Namespace, dict]:
    """A results JSON and the arguments it was run with (over ``defaults`` for keys older runs lack)."""
    res = json.loads(Path(path).read_text())
    if "args" not in res:
        raise ValueError(f"{path}: not a dynamic.py results JSON (no 'args')")
    return argparse.Namespace(**{**vars(defaults or argparse.Namespace()), **res["args"]}), res


def _demote(lines: list[str]) -> list[str]:
    return ["#" + line if line.startswith("#") else line for line in lines]


def _section_title(args: argparse.Namespace, res: dict[str, Any]) -> str:
    model = "SmolLM2-135M-Instruct (bundled)" if args.model == "default" else Path(str(args.model)).name
    return f"{res.get('device', args.device)}, {model}, requant duty cycle {args.duty_cycle}"


def merge_page(runs: list[tuple[argparse.Namespace, dict[str, Any]]], notes: str | Path | None = None) -> str:
    """The page for one run (as the driver writes it) or several (one section each), then ``notes``."""
    if not runs:
        raise ValueError("merge_page needs at least one run")
    if len(runs) == 1:
        lines = run_markdown(*runs[0])
    else:
        lines = [f"# Dynamic task addition: {len(runs)} runs", "",
                 "Each section is one run of `benchmarks/dynamic.py`, with its own status line and command:", ""]
        lines += [f"{k}. {_section_title(a, r)}" for k, (a, r) in enumerate(runs, 1)] + [""]
        for k, (a, r) in enumerate(runs, 1):
            body = run_markdown(a, r)
            body[0] = f"# {k}. {_section_title(a, r)}"
            lines += _demote(body)
    if notes and Path(notes).is_file():
        lines += [Path(notes).read_text().rstrip(), ""]
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    """The driver's command line (the page reads these back from each run's JSON ``args``)."""
    from inlaid.config import ModelConfig  # no torch: config.py never imports it

    p = argparse.ArgumentParser(description="Dynamic task addition benchmark (issue 7); see benchmarks/dynamic.py")
    p.add_argument("--model", default="default")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--old", nargs="+", default=["translate_en_de", "math_gsm", "trivia_qa"])
    p.add_argument("--new", default="translate_en_fr")
    p.add_argument("--method", default="mlgptq-diag", help="mlgptq-diag (default) | mlgptq | mlgptq-psd | gptq-mixed")
    p.add_argument("--tiny", action="store_true", help="tiny random model, random adapters, synthetic data")
    p.add_argument("--adapters-dir", default=str(ROOT / "inlaid" / "adapters"), help="PEFT adapters, one dir per task")
    p.add_argument("--data-dir", default=None, help="task data root (default: the package's; --tiny sets it)")
    p.add_argument("--from-json", default=None, metavar="A.json,B.json",
                   help="only regenerate --out from these results JSONs (several: one section per run)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=20, help="test examples per task for the answer NLL")
    p.add_argument("--gen-limit", type=int, default=0, help="test examples per task for the generated metric (0: none)")
    p.add_argument("--gen-max-tokens", type=int, default=None, help="cap on generated tokens for the metric")
    p.add_argument("--no-fp-reference", action="store_true", help="skip the unquantized base's quality row")
    p.add_argument("--notes", default=None, help="markdown file appended to the page (hand-written reading)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--requant-threads", type=int, default=1)
    p.add_argument("--cache-dequantized", action="store_true",
                   help="load test: serve with gptq_dequant_cache on (faster CPU steps); without it, off")
    p.add_argument("--duty-cycle", type=float, default=ModelConfig().requant_duty_cycle,
                   help="the re-quantization worker's share of wall time (requant_duty_cycle; default: the engine's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads per process (0: torch's default). On a shared CPU, 1 avoids "
                        "OpenMP oversubscription, which made GPTQ's small ops 10-15x slower on 2 busy cores")
    p.add_argument("--requant-timeout", type=float, default=600.0,
                   help="online run: give up waiting for the addition after this many seconds (the page is then "
                        "written with what completed, the last job status and every thread's stack in the log)")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="the requantizer's watchdog: fail the job after this many seconds without progress")
    p.add_argument("--warmup-seconds", type=float, default=5.0,
                   help="load test: serve this long before the 'before' phase starts (graph captures, kernel "
                        "compiles), excluded from every phase")
    p.add_argument("--work", default="/tmp/inlaid_dynamic")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic.md"))
    return p.parse_args()

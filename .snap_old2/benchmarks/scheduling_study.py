"""Simulated scheduling study: fifo vs mlfq vs inlaid at rising rates and 10/100/1000 tasks.

Regenerates ``benchmarks/results/scheduling.md`` and its PNGs with one command:

    PYTHONPATH=. python benchmarks/scheduling_study.py [--requests 1500] [--quick]
        [--cost-model benchmarks/results/cost_model.json]
        [--gpu-cost-model benchmarks/results/cost_model_h200_w4_7b.json]
        [--h100-cost-model benchmarks/results/cost_model_cuda.json]
    PYTHONPATH=. python benchmarks/scheduling_study.py --engine-sections-only   # after engine_vs_sim.py

Three cost models, one section each: the GPU one (``gpu``, fitted by
``inlaid.sim.serving_replay`` to the H200 W4 7B serving sweep, with its
prefill-step term; the study's engine shape and workload job size follow that
sweep's engine and workload), the older H100 SmolLM2 fit (``h100``, no
prefill-step term: what the policy does without that overhead) and the one
fitted on this machine's CPU (``fit_cost_model.py``). A missing GPU file falls
back to an ASSUMED GPU-like model (labelled as such). Request rates are
fractions of FIFO's saturation throughput under each cost model, so the sweep
covers light load to overload whatever the speed. Everything runs through
``inlaid.sim`` (the real ``core`` Scheduler + fake runner + step-cost model).
"""

from __future__ import annotations

import argparse
import math
import dataclasses
import logging
import time
from pathlib import Path

from tqdm import tqdm

from inlaid.bench.task_lengths import load_task_lengths
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.mlfq import MlfqPolicy
from inlaid.core.predictor import LengthPredictor
from inlaid.request import Request
from inlaid.sampling import SamplingParams
from inlaid.sim.cost_model import StepCostModel, gpu_like_cost_model, load_cost_model
from inlaid.sim.simulator import EngineShape
from inlaid.sim.study import StudySetup, fmt_ratio, markdown_table, ratios, run_policy, saturation_rate, sweep, workload

log = logging.getLogger("scheduling_study")
HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
POLICIES = ("fifo", "mlfq", "inlaid")
LOADS = (0.5, 0.8, 1.0, 1.3, 1.8)
"""Request rates as multiples of FIFO's saturation throughput."""
SHAPE = EngineShape(num_blocks=512, block_size=16, num_adapter_slots=16, max_model_len=4096)
"""Engine shape of the CPU and H100 sections (the GPU section takes its shape from its cost-model file)."""
AGING_REQUESTS = 2000
"""Starvation bound of mlfq and inlaid, in requests: aging_s = AGING_REQUESTS / (FIFO saturation rate at
100 tasks), i.e. the time to serve that many requests at capacity, so the bound scales with the cost
model (seconds on a GPU, tens of minutes on this CPU). A bound below the queueing delay of an overloaded
run (e.g. the config default of 10 s) makes most requests "starving": the order falls back to FIFO and
starving requests hold the line for an adapter slot, which empties the batch."""
ADAPTER_BYTES_7B_R16 = 2 * 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
"""bf16 rank-16 LoRA on all 7 projections of 32 Llama-2-7B layers (~80 MB)."""
KEYS = ("throughput_rps", "latency_mean", "latency_p99", "ttft_mean", "jct_mean", "slo_attainment",
        "preemptions", "distinct_adapters_per_step", "adapter_loads_per_s", "mean_batch")


class OraclePolicy(InlaidPolicy):
    """Benchmark-only upper bound: the inlaid policy told each request's true output length."""

    def __init__(self, truth: dict[str, int], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.truth = truth

    def remaining(self, req: Request) -> float:
        return float(max(self.truth[req.request_id] - req.num_output_tokens, 1))


def ablation(setup: StudySetup, n: int, rate: float, tasks: int) -> list[dict]:
    specs = workload(n, rate, tasks, setup, seed=2)
    aging = setup.sched_cfg("inlaid").aging_s
    variants = {"inlaid (full)": {}, "no prediction": {"use_prediction": False},
                "no grouping": {"use_grouping": False}, "no aging": {"use_aging": False},
                "fixed aging (aging_s, not adaptive)": {"adaptive_aging": False},
                "no prefill batching": {"prefill_batching": False},
                "LRU slot eviction (policy-aware off)": {"use_policy_eviction": False}, "oracle lengths": {}}
    rows = [{"variant": "fifo", **run_policy(specs, setup.sched_cfg("fifo"), setup.shape, setup.cost)}]
    mlfq_cfg = setup.sched_cfg("mlfq")
    mlfq_variants = {"mlfq (guarded preemption: default)": {},
                     "mlfq, unguarded preemption (FastServe's, by recompute)": {"preempt_level_gap": 1,
                                                                               "min_run_tokens": 0},
                     "mlfq without priority preemption": {"priority_preemption": False}}
    for name, kw in mlfq_variants.items():
        mp = MlfqPolicy(starvation_s=mlfq_cfg.aging_s, **kw)  # type: ignore[arg-type]
        rows.append({"variant": name, **run_policy(specs, mlfq_cfg, setup.shape, setup.cost, policy=mp)})
    for name, kw in tqdm(variants.items(), desc="ablation"):
        if name == "oracle lengths":
            pol: InlaidPolicy = OraclePolicy({s.request_id: s.output_len for s in specs},
                                             max_adapters_per_step=setup.beta, aging_s=aging)
        else:
            pol = InlaidPolicy(max_adapters_per_step=setup.beta, aging_s=aging, predictor=LengthPredictor(), **kw)
        rows.append({"variant": name, **run_policy(specs, setup.sched_cfg("inlaid"), setup.shape, setup.cost,
                                                    policy=pol, predictor=pol.predictor)})
    return rows


MLFQ_GUARDS = ((1, 0), (1, 16), (1, 32), (1, None), (2, 0), (2, 16), (2, None), (3, 0))
"""(preempt_level_gap, min_run_tokens) pairs swept for MLFQ; None = the victim's level quantum; (1, 0) is
FastServe's unguarded preemption, (2, None) the default."""


def mlfq_guard_sweep(setup: StudySetup, n: int, points: list[tuple[int, float]]) -> list[dict]:
    """MLFQ throughput and latency relative to FIFO per guard setting at (tasks, load) points."""
    cfg = setup.sched_cfg("mlfq")
    rows: dict[str, dict] = {}
    for tasks, load in tqdm(points, desc="mlfq guards"):
        specs = workload(n, saturation_rate(setup, tasks) * load, tasks, setup, seed=5)
        fifo = run_policy(specs, setup.sched_cfg("fifo"), setup.shape, setup.cost)
        for gap, run in MLFQ_GUARDS + ((0, 0),):
            kw = {"priority_preemption": False} if gap == 0 else {"preempt_level_gap": gap, "min_run_tokens": run}
            name = "no priority preemption" if gap == 0 else \
                f"gap {gap}, min run {'quantum' if run is None else run}"
            m = run_policy(specs, cfg, setup.shape, setup.cost,
                           policy=MlfqPolicy(starvation_s=cfg.aging_s, **kw))  # type: ignore[arg-type]
            row = rows.setdefault(name, {"guard": name})
            row[f"{tasks}t {load}x thr"] = m["throughput_rps"] / fifo["throughput_rps"]
            row[f"{tasks}t {load}x lat"] = m["latency_mean"] / fifo["latency_mean"]
    return list(rows.values())


def jobs_study(setup: StudySetup, n: int, rate: float, tasks: int) -> list[dict]:
    specs = workload(n, rate, tasks, setup, seed=3, job_size=8)
    return [{"policy": p, **run_policy(specs, setup.sched_cfg(p), setup.shape, setup.cost)} for p in POLICIES]


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else 0.0


def predictor_quality(n: int, tasks: int) -> dict[str, float]:
    """Online predict-then-observe over a workload; compare with a length-oblivious running mean."""
    specs = workload(n, 1.0, tasks, StudySetup(), seed=4)
    pred = LengthPredictor()
    ours, base, truth = [], [], []
    total = 0.0
    for i, s in enumerate(specs):
        req = Request(s.request_id, [1] * s.prompt_len, SamplingParams(max_tokens=s.max_tokens), adapter=s.adapter)
        ours.append(pred.predict(req))
        base.append(total / i if i else pred.prior_mean)
        truth.append(float(s.output_len))
        req.output_token_ids.extend([1] * s.output_len)
        pred.observe(req)
        total += s.output_len
    mae = lambda p: sum(abs(x - y) for x, y in zip(p, truth)) / len(truth)  # noqa: E731
    return {"tasks": tasks, "mae_predictor": mae(ours), "mae_oblivious": mae(base),
            "spearman_predictor": spearman(ours, truth), "spearman_oblivious": spearman(base, truth)}


def plot(rows: list[dict], tasks: list[int], metric: str, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for p in POLICIES:
            pts = [(r["load"], r[metric]) for r in rows if r["tasks"] == t and r["policy"] == p]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_title(f"{t} tasks ({label})")
        ax.set_xlabel("offered load (x FIFO saturation rate)")
        ax.set_ylabel(metric)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Section:
    """One cost model's part of the study: its model, where it came from, engine shape and workload job size."""

    key: str
    label: str
    cost: StepCostModel
    prov: str
    shape: EngineShape = SHAPE
    job_size: int = 1


def _gpu_section(path: Path) -> Section:
    """The H200 fit of the serving sweep (engine shape and job size from its metadata), or the assumed model."""
    if not path.is_file():
        return Section("gpu", "GPU-like (ASSUMED)", gpu_like_cost_model(ADAPTER_BYTES_7B_R16),
                       "**assumed, not measured** (7B-on-one-GPU magnitudes; adapter load = 80 MB / 12 GB/s); "
                       "write `cost_model_h200_w4_7b.json` with `python -m inlaid.sim.serving_replay`")
    gpu, gm = load_cost_model(path)
    eng, wl = gm.get("engine", {}), gm.get("workload", {})
    shape = EngineShape(num_blocks=int(eng.get("num_blocks", 2048)), block_size=int(eng.get("block_size", 16)),
                        num_adapter_slots=int(eng.get("slots", 32)), max_model_len=4096)
    prov = (f"`{path.name}`: fitted on {gm.get('device')} to {len(gm.get('fitted_on', []))} recorded runs "
            f"({', '.join(gm.get('fitted_on', []))}; `{gm.get('source')}`), mean |first-token, finish| error "
            f"{1000 * gm.get('fit_error_s', float('nan')):.0f} ms; engine {eng.get('model')} {eng.get('quant')}, "
            f"{eng.get('adapters')} adapters, {shape.num_adapter_slots} slots, {shape.num_blocks} KV blocks; "
            f"workload job size {wl.get('job_size', 1)} as in that sweep")
    return Section("gpu", "GPU-fitted (H200, W4 Llama-2-7B shapes, with prefill-step term)", gpu, prov, shape,
                   int(wl.get("job_size", 1)))


def cost_models(args: argparse.Namespace) -> list[Section]:
    """The sections of the study: GPU (H200 fit), H100 SmolLM2 fit (if present), CPU fit."""
    out = [_gpu_section(args.gpu_cost_model)]
    if args.h100_cost_model is not None and args.h100_cost_model.is_file():
        h, hm = load_cost_model(args.h100_cost_model)
        out.append(Section("h100", "H100 SmolLM2-135M fit (no prefill-step term)", h,
                           f"`{args.h100_cost_model.name}`: fitted on {hm.get('device')} from {hm.get('samples')} "
                           f"engine steps ({hm.get('model')}), R² = {hm.get('r2', float('nan')):.3f}; no "
                           "prefill-step term, so inlaid's prefill batching stays off"))
    cpu, meta = load_cost_model(args.cost_model)
    out.append(Section("cpu", "CPU-fitted", cpu, f"fitted on {meta.get('device')} from {meta.get('samples')} engine "
                       f"steps ({meta.get('model')}, {meta.get('dtype')}), R² = {meta.get('r2', float('nan')):.3f}"))
    return out


def study_one(setup: StudySetup, n: int, tasks: list[int], loads: tuple[float, ...]) -> tuple[list[dict], float]:
    rows = []
    sat100 = 0.0
    for t in tqdm(tasks, desc="tasks"):
        sat = saturation_rate(setup, t)
        sat100 = sat if t == 100 or not sat100 else sat100
        for r in sweep(setup, n, [round(sat * x, 4) for x in loads], [t], POLICIES):
            rows.append({**r, "load": round(r["rate"] / sat, 2)})
    return rows, sat100


def targets(ratio_rows: list[dict]) -> list[dict]:
    """Issue-5 targets per task count at the highest load: met (yes/no) with the value."""
    out = []
    for t in sorted({r["tasks"] for r in ratio_rows}):
        f = next(r for r in ratio_rows if r["tasks"] == t and r["vs"] == "fifo")
        m = next(r for r in ratio_rows if r["tasks"] == t and r["vs"] == "mlfq")
        better = m["throughput_x"] >= 1 and m["latency_reduction"] > 0 and m["slo_inlaid"] >= m["slo_base"]
        out.append({"tasks": t,
                    "throughput ≥1.26x": f"{'yes' if f['throughput_x'] >= 1.26 else 'no'} ({f['throughput_x']:.2f}x)",
                    "latency ≥30% lower": f"{'yes' if f['latency_reduction'] >= 0.30 else 'no'} "
                                          f"({100 * f['latency_reduction']:.0f}%)",
                    "JCT ≥24% lower": f"{'yes' if f['jct_reduction'] >= 0.24 else 'no'} ({100 * f['jct_reduction']:.0f}%)",
                    "SLO ≥3x": f"{'yes' if f['slo_x'] >= 3 else 'no'} ({fmt_ratio(f['slo_x'])})",
                    "max possible throughput_x": f"{f['bound_x']:.2f}x",
                    "better than mlfq": "yes" if better else "no"})
    return out


def section(sec: Section, setup: StudySetup, rows: list[dict], abl: list[dict],
            jobs: list[dict], sat: float, loads: tuple[float, ...], guards: list[dict]) -> list[str]:
    key, label, prov = sec.key, sec.label, sec.prov
    hi = [r for r in rows if r["load"] == loads[-1]]
    ratio_rows = []
    for t in sorted({r["tasks"] for r in hi}):
        ratio_rows += ratios([r for r in hi if r["tasks"] == t], next(r["rate"] for r in hi if r["tasks"] == t))
    sat_rows = [r for r in rows if r["load"] == 1.0]
    sat_ratios = []
    for t in sorted({r["tasks"] for r in sat_rows}):
        sat_ratios += ratios([r for r in sat_rows if r["tasks"] == t], next(r["rate"] for r in sat_rows if r["tasks"] == t))
    figs = "".join(f"![{m}](scheduling_{key}_{m}.png)\n" for m in ("throughput_rps", "latency_mean", "slo_attainment",
                                                                   "jct_mean"))
    return [
        f"## Cost model: {label}\n",
        f"- Coefficients (s): {dataclasses.asdict(setup.cost)}; {prov}.",
        f"- Engine shape: {setup.shape}; max_num_seqs {setup.max_num_seqs}, max_num_batched_tokens "
        f"{setup.max_num_batched_tokens}, β = {setup.beta}; requests per job in the sweep: {setup.job_size} "
        "(JCT = latency when 1).",
        f"- inlaid aging: adaptive, floor aging_s = {setup.sched_cfg('inlaid').aging_s} s (config default); "
        f"mlfq starvation threshold = {setup.mlfq_starvation_s} s.",
        f"- FIFO saturation throughput at 100 tasks: {sat:.3g} req/s. Loads swept: {loads} x that (per task count).\n",
        f"### inlaid vs baselines at the highest load ({loads[-1]}x)\n",
        markdown_table(ratio_rows, ["tasks", "vs"], ("throughput_x", "bound_x", "latency_reduction", "jct_reduction",
                                                      "slo_x", "slo_inlaid", "slo_base")),
        "\n`bound_x` = the throughput upper bound of this trace (`inlaid.sim.study.throughput_bound`: no policy "
        "can beat it) / the baseline's throughput: the most any policy could gain.\n",
        "\nTargets at this load (vs FIFO; 'better than mlfq' = throughput, latency and SLO all at least MLFQ's):\n",
        markdown_table(targets(ratio_rows), ["tasks"], ("throughput ≥1.26x", "max possible throughput_x",
                                                        "latency ≥30% lower", "JCT ≥24% lower", "SLO ≥3x",
                                                        "better than mlfq")),
        "\n### inlaid vs baselines at load 1.0x\n",
        markdown_table(sat_ratios, ["tasks", "vs"], ("throughput_x", "bound_x", "latency_reduction", "jct_reduction",
                                                     "slo_x", "slo_inlaid", "slo_base")),
        "\n### Full sweep\n", markdown_table(rows, ["tasks", "load", "rate", "policy"], KEYS + ("throughput_bound",)), "\n" + figs,
        f"### Jobs (bursts of 8 requests of one task), load {loads[-2]}x, 100 tasks\n",
        markdown_table(jobs, ["policy"], KEYS),
        "\n### Ablation (100 tasks, same trace per load)\n", markdown_table(abl, ["load", "variant"], KEYS), "",
        "\n### MLFQ preemption guards (MLFQ / FIFO: throughput `thr`, mean latency `lat`; same trace per point)\n",
        "Recompute preemption needs a guard that FastServe (KV swap) does not; `gap` = how many levels more "
        "urgent the waiting request must be, `min run` = output tokens the victim must have generated since it "
        "was (re)admitted. Default: gap 2, min run = quantum.\n",
        markdown_table(guards, ["guard"], [k for k in guards[0] if k != "guard"]) if guards else "", "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--quick", action="store_true", help="fewer loads, tasks and requests (smoke run)")
    ap.add_argument("--cost-model", type=Path, default=OUT / "cost_model.json")
    ap.add_argument("--gpu-cost-model", type=Path, default=OUT / "cost_model_h200_w4_7b.json",
                    help="GPU fit with the prefill-step term (python -m inlaid.sim.serving_replay writes it)")
    ap.add_argument("--h100-cost-model", type=Path, default=OUT / "cost_model_cuda.json",
                    help="older H100 SmolLM2 fit without the prefill-step term; a missing file skips its section")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--engine-sections-only", action="store_true",
                    help="only replace the engine-vs-simulator sections of an existing scheduling.md with the "
                         "current engine_vs_sim_*.md (after re-running engine_vs_sim.py)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.engine_sections_only:
        refresh_engine_sections(args.out)
        return
    n = 150 if args.quick else args.requests
    loads = (0.8, 1.8) if args.quick else LOADS
    tasks = [10, 100] if args.quick else [10, 100, 1000]
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    md = header(n, tasks)
    for sec in cost_models(args):
        probe = StudySetup(shape=sec.shape, cost=sec.cost, job_size=sec.job_size)
        setup = dataclasses.replace(probe, mlfq_starvation_s=round(AGING_REQUESTS / saturation_rate(probe, 100), 1))
        rows, sat = study_one(setup, n, tasks, loads)
        abl = [{"load": x, **r} for x in (1.0, loads[-1]) for r in ablation(setup, n, sat * x, 100)]
        jobs = jobs_study(setup, n, sat * loads[-2], 100)
        guards = mlfq_guard_sweep(setup, min(n, 600), [(10, 1.0), (100, 1.0), (100, loads[-1])])
        for metric in ("throughput_rps", "latency_mean", "slo_attainment", "jct_mean"):
            plot(rows, tasks, metric, args.out / f"scheduling_{sec.key}_{metric}.png", sec.label)
        md += section(sec, setup, rows, abl, jobs, sat, loads, guards)
    pq = [predictor_quality(max(n, 1000), t) for t in tasks]
    md += ["## Length predictor quality (online predict-then-observe, task-suite lengths)\n",
           markdown_table(pq, ["tasks"], ("mae_predictor", "mae_oblivious", "spearman_predictor", "spearman_oblivious")),
           "\nThe length-oblivious baseline predicts the running mean of all outputs so far.\n"]
    md[1] = md[1].replace("{secs}", f"{time.time() - t0:.0f}")
    (args.out / "scheduling.md").write_text("\n".join(md) + "\n" + engine_section(args.out))
    log.info("wrote %s in %.0f s", args.out / "scheduling.md", time.time() - t0)


NOTES = """## Notes (read before the tables)

Three cost models, one section each. **Read the GPU section first**: it is the model fitted to our real
GPU engine (H200, W4 Llama-2-7B shapes, 100 adapters, 32 slots) and the only one with the ~0.1 s
prefill-step overhead that the engine shows. The H100 SmolLM2 fit (no prefill-step term) is kept as the
"what the paper's ingredients do alone" contrast; the CPU fit is degenerate under load (below).

- **GPU cost model** (`cost_model_h200_w4_7b.json`, written by `python -m inlaid.sim.serving_replay`): step =
  16 ms + 100 ms if the step prefills anyone + 0.4 ms per decoding sequence (prefill tokens, adapters and loads
  ~0), grid-fitted so that the simulator reproduces the per-request first-token and finish times of all 9
  complete runs of the session-3 H200 serving sweep (fifo/mlfq/inlaid at 1.0x and 1.5x the engine's saturation
  probe, the three ablations at 1.5x; mean timeline error 212 ms, 0.10-0.38 s per run). decode_seq landed on
  its grid's top value (0.4 ms). The section's engine shape and workload follow that sweep: 15352 KV blocks,
  32 slots, max_num_seqs 64, requests arrive in jobs of 4.
- **Targets in the GPU section** (inlaid vs FIFO, same trace; loads are multiples of FIFO's simulated
  saturation rate, 32-35 req/s):
  - above FIFO's saturation every target is met at 10, 100 and 1000 tasks: at 1.8x, 1.76x / 1.90x / 1.56x
    throughput, 92-93% lower mean latency, 90% lower JCT, 25-26x SLO attainment (FIFO attains 4%, inlaid
    96-100%); at 1.3x, 1.31x / 1.40x / 1.14x throughput (1000 tasks misses 1.26x), 86-90% lower latency.
  - **at FIFO's saturation rate itself (1.0x) the 1.26x throughput target is not met and cannot be**: the
    offered load caps any policy's throughput (`bound_x` 1.06 / 1.13 / 1.02x); inlaid gets 1.03 / 1.10 / 1.00x.
    Mean latency is 47% / 79% / 36% lower, JCT 49% / 77% / 39%, SLO 1.16x / 3.05x / 1.01x (FIFO still meets
    86% / 33% / 99%).
  - **better than MLFQ** at every task count and load >= 1.0x (throughput, latency and SLO).
  - Where the throughput comes from: FIFO admits arriving requests in most steps, so most steps pay the
    100 ms prefill overhead; inlaid's prefill batching makes each prefill step admit many requests. Its
    throughput then rises with the load until the trace's bound (`bound_x` 1.63-2.03x at 1.8x: inlaid reaches
    93-95% of the bound), while FIFO's stays at ~32 req/s.
- **Ablation (GPU section, 100 tasks, 1.0x and 1.8x)**: **prefill batching is the whole gain**: without it
  inlaid is FIFO-like (1.8x: 32.6 req/s and 12.0 s mean latency vs 61.3 req/s and 1.19 s). At 1.0x
  prediction, grouping, aging and policy-aware eviction change nothing (identical rows: the queue is drained at
  each prefill step, there is nothing to reorder). At 1.8x: no prediction 1.20 s (vs 1.19 s, SLO 0.85 vs
  0.865: prediction helps ~1%), oracle lengths 1.09 s (8% better: better prediction has a little room), **no
  grouping 1.13 s and SLO 0.879: grouping costs ~5% latency**, no aging identical. **Simulator vs the GPU
  measurement**: the GPU sweep found that removing prediction, grouping or aging each made inlaid *better*
  (6-12% throughput, 18-41% latency, one run each). Simulated on the very traces of those runs with the GPU
  fit, the three ablations are within 1% of full inlaid (1.57-1.58x FIFO; `engine_vs_sim_gpu.md`); on this
  study's 1.8x trace grouping costs ~5% latency, prediction and aging ~nothing. So the simulator agrees in
  sign for grouping only (smaller) and does not reproduce the measured costs of prediction and aging: whatever makes those runs faster on the engine is not in the cost model
  (their step counts differ: 107 steps for inlaid vs 113-122 for the ablations, in less time), or is the
  run-to-run scatter (~6% on the session-2 runs); a step log per run would settle it.
- **H100 SmolLM2 fit (no prefill-step term)**: 33 ms + 0.48 ms per prefill token + 36 ms per adapter load. Here
  the prefill-step overhead the batcher measures is below one decode step, so prefill batching stays off (its
  ablation row still differs by 1-3%, presumably the batcher's probe steps before it has measured the overhead) and what remains is SRTF + grouping + aging. At
  1.8x: 0.98-1.03x FIFO throughput (`bound_x` 1.07 / 1.14 / 1.30x), 29% / 10% / 6% lower latency, 52x / 25x /
  1.25x SLO attainment (absolute: 29-31% vs 0.6-23%). The 1.26x throughput and 30% latency targets are not met
  with this cost model: without a fixed per-step prefill cost there is little for a policy to save.
- **MLFQ (FastServe's skip-join MLFQ) with guarded priority preemption**: quantum doubling, demotion,
  starvation promotion and priority preemption. FastServe swaps the victim's KV cache to host memory; **our
  engine has no KV swap-out, it preempts by recompute**, so a preemption re-prefills prompt + generated
  tokens. The default guard (`MlfqPolicy(preempt_level_gap=2, min_run_tokens=None)`: >= 2 levels more urgent,
  the victim has used its level's quantum) was chosen in the simulator (table per section, `docs/scheduling.md`).
  In the GPU section MLFQ is 0.98-1.02x FIFO's throughput at loads >= 1.0x, with up to 16% lower mean latency
  but a 1.8-2.8x longer p99 above saturation (~110-150 preemptions); the unguarded rule re-prefills 600-1060
  times (ablation). **KV swap-out is the
  engine feature missing for a FastServe-faithful baseline.**
- **Aging**: a starving request reserves the next slot to free; everyone else keeps running. The inlaid
  default is adaptive (a request's deadline is fixed at arrival to max(aging_s, 4 x queue length / measured
  service rate)). In the GPU section it never triggers (no aging = identical rows); in the H100 section it
  costs mean latency and bounds the tail (1.8x: no aging 10.1 s mean / 40.3 s p99 vs 10.9 s / 36.2 s).
- **Policy-aware slot eviction** changes nothing measurable (under load a slot frees only when its adapter's
  last request finishes and is reused at once).
- **CPU cost model**: fitted on a shared 2-core machine (R² 0.6, no batching economy): overloaded points are
  degenerate (every policy misses nearly every SLO); it is kept because `engine_vs_sim.py` uses it.
- **Engine vs simulator** (sections at the end, from `engine_vs_sim.py`; copied in by this script, refreshed
  alone by `--engine-sections-only`): the real engine on the bundled model (CPU) and the simulator on the same
  small trace, with the engine's clock advanced by the CPU cost model of each step it executed (model clock:
  checks the simulator's decisions, not its cost model), re-run with the current policies. With the CPU fit
  (prefill batching stays off) the numbers are unchanged from the old policy: every metric matches exactly,
  inlaid > FIFO = MLFQ on throughput, FIFO = MLFQ > inlaid on latency, no SLO met (weak evidence). With the
  GPU fit as the clock (`_gpu` section, 30 req/s virtual) prefill batching engages in the real engine too and
  every metric of every policy still matches exactly: inlaid 20.0 vs 11.6 req/s (1.72x), 1.12 s vs 2.34 s mean
  latency, 70% vs 20% SLO; same ranking on every metric (inlaid > FIFO = MLFQ). The measured-clock section is
  the old policy's (not re-run: the shared CPU is too noisy for it). The GPU check (the simulator with the GPU fit against the measured H200 runs) is in
  `engine_vs_sim_gpu.md`.
- Prompt lengths are the raw task prompts (no chat template); outputs are completion tokens + EOS.
"""


def header(n: int, tasks: list[int]) -> list[str]:
    suite, counter = load_task_lengths()
    cfg = StudySetup(shape=SHAPE).sched_cfg("inlaid")
    return [
        "# Scheduling study (simulated)\n",
        "Generated by `PYTHONPATH=. python benchmarks/scheduling_study.py` ({secs} s on this machine). "
        "Real `inlaid.core` Scheduler, fake runner (true lengths hidden from the scheduler), step-cost model.\n",
        f"- Engine shape: per section (the GPU section: the serving sweep's engine; CPU and H100: {SHAPE}); "
        f"max_num_seqs {cfg.max_num_seqs}, max_num_batched_tokens "
        f"{cfg.max_num_batched_tokens}, β = {cfg.max_adapters_per_step}; mlfq starvation threshold = "
        f"the time to serve {AGING_REQUESTS} requests at FIFO's saturation rate (per cost model, below); inlaid "
        "aging adaptive (default floor).",
        f"- Workload: {n} requests per point (jobs of 4 requests in the GPU section, as in the serving sweep; "
        f"single requests elsewhere), Gamma arrivals (CV 1), power-law (α=1) popularity over {tasks} tasks; "
        f"lengths sampled from the task suite ({len(suite)} tasks, tokens counted with {counter}; task i uses suite "
        "task i mod 12; output = completion + EOS), max_tokens 512.",
        "- SLO: latency ≤ 5 × the request's isolated run time (same cost model).",
        "- Targets (issue 5, vs FIFO): throughput ≥ 1.26× at saturation, mean latency ≥ 30% lower, JCT ≥ 24% lower, "
        "several-fold SLO attainment at high load; and better than MLFQ.\n",
        NOTES,
    ]


def engine_section(out: Path) -> str:
    """The engine-vs-simulator sections written by ``engine_vs_sim.py`` (model and measured clocks), kept
    across regenerations."""
    parts = [(out / f"engine_vs_sim_{c}.md") for c in ("model", "model_gpu", "measured")]
    found = [p.read_text() for p in parts if p.is_file()]
    return "\n".join(found) if found else "## Engine vs simulator\n\nNot run yet: `benchmarks/engine_vs_sim.py`.\n"


def refresh_engine_sections(out: Path) -> None:
    """Replace everything from the first engine-vs-simulator heading of ``scheduling.md`` on."""
    page = out / "scheduling.md"
    text = page.read_text()
    cut = text.find(ENGINE_HEADING)
    if cut < 0:
        raise ValueError(f"{page} has no {ENGINE_HEADING!r} section: regenerate it without --engine-sections-only")
    page.write_text(text[:cut] + engine_section(out))
    log.info("refreshed the engine-vs-simulator sections of %s", page)


ENGINE_HEADING = "## Engine vs simulator"


if __name__ == "__main__":
    main()

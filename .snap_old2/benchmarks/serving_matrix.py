"""The end-to-end serving matrix (issue 9): policies x rates x adapter counts x {fp16, W4} x model shapes.

For every (model, quant, adapters, policy) point it starts a real ``inlaid serve``
subprocess (dummy weights of the model's shapes: ``--load-format dummy`` for
fp16, a random GPTQ W4 checkpoint written once per model for W4), registers N
synthetic PEFT adapters (``inlaid.lora.synthetic``, ranks cycling over
``--ranks``, written once as ``--distinct-adapters`` directories and registered
under N names ``t0..t{N-1}`` through ``POST /v1/load_lora_adapter``), then runs
``inlaid bench serve`` (the CLI, in this process) once per request rate and
stops the server with SIGTERM. Each point writes ``json/<point>_r<rate>.json``;
points whose JSON exists are skipped, so the matrix can be split over several
device calls (``--budget-s`` stops starting new servers after that many
seconds). At the end it regenerates the results page (tables, inlaid-vs-fifo
and inlaid-vs-mlfq ratios, plots) from every JSON present.

GPU (split over several calls within the device limits):

    PYTHONPATH=. python benchmarks/serving_matrix.py --device cuda --models llama2-7b-shapes \\
        --quants fp16 w4 --adapters 10 100 --rates 2 4 8 --budget-s 540

On the device the matrix runs as parallel parts (``benchmarks/device/serving.sh``: one process per part,
``--no-page``, JSONs under ``--run-name json_s4``), and the page is built once from all of them with
``--page-only --run-name json_s4 --history json json_session2`` (earlier sessions shown apart, at the end).
The page also checks issue 9's targets, analyses the runs' step logs per policy and puts the simulator's
prediction (``--cost-model``) next to every measured engine-driver point.

CPU smoke run (tiny random Llama, 2 policies, 2 rates, few requests; < 2 minutes on 2 cores):

    PYTHONPATH=. python benchmarks/serving_matrix.py --quick

It writes ``benchmarks/results/serving_cpu_quick.md`` (clearly labelled: a
check that the pipeline works end to end, not the GPU experiment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from inlaid.bench.serving_page import write_page
from inlaid.cli import main as inlaid_main

logger = logging.getLogger("serving_matrix")
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- models and adapters

def dummy_w4_dir(model_dir: Path, out: Path, group_size: int = 128, seed: int = 0) -> Path:
    """A GPTQ 4-bit checkpoint of ``model_dir``'s shapes with random codes (the W4 twin of dummy weights)."""
    import torch

    from inlaid.model.arch import ModelArch
    from inlaid.model.llama import LlamaForCausalLM
    from inlaid.quant.linear import PROJECTIONS
    from inlaid.quant.pack import quantization_config, save_quantized_checkpoint

    if (out / "quantize_config.json").is_file():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    arch = ModelArch.from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    shapes = arch.lora_module_shapes()
    g = group_size if all(k % group_size == 0 for k, _ in shapes.values()) else 32  # one group size for all
    for i in range(arch.num_layers):
        for rel in PROJECTIONS:
            k, n = shapes[rel.split(".")[1]]
            layers[f"model.layers.{i}.{rel}"] = {
                "qweight": torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32),
                "qzeros": torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32),
                "scales": torch.full((k // g, n), 0.02 / 8, dtype=torch.float16),
                "g_idx": torch.arange(k, dtype=torch.int32) // g}
    dense = LlamaForCausalLM(arch, device=torch.device("meta"), dtype=torch.float16)
    skip = {f"{q}.weight" for q in layers}
    other = {name: (torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02).half()
             for name, p in dense.named_parameters() if name not in skip}
    qc = quantization_config(4, g, sym=False, desc_act=False, static_groups=False)
    return save_quantized_checkpoint(out, layers, qc, other, config)


def adapter_dirs(model_dir: Path, out: Path, count: int, ranks: list[int], targets: list[str]) -> list[str]:
    """``count`` distinct random PEFT adapters of the model's shapes (ranks cycling), written once."""
    from inlaid.lora.synthetic import random_adapter, save_peft
    from inlaid.model.arch import ModelArch

    arch = ModelArch.from_dir(model_dir)
    dirs = []
    for i in range(count):
        d = out / f"a{i}_r{ranks[i % len(ranks)]}"
        if not (d / "adapter_config.json").is_file():
            ad = random_adapter(d.name, arch.lora_module_shapes(), arch.num_layers, ranks[i % len(ranks)],
                                targets, seed=i + 1)
            save_peft(ad, d)
        dirs.append(str(d))
    return dirs


# ---------------------------------------------------------------- one server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``inlaid serve`` in a subprocess; log to a file; SIGTERM on exit."""

    def __init__(self, args: list[str], log: Path, start_timeout: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "inlaid.cli", "serve", "--port", str(self.port), *args]
        self.log, self.start_timeout = log, start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._fh = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-1500:]
                raise RuntimeError(f"server exited with {self.proc.returncode}; {self.log} ends with:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"server did not become healthy in {self.start_timeout}s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()

    def register(self, dirs: list[str], n: int) -> float:
        """Register ``n`` adapters t0..t{n-1} (cycling over ``dirs``); returns the seconds it took."""
        t0 = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=600) as c:
            for i in range(n):
                r = c.post("/v1/load_lora_adapter", json={"lora_name": f"t{i}", "lora_path": dirs[i % len(dirs)]})
                if r.status_code != 200:
                    raise RuntimeError(f"load_lora_adapter t{i}: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - t0


# ---------------------------------------------------------------- the matrix

def point_name(model: str, quant: str, n: int, policy: str) -> str:
    return f"{Path(model).name}_{quant}_{n}a_{policy}"


def server_args(a: argparse.Namespace, model: str, quant: str, policy: str) -> list[str]:
    args = ["--model", model, "--policy", policy, "--device", a.device, "--max-loras", str(a.slots),
            "--max-lora-rank", str(max(a.ranks)), "--lora-target-modules", ",".join(a.targets),
            "--max-num-seqs", str(a.max_num_seqs)]
    if quant == "fp16":
        args += ["--load-format", "dummy"]
    if a.device != "cpu":
        args += ["--dtype", "float16"]
    if a.num_blocks:
        args += ["--num-blocks", str(a.num_blocks)]
    return args


def bench_args(a: argparse.Namespace, url: str, rate: float, n: int, policy: str, extra: dict, out: Path,
               prefix: str | None = "t") -> list[str]:
    args = ["bench", "serve", "--url", url, "--num-requests", str(a.num_requests), "--rate", str(rate),
            "--cv", str(a.cv), "--popularity", a.popularity, "--alpha", str(a.alpha), "--tasks", str(n),
            *(["--adapter-prefix", prefix] if prefix else []), "--lengths", a.lengths, "--max-tokens", str(a.max_tokens),
            "--max-prompt", str(a.max_prompt), "--jobs", str(a.jobs), "--max-duration", str(a.max_duration),
            "--slo-scale", str(a.slo_scale), "--calibrate", str(a.calibrate), "--label", policy, "--out", str(out)]
    for k, v in extra.items():
        args += ["--extra", f"{k}={v}"]
    return args


def run_point(a: argparse.Namespace, work: Path, model: str, quant: str, n: int, policy: str) -> None:
    name = point_name(model, quant, n, policy)
    outs = {r: a.results / a.run_name / f"{name}_r{r:g}.json" for r in a.rates}
    if all(p.is_file() for p in outs.values()):
        logger.info("%s: done already", name)
        return
    model_dir = resolve(model)
    served = str(dummy_w4_dir(model_dir, work / f"{model_dir.name}_w4")) if quant == "w4" else model
    dirs = adapter_dirs(model_dir, work / f"{model_dir.name}_adapters", min(a.distinct_adapters, n), a.ranks,
                        a.targets)
    with ServerProcess(server_args(a, served, quant, policy), (a.logs or work / "logs") / f"{name}.log",
                       a.start_timeout) as srv:
        reg_s = srv.register(dirs, n)
        logger.info("%s: registered %d adapters in %.1fs", name, n, reg_s)
        extra = {"model": Path(model).name, "quant": quant, "adapters": n, "policy": policy,
                 "device": a.device, "register_s": round(reg_s, 2)}
        for rate, out in outs.items():
            if not out.is_file():
                rc = inlaid_main(bench_args(a, srv.url, rate, n, policy, extra, out))
                if rc != 0:
                    logger.error("%s rate %g: bench serve failed (rc %d)", name, rate, rc)


def run_demo(a: argparse.Namespace, work: Path) -> None:
    """``--demo``: the bundled model with its demo adapters (real weights), one ``inlaid serve`` per policy,
    ``bench serve`` per rate over every served adapter (tasks map to /v1/models order); ``--demo-probe N``
    first sends N requests at once to a fifo server (saturation probe, ``saturation_probe.json``)."""
    base = ["--model", "default", "--device", a.device, "--max-loras", str(a.slots), "--max-lora-rank", "64",
            "--max-num-seqs", str(a.max_num_seqs)]
    runs = [("fifo", [a.probe_rate], a.results / "saturation_probe.json")] if a.demo_probe else []
    runs += [(pol, a.rates, None) for pol in a.policies]
    for policy, rates, probe_out in runs:
        tag = f"-{a.demo_tag}" if a.demo_tag else ""
        outs = {r: probe_out or a.results / "json" / f"smollm2-demo{tag}_{policy}_r{r:g}.json" for r in rates}
        if all(p.is_file() for p in outs.values()):
            continue
        log = a.results / "logs" / f"{policy}{tag}.log"
        with ServerProcess(base + ["--policy", policy], log, a.start_timeout) as srv:
            n = len([m for m in httpx.get(srv.url + "/v1/models").json()["data"] if m.get("parent")])
            extra = {"model": f"smollm2-135m-demo{tag}", "quant": "fp32", "adapters": n, "policy": policy,
                     "device": a.device, "machine": "CPU, shared 2-core"}
            for rate, out in outs.items():
                if not out.is_file():
                    b = argparse.Namespace(**{**vars(a), "num_requests": a.demo_probe}) if probe_out else a
                    rc = inlaid_main(bench_args(b, srv.url, rate, n, policy, extra, out, prefix=None))
                    logger.info("demo %s rate %g: rc %d", policy, rate, rc)


def resolve(model: str) -> Path:
    from inlaid.model.loader import resolve_model_path

    return Path(resolve_model_path(model))


def run_engine_sweeps(a: argparse.Namespace) -> None:
    """The in-process driver: per (model, quant, adapters) one engine, every policy/ablation and rate on it
    (``inlaid.bench.policy_sweep``); the budget is shared evenly by the configurations still to run."""
    import gc

    import torch

    from inlaid.bench.policy_sweep import EngineSpec, SweepPlan, build_engine, run_sweep
    from inlaid.bench.workload import WorkloadConfig
    from inlaid.config import SchedulerConfig

    end = time.monotonic() + a.budget_s
    configs = [(m, q, n) for m in a.models for q in a.quants for n in a.adapters]
    for k, (model, quant, n) in enumerate(configs):
        now = time.monotonic()
        if now > end:
            logger.warning("budget spent: skipping %s", configs[k:])
            return
        name = point_name(model, quant, n, "engine")
        try:
            t0 = time.perf_counter()
            eng = build_engine(EngineSpec(str(resolve(model)), quant, a.device, a.slots, a.num_blocks, n,
                                          tuple(a.ranks), tuple(a.targets), a.distinct_adapters,
                                          SchedulerConfig(max_num_seqs=a.max_num_seqs, max_queue_len=100_000)))
            build_s = time.perf_counter() - t0
            logger.info("%s: engine built in %.1fs", name, build_s)
            wl = WorkloadConfig(num_requests=a.num_requests, cv=a.cv, num_tasks=n, popularity=a.popularity,
                                alpha=a.alpha, job_size=a.jobs, max_tokens=a.max_tokens, max_prompt=a.max_prompt,
                                lengths=a.lengths)
            plan = SweepPlan(wl, tuple(a.rate_x), tuple(a.policies), tuple(a.ablations), a.probe_requests,
                             a.calibrate, a.slo_scale, a.max_duration, warmup=not a.no_warmup)
            extra = {"model": Path(model).name, "quant": quant, "adapters": n, "build_s": round(build_s, 1),
                     "slots": a.slots, "max_num_seqs": a.max_num_seqs, "part": a.part}
            run_sweep(eng, plan, a.results / a.run_name, name, a.device, now + (end - now) / (len(configs) - k),
                      extra)
        except Exception:  # one failing configuration (e.g. OOM) must not end the sweep
            logger.exception("configuration %s failed", name)
        eng = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_matrix(a: argparse.Namespace, work: Path) -> None:
    start = time.monotonic()
    for model in a.models:
        for quant in a.quants:
            for n in a.adapters:
                for policy in a.policies:
                    if time.monotonic() - start > a.budget_s:
                        logger.warning("budget of %.0fs spent: stopping before %s", a.budget_s,
                                       point_name(model, quant, n, policy))
                        return
                    try:
                        run_point(a, work, model, quant, n, policy)
                    except Exception:  # one failing point (e.g. OOM at startup) must not end the matrix
                        logger.exception("point %s failed", point_name(model, quant, n, policy))


# ---------------------------------------------------------------- the results page

def page_header(a: argparse.Namespace, quick: bool) -> list[str]:
    title = "# Serving benchmark: CPU smoke run (NOT the GPU experiment)" if quick else "# Serving benchmark (issue 9)"
    what = ("A check that the whole pipeline works end to end on a 2-core CPU: `inlaid serve` subprocesses on a "
            "tiny random Llama, synthetic adapters registered over HTTP, `inlaid bench serve` per point, these "
            "tables and plots. The numbers say nothing about the policies' merits at GPU scale: the load is far "
            "below saturation (throughput follows the arrival rate), and \"fp16\" means the dense base, which "
            "runs in fp32 on a CPU; \"w4\" is a random GPTQ 4-bit checkpoint of the same shapes."
            if quick else "Dummy-weight models of real shapes (fp16: dummy dense weights; w4: random GPTQ 4-bit g128 "
            "codes), synthetic adapters. Two drivers: **engine** (in-process: one loaded engine per "
            "configuration, every policy and ablation replayed on it with a fresh scheduler; latencies are the "
            "engine loop's, from the measured step times) and **http** (a real `inlaid serve` process driven by "
            "`inlaid bench serve`, TTFT/TPOT measured at the client).")
    return [title, "", what, "", f"Regenerate: `PYTHONPATH=. python benchmarks/serving_matrix.py "
            f"{'--quick' if quick else '...'}` (the command line used: `{' '.join(sys.argv[1:])}`).", "",
            f"Workload: {a.num_requests} requests per point, Gamma arrivals (cv {a.cv}), {a.popularity} popularity "
            f"(alpha {a.alpha}), lengths {a.lengths} (prompt <= {a.max_prompt}, output <= {a.max_tokens}), "
            f"jobs of {a.jobs}, max duration {a.max_duration}s, SLO: latency <= {a.slo_scale} x isolated time "
            f"({a.calibrate} isolated probes per run). Adapter ranks {a.ranks} on {a.targets}; {a.slots} device "
            f"slots; device {a.device}.", "", *_notes(a)]


def _notes(a: argparse.Namespace) -> list[str]:
    """The hand-written reading of the results (``--notes FILE``), placed under the header."""
    notes = getattr(a, "notes", None)
    return [Path(notes).read_text().rstrip(), ""] if notes else []


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny model (see the docstring)")
    p.add_argument("--notes", default=None, help="markdown file with the reading of the results, put under the header")
    p.add_argument("--driver", default="http", choices=["http", "engine"],
                   help="http: one `inlaid serve` per point, `bench serve` per rate; engine: in-process sweep "
                        "(one engine per model/quant/adapters, every policy, ablation and --rate-x on it)")
    p.add_argument("--rate-x", type=float, nargs="+", default=[1.5, 1.0],
                   help="engine driver: rates as multiples of the measured saturation rate (highest first)")
    p.add_argument("--ablations", nargs="*", default=["inlaid-nopred", "inlaid-nogroup", "inlaid-noaging"],
                   help="engine driver: ablation variants run at the highest rate")
    p.add_argument("--probe-requests", type=int, default=128, help="engine driver: saturation probe size")
    p.add_argument("--models", nargs="+", default=["llama2-7b-shapes", "llama2-13b-shapes"])
    p.add_argument("--quants", nargs="+", default=["fp16", "w4"], choices=["fp16", "w4"])
    p.add_argument("--policies", nargs="+", default=["inlaid", "fifo", "mlfq"])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--adapters", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA targets (1000 rank-8..64 q,v adapters of 7B: ~31 GB host memory)")
    p.add_argument("--distinct-adapters", type=int, default=16, help="adapter dirs written (names reuse them)")
    p.add_argument("--slots", type=int, default=32, help="device adapter slots (--max-loras)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--popularity", default="powerlaw")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--lengths", default="suite")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--max-duration", type=float, default=120.0)
    p.add_argument("--slo-scale", type=float, default=5.0)
    p.add_argument("--calibrate", type=int, default=4)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new server after this")
    p.add_argument("--results", type=Path, default=None, help="results dir (default benchmarks/results/serving, "
                   "--quick: benchmarks/results/serving_cpu_quick)")
    p.add_argument("--page", type=Path, default=None, help="results page (default <results>.md)")
    p.add_argument("--page-only", action="store_true", help="only regenerate the page from the JSONs present")
    p.add_argument("--no-page", action="store_true", help="write the JSONs only (a part of a parallel run: the "
                   "launcher builds the page once at the end)")
    p.add_argument("--run-name", default="json", help="run directory under --results that this run's JSONs go to "
                   "and the page's tables read (earlier sessions: --history)")
    p.add_argument("--history", nargs="*", default=[], help="earlier run directories under --results, shown at the "
                   "end of the page (targets, ratios), never mixed into this run's tables")
    p.add_argument("--cost-model", type=Path, default=RESULTS / "cost_model_h200_w4_7b.json",
                   help="step-cost model of the page's simulator predictions (none: skip that section)")
    p.add_argument("--no-warmup", action="store_true", help="engine driver: no warm-up run before measuring")
    p.add_argument("--part", default="", help="label of the device part that ran this (recorded in config.extra)")
    p.add_argument("--demo", action="store_true", help="http driver on the bundled model + its demo adapters "
                   "(results: benchmarks/results/serving_http_cpu, shown in serving.md's CPU section)")
    p.add_argument("--demo-probe", type=int, default=0, help="--demo: saturation probe of N requests sent at once")
    p.add_argument("--probe-rate", type=float, default=1000.0, help="--demo: arrival rate of the probe")
    p.add_argument("--demo-tag", default="", help="--demo: suffix of the model label and files (a repeat run)")
    a = p.parse_args(argv)
    if a.quick:
        _quick_defaults(a)
    a.results = a.results or RESULTS / ("serving_cpu_quick" if a.quick else "serving_http_cpu" if a.demo else "serving")
    a.page = a.page or a.results.with_suffix(".md")
    a.logs = None if a.quick else a.results / "logs"
    return a


def _quick_defaults(a: argparse.Namespace) -> None:
    a.quants, a.policies, a.rates, a.adapters = ["fp16", "w4"], ["fifo", "inlaid"], [2.0, 8.0], [4]
    a.ranks, a.targets, a.distinct_adapters, a.slots = [4, 8], ["q_proj", "v_proj"], 4, 2
    a.device, a.num_requests, a.lengths, a.max_tokens, a.max_prompt = "cpu", 16, "synthetic", 16, 48
    a.jobs, a.max_duration, a.calibrate, a.max_num_seqs, a.num_blocks = 2, 30.0, 2, 16, 256
    a.probe_requests, a.ablations = 16, ["inlaid-nopred"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    if a.demo:
        if not a.page_only:
            run_demo(a, Path(tempfile.gettempdir()))
        write_cpu_http_section(a)
        return 0
    if a.page_only:
        build_page(a, cpu_http=RESULTS / "serving_http_cpu")
        return 0
    with tempfile.TemporaryDirectory(prefix="serving_matrix_") as tmp:
        work = Path(tmp)
        if a.quick:
            import shutil

            from tiny import make_tiny_llama_dir

            if a.results == RESULTS / "serving_cpu_quick" and a.driver == "http":
                shutil.rmtree(a.results / "json", ignore_errors=True)
                shutil.rmtree(a.results / "plots", ignore_errors=True)
            a.models = [str(make_tiny_llama_dir(work / "tiny"))]
        if a.driver == "engine":
            run_engine_sweeps(a)
        else:
            run_matrix(a, work)
    if not a.no_page:
        build_page(a, cpu_http=None if a.quick else RESULTS / "serving_http_cpu")
    return 0


def build_page(a: argparse.Namespace, cpu_http: Path | None) -> bool:
    """The results page from ``a.results/a.run_name`` (+ ``a.history`` run dirs, simulator predictions)."""
    return write_page(a.results, a.page, page_header(a, a.quick), cpu_http=cpu_http, run=a.run_name,
                      history=tuple(a.history), cost_model=a.cost_model)


def write_cpu_http_section(a: argparse.Namespace) -> None:
    """Record the demo run's command line next to its JSONs (the section of serving.md reads it)."""
    a.results.mkdir(parents=True, exist_ok=True)
    with (a.results / "command.txt").open("a") as f:
        f.write("PYTHONPATH=. python3 benchmarks/serving_matrix.py " + " ".join(sys.argv[1:]) + "\n")


if __name__ == "__main__":
    sys.exit(main())

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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from inlaid.bench.plot import plot_results  # noqa: E402
from inlaid.cli import main as inlaid_main  # noqa: E402

logger = logging.getLogger("serving_matrix")
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ("throughput_tps", "latency_mean", "jct_mean", "ttft_mean", "tpot_mean", "slo_attainment")


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

    def __enter__(self) -> "ServerProcess":
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
            "--max-lora-rank", str(max(a.ranks)), "--max-num-seqs", str(a.max_num_seqs)]
    if quant == "fp16":
        args += ["--load-format", "dummy"]
    if a.device != "cpu":
        args += ["--dtype", "float16"]
    if a.num_blocks:
        args += ["--num-blocks", str(a.num_blocks)]
    return args


def bench_args(a: argparse.Namespace, url: str, rate: float, n: int, policy: str, extra: dict, out: Path) -> list[str]:
    args = ["bench", "serve", "--url", url, "--num-requests", str(a.num_requests), "--rate", str(rate),
            "--cv", str(a.cv), "--popularity", a.popularity, "--alpha", str(a.alpha), "--tasks", str(n),
            "--adapter-prefix", "t", "--lengths", a.lengths, "--max-tokens", str(a.max_tokens),
            "--max-prompt", str(a.max_prompt), "--jobs", str(a.jobs), "--max-duration", str(a.max_duration),
            "--slo-scale", str(a.slo_scale), "--calibrate", str(a.calibrate), "--label", policy, "--out", str(out)]
    for k, v in extra.items():
        args += ["--extra", f"{k}={v}"]
    return args


def run_point(a: argparse.Namespace, work: Path, model: str, quant: str, n: int, policy: str) -> None:
    name = point_name(model, quant, n, policy)
    outs = {r: a.results / "json" / f"{name}_r{r:g}.json" for r in a.rates}
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


def resolve(model: str) -> Path:
    from inlaid.model.loader import resolve_model_path

    return Path(resolve_model_path(model))


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

def _load(json_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in sorted(json_dir.glob("*.json")):
        res = json.loads(p.read_text())
        ex = res["config"]["extra"]
        ex["adapters"] = int(ex["adapters"])
        out.append((p, res))
    return out


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def group_tables(results: list[tuple[Path, dict]]) -> list[str]:
    """One table per (model, quant, adapters): rows rate x policy."""
    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for _, r in results:
        ex = r["config"]["extra"]
        groups.setdefault((ex["model"], ex["quant"], ex["adapters"]), []).append(r)
    for (model, quant, n), rs in sorted(groups.items()):
        lines += [f"### {model}, {quant}, {n} adapters", "",
                  "| rate | policy | ok/sent | " + " | ".join(COLUMNS) + " |", "|---" * (3 + len(COLUMNS)) + "|"]
        for r in sorted(rs, key=lambda r: (r["config"]["rate"], r["config"]["label"])):
            s = r["summary"]
            lines.append(f"| {r['config']['rate']:g} | {r['config']['label']} | {s['ok']}/{s['sent']} | "
                         + " | ".join(_f(s.get(c)) for c in COLUMNS) + " |")
        lines.append("")
    return lines


def ratio_table(results: list[tuple[Path, dict]], other: str) -> list[str]:
    """inlaid vs ``other`` at each point: throughput x, latency / JCT reduction x, SLO attainment x."""
    by: dict[tuple, dict[str, dict]] = {}
    for _, r in results:
        ex = r["config"]["extra"]
        by.setdefault((ex["model"], ex["quant"], ex["adapters"], r["config"]["rate"]), {})[r["config"]["label"]] = r
    rows = [f"| model | quant | adapters | rate | throughput inlaid/{other} | latency {other}/inlaid | "
            f"JCT {other}/inlaid | SLO inlaid/{other} |", "|---|---|---|---|---|---|---|---|"]
    for (model, quant, n, rate), pol in sorted(by.items()):
        if "inlaid" in pol and other in pol:
            a, b = pol["inlaid"]["summary"], pol[other]["summary"]
            rows.append(f"| {model} | {quant} | {n} | {rate:g} | {_ratio(a.get('throughput_tps'), b.get('throughput_tps'))}"
                        f" | {_ratio(b.get('latency_mean'), a.get('latency_mean'))} | "
                        f"{_ratio(b.get('jct_mean'), a.get('jct_mean'))} | "
                        f"{_ratio(a.get('slo_attainment'), b.get('slo_attainment'))} |")
    return rows + [""] if len(rows) > 2 else []


def make_plots(results: list[tuple[Path, dict]], plot_dir: Path, md_dir: Path) -> list[str]:
    """Plots vs rate per (model, quant, adapters) and vs tasks per (model, quant, rate); markdown image lines."""
    lines: list[str] = []
    for x, keyf in (("rate", lambda ex, c: (ex["model"], ex["quant"], f"{ex['adapters']}a")),
                    ("tasks", lambda ex, c: (ex["model"], ex["quant"], f"r{c['rate']:g}"))):
        groups: dict[tuple, list[Path]] = {}
        for p, r in results:
            groups.setdefault(keyf(r["config"]["extra"], r["config"]), []).append(p)
        for key, files in sorted(groups.items()):
            xs = {json.loads(f.read_text())["config"]["rate" if x == "rate" else "num_tasks"] for f in files}
            if len(xs) < 2:
                continue
            paths = plot_results(files, x, plot_dir, prefix="_".join(key))
            lines.append(f"**{', '.join(key)}** (x = {x}):\n")
            lines.append(" ".join(f"![{p.stem}]({os.path.relpath(p, md_dir)})" for p in paths) + "\n")
    return lines


def write_page(a: argparse.Namespace, md: Path, header: list[str]) -> None:
    results = _load(a.results / "json")
    if not results:
        logger.warning("no results in %s: page not written", a.results / "json")
        return
    body = header + ["## Inlaid vs fifo (S-LoRA's policy)", ""] + (ratio_table(results, "fifo") or ["(no pairs)", ""])
    body += ["## Inlaid vs mlfq (FastServe's policy)", ""] + (ratio_table(results, "mlfq") or ["(no pairs)", ""])
    body += ["## All points", ""] + group_tables(results)
    body += ["## Plots", ""] + make_plots(results, a.results / "plots", md.parent)
    md.write_text("\n".join(body) + "\n")
    logger.info("wrote %s (%d result files)", md, len(results))


def page_header(a: argparse.Namespace, quick: bool) -> list[str]:
    title = "# Serving benchmark: CPU smoke run (NOT the GPU experiment)" if quick else "# Serving benchmark (issue 9)"
    what = ("A check that the whole pipeline works end to end on a 2-core CPU: `inlaid serve` subprocesses on a "
            "tiny random Llama, synthetic adapters registered over HTTP, `inlaid bench serve` per point, these "
            "tables and plots. The numbers say nothing about the policies' merits at GPU scale: the load is far "
            "below saturation (throughput follows the arrival rate), and \"fp16\" means the dense base, which "
            "runs in fp32 on a CPU; \"w4\" is a random GPTQ 4-bit checkpoint of the same shapes."
            if quick else "Dummy-weight models of real shapes, synthetic adapters, real `inlaid serve` processes.")
    return [title, "", what, "", f"Regenerate: `PYTHONPATH=. python benchmarks/serving_matrix.py "
            f"{'--quick' if quick else '...'}` (the command line used: `{' '.join(sys.argv[1:])}`).", "",
            f"Workload: {a.num_requests} requests per point, Gamma arrivals (cv {a.cv}), {a.popularity} popularity "
            f"(alpha {a.alpha}), lengths {a.lengths} (prompt <= {a.max_prompt}, output <= {a.max_tokens}), "
            f"jobs of {a.jobs}, max duration {a.max_duration}s, SLO: latency <= {a.slo_scale} x isolated time "
            f"({a.calibrate} isolated probes per run). Adapter ranks {a.ranks} on {a.targets}; {a.slots} device "
            f"slots; device {a.device}.", ""]


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny model (see the docstring)")
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
    p.add_argument("--results", type=Path, default=RESULTS / "serving")
    p.add_argument("--page", type=Path, default=RESULTS / "serving.md")
    p.add_argument("--page-only", action="store_true", help="only regenerate the page from the JSONs present")
    a = p.parse_args(argv)
    a.logs = a.results / "logs"
    if a.quick:
        _quick_defaults(a)
    return a


def _quick_defaults(a: argparse.Namespace) -> None:
    a.quants, a.policies, a.rates, a.adapters = ["fp16", "w4"], ["fifo", "inlaid"], [2.0, 8.0], [4]
    a.ranks, a.targets, a.distinct_adapters, a.slots = [4, 8], ["q_proj", "v_proj"], 4, 2
    a.device, a.num_requests, a.lengths, a.max_tokens, a.max_prompt = "cpu", 16, "synthetic", 16, 48
    a.jobs, a.max_duration, a.calibrate, a.max_num_seqs, a.num_blocks = 2, 30.0, 2, 16, 256
    a.results, a.page, a.logs = RESULTS / "serving_cpu_quick", RESULTS / "serving_cpu_quick.md", None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    if a.page_only:
        write_page(a, a.page, page_header(a, a.quick))
        return 0
    with tempfile.TemporaryDirectory(prefix="serving_matrix_") as tmp:
        work = Path(tmp)
        if a.quick:
            import shutil

            from tiny import make_tiny_llama_dir

            shutil.rmtree(a.results / "json", ignore_errors=True)
            shutil.rmtree(a.results / "plots", ignore_errors=True)
            a.models = [str(make_tiny_llama_dir(work / "tiny"))]
        run_matrix(a, work)
    write_page(a, a.page, page_header(a, a.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())

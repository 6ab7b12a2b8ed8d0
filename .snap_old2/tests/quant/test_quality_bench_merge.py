"""benchmarks/quality.py --from-json: a run of new methods merges into an earlier table (cells, methods,
the earlier run's unquantized cells), and benchmarks/hessian_stats.py's proxy ranks per-task GPTQ first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"_bench_{name}"] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


def _run(methods: str, cells: dict, seconds: dict) -> dict:
    args = {"methods": methods, "configs": "4:128", "command": f"run {methods}", "gen_limit": 2,
            "max_new_tokens_cap": 8, "limit": 4, "sym": True}  # fmt: skip
    return {"args": args, "cells": cells, "seconds": seconds, "dropped": [], "info": {"device": "cpu"}}


def test_merge_adds_new_method_columns_and_keeps_first_runs_cells() -> None:
    q = _module("quality")
    old = _run("gptq-mixed,rtn", {"fp|unquantized|t": {"metric": 10.0, "nll": 2.0},
                                  "4:128|gptq-mixed|t": {"metric": 9.0, "nll": 2.2},
                                  "4:128|rtn|t": {"metric": 5.0, "nll": 3.0}}, {"total": 1.0})  # fmt: skip
    new = _run("mlgptq-norm,rtn", {"4:128|mlgptq-norm|t": {"metric": 9.5, "nll": 2.1},
                                   "4:128|rtn|t": {"metric": 4.0, "nll": 9.0}}, {"total": 2.0})  # fmt: skip
    merged = q.merge_runs([old, new])
    assert merged["args"]["methods"] == "gptq-mixed,rtn,mlgptq-norm"
    assert merged["cells"]["4:128|rtn|t"]["nll"] == 3.0  # the first run's cell wins
    assert merged["seconds"] == {"total": 1.0, "[4:128; mlgptq-norm,rtn] total": 2.0}
    page = q.to_markdown(merged)
    assert "| task | unquantized | gptq-mixed | rtn | mlgptq-norm |" in page
    assert "| t | 10.0 / 2.000 | 9.0 / 2.200 | 5.0 / 3.000 | 9.5 / 2.100 |" in page
    assert "+5.0% (1)" in page  # mlgptq-norm NLL drop (2.1 - 2.0) / 2.0 against the first run's unquantized


def test_hessian_stats_proxy_on_random_tasks() -> None:
    hs = _module("hessian_stats")
    g = torch.Generator().manual_seed(0)
    loaded = {}
    for i, t in enumerate(("a", "b", "c")):
        x = torch.randn(200, 64, generator=g) * torch.linspace(0.1, 3, 64).roll(20 * i)
        loaded[t] = ((2 / 200 * x.t() @ x).float(), 200 + 50 * i)
    w = torch.randn(32, 64, generator=g) * 0.05
    out = hs.proxy_losses(loaded, w, ["gptq-mixed", "mlgptq-norm", "mean-equal", "norm-wloss", "rtn"], 3, 32)
    assert set(out) == {"gptq-mixed", "mlgptq-norm", "mean-equal", "norm-wloss", "rtn", "gptq-single"}
    for t in loaded:  # GPTQ on a task's own Hessian beats every shared Hessian and RTN on that task's proxy
        assert all(out["gptq-single"][t] <= out[m][t] * (1 + 1e-6) for m in out)
        assert out["rtn"][t] > out["gptq-mixed"][t]
    stats = hs.scale_stats(loaded)
    assert abs(sum(stats["max_diag_owner"].values()) - 1) < 1e-9 and stats["max_lmin_over_lmax"] < 1

"""The tuned W4A16 config table: parsing, bucketing, nearest-shape lookup, fallbacks (pure CPU, no kernels run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inlaid.kernels import w4a16_configs as wc
from inlaid.kernels.w4a16_gemv import GemvConfig, default_gemv_config

CFG_A = {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 8, "use_dot": False, "mode": "atomic",
         "num_stages": 3}


def _table() -> wc.ConfigTable:
    return wc.parse_table({"version": 1, "gpus": {"H100": {
        "gemv": {"K4096xN4096": {"1": CFG_A}, "K16384xN4096": {"8": {**CFG_A, "use_dot": True, "mode": "fixup"}}},
        "fused_max_m": {"K4096xN4096": 128}}}})  # fmt: skip


def test_buckets() -> None:
    assert wc.shape_key(11008, 4096) == "K4096xN16384" and wc.shape_key(1536, 576) == "K1024xN2048"
    assert [wc.m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="M must be"):
        wc.m_bucket(17)


def test_lookup_exact_nearest_and_fallback() -> None:
    t = _table()
    gt = t.for_gpu("NVIDIA H100 80GB HBM3")
    assert gt is not None and t.for_gpu("NVIDIA A100") is None
    assert gt.gemv["K4096xN4096"][1] == GemvConfig(**CFG_A)
    key = wc._nearest(gt.gemv.keys(), wc.shape_key(4096, 11008))  # K16384xN4096 is nearest to K16384xN4096
    assert key == "K16384xN4096"
    assert wc._nearest(gt.gemv.keys(), wc.shape_key(4096, 4000)) == "K4096xN4096"
    x = torch.zeros(1, 4)  # CPU tensor: no GPU entry applies, defaults are used
    assert wc.gemv_config(x, 1, 4096, 4096, table=t) == default_gemv_config(1, 4096, 4096)
    assert wc.fused_max_m(x, 4096, 4096, table=t) == wc.DEFAULT_FUSED_MAX_M
    assert wc._lookup_gemv(t, "NVIDIA H100 PCIe", 1, 4096, 4096) == GemvConfig(**CFG_A)
    assert wc._lookup_gemv(t, "NVIDIA H100 PCIe", 2, 4096, 4096) == default_gemv_config(2, 4096, 4096)  # no M=2
    assert wc._lookup_fused_max_m(t, "NVIDIA H100 PCIe", 4096, 4096) == 128


def test_bad_or_missing_table_falls_back(tmp_path: Path) -> None:
    assert wc.load_table(tmp_path / "missing.json").gpus == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "gpus": {"H100": {"gemv": {"K1xN1": {"1": {"mode": "spin"}}}}}}))
    assert wc.load_table(bad).gpus == {}
    with pytest.raises(ValueError, match="H100/K1xN1"):
        wc.parse_table(json.loads(bad.read_text()))
    with pytest.raises(ValueError, match="version"):
        wc.parse_table({"gpus": {}})


def test_committed_table_parses() -> None:
    table = wc.parse_table(json.loads(wc.TABLE_PATH.read_text()))  # raises on a malformed committed table
    assert table.gpus.keys() == wc.TABLE.gpus.keys()

"""Tuned launch configurations of the W4A16 kernels, read once at import from ``w4a16_configs.json``.

Owns the table lookup; the table itself is written by the device sweep
(``benchmarks/device/kernels.sh`` -> ``benchmarks/kernels_bench.py --sweep``).
Invariants: the JSON is read once (at import) into an immutable ``ConfigTable``;
a missing or malformed file logs a warning and leaves the untuned defaults
(``w4a16_gemv.default_gemv_config``, ``DEFAULT_FUSED_MAX_M``). Nothing here
changes after import; lookups are memoised per (table, GPU name, M, N, K) (pure functions of constants).

JSON format::

    {"version": 1,
     "gpus": {"H100": {                       # matched as a substring of torch.cuda.get_device_name()
         "gemv": {"K4096xN4096": {"1": {GemvConfig fields}, "2": {...}, ..., "16": {...}}, ...},
         "fused_max_m": {"K4096xN4096": 64, ...}}}}

Shape buckets: K and N each rounded up to a power of two ("K4096xN16384" for
4096x11008); a shape missing from the table uses the nearest bucket (sum of
|log2| distances). M buckets: the next power of two >= M (1, 2, 4, 8, 16).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from .w4a16_gemv import GEMV_MAX_M, GemvConfig, default_gemv_config

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("w4a16_configs.json")
DEFAULT_FUSED_MAX_M = 64
"""Largest M for the tiled fused kernel when the table has no crossover (above it: dequantize + cuBLAS)."""
M_BUCKETS = (1, 2, 4, 8, 16)


def pow2_ceil(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def shape_key(n: int, k: int) -> str:
    """(N, K) bucket key of the table."""
    return f"K{pow2_ceil(k)}xN{pow2_ceil(n)}"


def m_bucket(m: int) -> int:
    """M bucket of the table: next power of two >= M (M <= 16)."""
    if not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"GEMV M must be in [1, {GEMV_MAX_M}], got {m}")
    return pow2_ceil(m)


@dataclass(frozen=True)
class GpuTable:
    """Entries for one GPU family: GEMV configs per (shape bucket, M bucket) and fused-kernel crossover per shape."""

    gemv: Mapping[str, Mapping[int, GemvConfig]] = field(default_factory=dict)
    fused_max_m: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ConfigTable:
    """The whole table: GPU-name substring -> ``GpuTable`` (first match in file order wins)."""

    gpus: Mapping[str, GpuTable] = field(default_factory=dict)

    def for_gpu(self, name: str) -> GpuTable | None:
        return next((t for key, t in self.gpus.items() if key.lower() in name.lower()), None)


def parse_table(data: Mapping) -> ConfigTable:
    """Build a ``ConfigTable`` from the JSON object; ValueError naming the bad entry."""
    if data.get("version") != 1 or not isinstance(data.get("gpus"), dict):
        raise ValueError("w4a16 config table must be {'version': 1, 'gpus': {...}}")
    gpus = {}
    for gpu, entry in data["gpus"].items():
        gemv = {}
        for key, per_m in entry.get("gemv", {}).items():
            try:
                gemv[key] = MappingProxyType({int(mb): GemvConfig(**cfg) for mb, cfg in per_m.items()})
            except (TypeError, ValueError) as e:
                raise ValueError(f"bad gemv entry {gpu}/{key}: {e}") from e
        fmm = {key: int(v) for key, v in entry.get("fused_max_m", {}).items()}
        gpus[gpu] = GpuTable(MappingProxyType(gemv), MappingProxyType(fmm))
    return ConfigTable(MappingProxyType(gpus))


def load_table(path: Path = TABLE_PATH) -> ConfigTable:
    """Read and parse the table; an empty table (with a warning) if the file is missing or malformed."""
    try:
        return parse_table(json.loads(path.read_text()))
    except FileNotFoundError:
        logger.info("no tuned W4A16 table at %s: using default configs", path)
    except (ValueError, OSError) as e:
        logger.warning("ignoring W4A16 config table %s: %s", path, e)
    return ConfigTable()


TABLE = load_table()
"""The table read at import (immutable)."""


@functools.lru_cache(maxsize=16)
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


def _nearest(keys, key: str) -> str | None:
    def dist(other: str) -> float:
        (k1, n1), (k2, n2) = (tuple(int(p[1:]) for p in s.split("x")) for s in (key, other))
        return abs(math.log2(k1 / k2)) + abs(math.log2(n1 / n2))

    return min(keys, key=dist, default=None)


def _gpu_name(x: torch.Tensor) -> str:
    return device_name(x.device.index or 0) if x.is_cuda else "cpu"


@functools.lru_cache(maxsize=4096)
def _lookup_gemv(table: ConfigTable, gpu: str, m: int, n: int, k: int) -> GemvConfig:
    gt = table.for_gpu(gpu)
    key = _nearest(gt.gemv.keys(), shape_key(n, k)) if gt is not None else None
    cfg = gt.gemv[key].get(m_bucket(m)) if key is not None else None
    return cfg if cfg is not None else default_gemv_config(m, n, k)


@functools.lru_cache(maxsize=1024)
def _lookup_fused_max_m(table: ConfigTable, gpu: str, n: int, k: int) -> int:
    gt = table.for_gpu(gpu)
    key = _nearest(gt.fused_max_m.keys(), shape_key(n, k)) if gt is not None else None
    return gt.fused_max_m[key] if key is not None else DEFAULT_FUSED_MAX_M


def gemv_config(x: torch.Tensor, m: int, n: int, k: int, table: ConfigTable = TABLE) -> GemvConfig:
    """Tuned GEMV config for x's GPU, shape and M (nearest shape bucket), else ``default_gemv_config``."""
    return _lookup_gemv(table, _gpu_name(x), m, n, k)


def fused_max_m(x: torch.Tensor, n: int, k: int, table: ConfigTable = TABLE) -> int:
    """Largest M for the tiled fused kernel on x's GPU and shape (nearest bucket), else ``DEFAULT_FUSED_MAX_M``."""
    return _lookup_fused_max_m(table, _gpu_name(x), n, k)

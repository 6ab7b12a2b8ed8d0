"""Per-task Hessian accumulation, aggregation across tasks, and an on-disk store.

Owns: ``HessianAccumulator`` (H = (2/N)·Σ x xᵀ over N input rows, fp32),
``aggregate``/``update_aggregate`` (``max`` = MLGPTQ, ``mean`` = sample-weighted
mix, ``single`` = one task), the scale-normalized aggregates
(``aggregate_normalized``: ``norm-mean`` | ``norm-diag`` | ``rowmax``), ``ensure_pd``
and ``HessianStore``.

Invariants:
- ``N`` counts input *rows* (tokens), so tasks with different prompt lengths
  are on the same per-token scale. ``n_samples`` everywhere means this N.
- The accumulator keeps the raw sum Σ x xᵀ and applies 2/N on read, so any
  split of the same rows into batches gives the same H up to fp32 summation order.
- ``max`` is exact and order-free: ``max(aggregate(A, B), C)`` is bit-identical
  to ``aggregate(A, B, C)``; this is what makes adding a task incremental.
- The normalized aggregates divide each task's H by its mean diagonal
  (``normalize``) so no task owns the aggregate by the scale of its activations;
  they are symmetric PSD whenever every H_t is (sums and congruences of PSD
  matrices), and a deterministic function of the per-task Hessians taken in
  sorted task order (fp64), so re-aggregating from the store after adding a
  task is bit-identical to aggregating all tasks at once.
- Store keys are (task, layer index, input group); groups are ``GROUPS``
  (q/k/v share one input, gate/up share one). One file per (task, layer),
  so loading one group costs one layer's worth of memory. Writes are atomic
  (temp file + ``os.replace``); the JSON index is written after the data. One
  writer at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

GROUPS = ("qkv", "o", "gate_up", "down")
METHODS = ("max", "mean", "single")
NORMALIZED = ("norm-mean", "norm-diag", "rowmax")
_TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class HessianAccumulator:
    """Running ``H = (2/N) Σ x xᵀ`` for one linear input, fed ``[tokens, in]`` batches."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate rows of ``x [..., in]`` (any float dtype; summed in fp32)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float32)
        if rows.shape[0] == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError("calibration activations contain NaN or Inf")
        self._sum.addmm_(rows.t(), rows)
        self.n_samples += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``(2/N) Σ x xᵀ`` fp32 ``[in, in]``."""
        if self.n_samples == 0:
            raise ValueError("no calibration rows were added; cannot form a Hessian")
        return self._sum * (2.0 / self.n_samples)


def _reduce(items: Iterable[tuple[torch.Tensor, int]], method: str) -> tuple[torch.Tensor, int]:
    acc: torch.Tensor | None = None
    total = 0
    for h, n in items:
        if n <= 0:
            raise ValueError(f"n_samples must be positive, got {n}")
        h = h.to(torch.float32)
        if acc is not None and h.shape != acc.shape:
            raise ValueError(f"Hessian shapes differ: {tuple(acc.shape)} vs {tuple(h.shape)}")
        if method == "max":
            acc = h.clone() if acc is None else torch.maximum(acc, h)
        else:  # fp64 sum: exact weights, and a one-task mean returns that task's H exactly
            acc = h.double() * n if acc is None else acc.add_(h.double(), alpha=n)
        total += n
    if acc is None:
        raise ValueError("no Hessians to aggregate")
    return (acc if method == "max" else (acc / total).to(torch.float32)), total


def aggregate(
    hessians: Mapping[str, tuple[torch.Tensor, int]], method: str, task: str | None = None
) -> torch.Tensor:
    """Combine per-task ``(H, n_samples)``: ``max`` element-wise, ``mean`` sample-weighted, ``single`` one task."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "single":
        if task not in hessians:
            raise ValueError(f"method 'single' needs task= one of {sorted(hessians)}, got {task!r}")
        return hessians[task][0].to(torch.float32)
    return _reduce(hessians.values(), method)[0]


def update_aggregate(
    current: tuple[torch.Tensor, int] | None, new: tuple[torch.Tensor, int], method: str
) -> tuple[torch.Tensor, int]:
    """Fold one more task into an aggregate ``(H, total_n)``. Exact for ``max``; ``mean`` up to rounding."""
    if method not in ("max", "mean"):
        raise ValueError(f"update_aggregate supports 'max' and 'mean', got {method!r}")
    return _reduce([new] if current is None else [current, new], method)


def normalize(h: torch.Tensor) -> torch.Tensor:
    """``H / mean(diag H)`` in fp64 (unit mean diagonal); a zero-diagonal H is returned unchanged."""
    h = h.to(torch.float64)
    scale = float(torch.diagonal(h).mean())
    return h / scale if scale > 0 else h.clone()


def _correlation(h: torch.Tensor) -> torch.Tensor:
    """``D⁻¹ H D⁻¹`` with ``D² = diag H`` (fp64); dead channels (zero diagonal) get a zero row/col."""
    d = torch.diagonal(h).clamp(min=0).sqrt()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return h * inv[:, None] * inv[None, :]


def aggregate_normalized(hessians: Mapping[str, tuple[torch.Tensor, int]], method: str) -> torch.Tensor:
    """Equal-weight aggregates of the per-task Hessians after scale normalization (fp32 result).

    With ``Ĥ_t = H_t / mean(diag H_t)`` and T tasks (sample counts are ignored: each task counts once):

    - ``norm-mean``: ``(1/T) Σ_t Ĥ_t``, proportional to ``Σ_t Ĥ_t``, which is ``>= Ĥ_s`` for every task s in
      the Loewner order: the PSD upper bound of every normalized task objective (GPTQ is invariant to the
      scale of H, so the 1/T does not matter);
    - ``norm-diag``: ``norm-mean`` plus the diagonal excess of the element-wise max of the ``Ĥ_t``;
    - ``rowmax``: per-input-channel scaling, ``D (1/T Σ_t C_t) D`` with ``C_t`` the correlation matrix of
      ``H_t`` and ``D² = max_t diag Ĥ_t``: every channel weighted by its largest normalized energy over
      tasks, the correlations averaged.

    One task gives ``Ĥ_t`` symmetrized (``(Ĥ + Ĥᵀ)/2``; exactly for ``norm-mean``/``norm-diag``, up to rounding
    for ``rowmax``).
    Tasks are taken in sorted name order and reduced in fp64.
    """
    if method not in NORMALIZED:
        raise ValueError(f"normalized method must be one of {NORMALIZED}, got {method!r}")
    names = sorted(hessians)
    if not names:
        raise ValueError("no Hessians to aggregate")
    acc: torch.Tensor | None = None
    top: torch.Tensor | None = None
    for t in names:
        h, n = hessians[t]
        if n <= 0:
            raise ValueError(f"n_samples must be positive, got {n} for task {t!r}")
        if acc is not None and h.shape != acc.shape:
            raise ValueError(f"Hessian shapes differ: {tuple(acc.shape)} vs {tuple(h.shape)} (task {t!r})")
        hn = normalize(h)
        part = _correlation(hn) if method == "rowmax" else hn
        acc = part.clone() if acc is None else acc.add_(part)
        dg = torch.diagonal(hn)
        top = dg.clone() if top is None else torch.maximum(top, dg)
    assert acc is not None and top is not None
    acc = acc / len(names)
    if method == "norm-diag":
        acc = acc + torch.diag((top - torch.diagonal(acc)).clamp(min=0))
    elif method == "rowmax":
        d = top.clamp(min=0).sqrt()
        acc = acc * d[:, None] * d[None, :]
    return ((acc + acc.t()) / 2).to(torch.float32)  # exactly symmetric (fp32 X^T X need not be)


def ensure_pd(h: torch.Tensor, percdamp: float = 0.01, max_retries: int = 5) -> tuple[torch.Tensor, float]:
    """Return ``(H', damp)``: ``H`` if Cholesky succeeds, else ``H + damp·I`` with damp growing 10x per try."""
    if h.dim() != 2 or h.shape[0] != h.shape[1] or not torch.isfinite(h).all():
        raise ValueError("Hessian must be a finite square matrix")
    h = h.to(torch.float32)
    if int(torch.linalg.cholesky_ex(h)[1]) == 0:
        return h, 0.0
    base = float(torch.diag(h).mean())
    base = base if base > 0 else 1.0
    pd = percdamp if percdamp > 0 else 0.01
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_retries + 1):
        damp = pd * base
        if int(torch.linalg.cholesky_ex(h + damp * eye)[1]) == 0:
            logger.warning("Hessian was not positive definite; repaired with percdamp=%g", pd)
            return h + damp * eye, damp
        pd *= 10
    raise ValueError(f"Hessian could not be made positive definite (percdamp up to {pd / 10:g})")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HessianStore:
    """Per-task, per-layer, per-group Hessians on disk (safetensors + ``index.json``)."""

    INDEX = "index.json"

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        index = self._read_index()
        if index is None:
            name = {torch.float32: "float32", torch.float16: "float16", None: "float32"}.get(dtype)
            if name is None:
                raise ValueError(f"store dtype must be torch.float32 or torch.float16, got {dtype}")
            index = {"format": "inlaid-hessian-store", "version": 1, "dtype": name, "tasks": {}}
            _atomic_write_text(self.dir / self.INDEX, json.dumps(index, indent=2))
        elif dtype is not None and _DTYPES[index["dtype"]] != dtype:
            raise ValueError(f"store {self.dir} holds {index['dtype']}, not {dtype}")
        self.dtype = _DTYPES[index["dtype"]]

    def _read_index(self) -> dict[str, Any] | None:
        path = self.dir / self.INDEX
        if not path.exists():
            return None
        try:
            index = json.loads(path.read_text())
            if index.get("format") != "inlaid-hessian-store" or index.get("dtype") not in _DTYPES:
                raise ValueError("unknown format or dtype")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid Hessian store index ({e})") from e
        return index

    def _index(self) -> dict[str, Any]:
        index = self._read_index()
        if index is None:
            raise ValueError(f"{self.dir}: Hessian store index is missing")
        return index

    def tasks(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._index()["tasks"])

    def layers(self, task: str) -> list[int]:
        """Layer indices stored for ``task``, sorted."""
        return sorted(int(k) for k in self._task_entry(task)["layers"])

    def n_samples(self, task: str, layer: int) -> int:
        return int(self._layer_entry(task, layer)["n_samples"])

    def _task_entry(self, task: str) -> dict[str, Any]:
        tasks = self._index()["tasks"]
        if task not in tasks:
            raise KeyError(f"task {task!r} not in Hessian store {self.dir}; have {sorted(tasks)}")
        return tasks[task]

    def _layer_entry(self, task: str, layer: int) -> dict[str, Any]:
        entry = self._task_entry(task)["layers"].get(str(layer))
        if entry is None:
            raise KeyError(f"task {task!r} has no layer {layer} in Hessian store {self.dir}")
        return entry

    def _file(self, task: str, layer: int) -> Path:
        return self.dir / task / f"layer_{layer:05d}.safetensors"

    def write_layer(self, task: str, layer: int, groups: Mapping[str, torch.Tensor], n_samples: int) -> None:
        """Persist one layer's group Hessians for ``task`` (creating the task if new)."""
        _check_key(task, layer, groups, n_samples)
        tensors: dict[str, torch.Tensor] = {}
        for group, h in groups.items():
            tensors.update(self._encode(group, h))
        path = self._file(task, layer)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"task": task, "layer": str(layer), "n_samples": str(n_samples)})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        index = self._index()
        entry = index["tasks"].setdefault(task, {"layers": {}})
        entry["layers"][str(layer)] = {"n_samples": int(n_samples), "groups": sorted(groups)}
        _atomic_write_text(self.dir / self.INDEX, json.dumps(index, indent=2))

    def _encode(self, group: str, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h = h.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(h).all():
            raise ValueError(f"Hessian for group {group!r} contains NaN or Inf")
        if self.dtype == torch.float32:
            return {group: h}
        peak = float(h.abs().max())
        scale = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0  # power of two: exact rescale
        return {group: (h / scale).to(torch.float16), f"{group}.scale": torch.tensor([scale])}

    def add_task(self, task: str, layers: Mapping[int, Mapping[str, torch.Tensor]], n_samples: int) -> None:
        """Store every layer of a task's Hessians (``{layer: {group: H}}``), replacing any old entry."""
        if task in self._index()["tasks"]:
            self.remove_task(task)
        for layer in sorted(layers):
            self.write_layer(task, layer, layers[layer], n_samples)

    def remove_task(self, task: str) -> None:
        """Unregister ``task`` (index first, so a crash never leaves a half-visible task) and delete its files."""
        index = self._index()
        if task not in index["tasks"]:
            raise KeyError(f"task {task!r} not in Hessian store {self.dir}")
        del index["tasks"][task]
        _atomic_write_text(self.dir / self.INDEX, json.dumps(index, indent=2))
        shutil.rmtree(self.dir / task, ignore_errors=True)

    def load(self, task: str, layer: int, group: str) -> tuple[torch.Tensor, int]:
        """One Hessian as fp32 ``[in, in]`` and its ``n_samples``."""
        entry = self._layer_entry(task, layer)
        if group not in entry["groups"]:
            raise KeyError(f"task {task!r} layer {layer} has no group {group!r}; have {entry['groups']}")
        path = self._file(task, layer)
        try:
            with safe_open(str(path), framework="pt") as f:
                h = f.get_tensor(group).to(torch.float32)
                if self.dtype == torch.float16:
                    h = h * float(f.get_tensor(f"{group}.scale")[0])
        except Exception as e:
            raise ValueError(f"{path}: corrupt or truncated Hessian file ({e})") from e
        return h, int(entry["n_samples"])

    def aggregate(
        self, layer: int, group: str, method: str, tasks: Iterable[str] | None = None, task: str | None = None
    ) -> torch.Tensor:
        """Aggregate over ``tasks`` (default: all), loading one task's Hessian at a time."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "single":
            if task is None:
                raise ValueError("method 'single' needs task=")
            return self.load(task, layer, group)[0]
        names = sorted(tasks) if tasks is not None else self.tasks()
        return _reduce((self.load(t, layer, group) for t in names), method)[0]


def _check_key(task: str, layer: int, groups: Mapping[str, torch.Tensor], n_samples: int) -> None:
    if not _TASK_RE.match(task):
        raise ValueError(f"task name {task!r} must match {_TASK_RE.pattern} (it names a directory)")
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise ValueError(f"groups must be a non-empty subset of {GROUPS}, got {sorted(groups)}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")

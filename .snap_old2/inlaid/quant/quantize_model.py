"""Quantize a whole base model for a set of tasks: MLGPTQ and its baselines, end to end.

Owns the per-layer quantization (``requantize_layer``), the whole-model loop
over a Hessian store (``quantize_weights``) and the offline pipeline
``quantize_model``: load the fp base, calibrate every task with its adapter into
``out_dir/hessians/``, quantize layer by layer, write the standard GPTQ
checkpoint (plus tokenizer files) and ``quantize_report.json``.

Methods: ``mlgptq`` (element-wise max of the task Hessians), ``gptq-mixed``
(sample-weighted mean), ``gptq-single`` (one task's Hessian, ``task=``) and
``rtn`` (round to nearest, no Hessian). Two repairs of the max, because the
element-wise max of PSD matrices is in general *indefinite* (on the tiny test
model its smallest eigenvalue reaches -0.4x the mean diagonal, so GPTQ's
damping retries end at percdamp 10 and the Hessian is mostly identity):
``mlgptq-psd`` projects the max onto the PSD cone (eigenvalues clipped at 0)
and ``mlgptq-diag`` is the mean plus the diagonal excess of the max
(``mean + diag(max_t diag H_t - diag mean)``, PSD by construction). Three
scale-normalized aggregates (``hessian.aggregate_normalized``; each task's H
divided by its mean diagonal, every task counted once): ``mlgptq-norm`` (the
equal-weight mean of the normalized H_t, proportional to their sum, the PSD
Loewner upper bound of every normalized task Hessian), ``mlgptq-normdiag``
(that plus the diagonal excess of the normalized max) and ``mlgptq-rowmax``
(per-input-channel scaling: mean correlation matrix, each channel scaled by
its largest normalized diagonal over tasks). All are deterministic functions of
the stored per-task Hessians, so they keep the bit-identical incremental
property.

Invariants:
- ``requantize_layer`` is a pure, deterministic function of (fp weights, the
  store's Hessians of the named tasks, config): tasks are read in sorted order
  and ``max`` is exact, so adding a task to the store and re-quantizing gives
  bit-identical tensors to quantizing all tasks at once.
- q/k/v share the "qkv" Hessian, gate/up share "gate_up"; o and down have
  their own. Without act-order, weights sharing a Hessian are quantized in one
  GPTQ pass over their stacked rows (``gptq_batched``; rows are independent). Only one layer's Hessians are loaded at a time.
- Non-linear tensors (embeddings, norms, lm_head) are written unchanged.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from inlaid.quant.gptq import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, gptq_quantize
from inlaid.quant.gptq_batched import gptq_quantize_many, split_rows
from inlaid.quant.hessian import HessianStore, aggregate, aggregate_normalized
from inlaid.quant.linear import PROJECTIONS
from inlaid.quant.pack import pack, quantization_config, save_quantized_checkpoint
from inlaid.quant.rtn import rtn_quantize

logger = logging.getLogger(__name__)

METHODS = ("mlgptq", "mlgptq-psd", "mlgptq-diag", "mlgptq-norm", "mlgptq-normdiag", "mlgptq-rowmax",
           "gptq-mixed", "gptq-single", "rtn")
NORMALIZED_OF = {"mlgptq-norm": "norm-mean", "mlgptq-normdiag": "norm-diag", "mlgptq-rowmax": "rowmax"}
AGGREGATORS = {"mlgptq": "max", "gptq-mixed": "mean", "gptq-single": "single"}
GROUP_OF = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
            "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up", "mlp.down_proj": "down"}
_LINEAR_RE = re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+_proj)\.weight$")
REPORT_NAME = "quantize_report.json"
HESSIAN_DIR = "hessians"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize (validated at construction; ValueError names the fix)."""

    method: str = "mlgptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    percdamp: float = 0.01
    task: str | None = None
    """The task whose Hessian ``gptq-single`` uses."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.method == "gptq-single" and not self.task:
            raise ValueError("method 'gptq-single' needs task= (the task whose Hessian to use)")

    def checkpoint_config(self) -> dict[str, Any]:
        """``quantize_config.json`` contents."""
        return quantization_config(self.bits, self.group_size, self.sym, self.act_order, False, self.percdamp)


def _quantize_one(w: torch.Tensor, h: torch.Tensor | None, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    if h is None:
        return pack(rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym))
    res = gptq_quantize(w, h, cfg.bits, cfg.group_size, cfg.sym, act_order=cfg.act_order, percdamp=cfg.percdamp)
    return pack(res)


def aggregate_group(store: HessianStore, layer: int, group: str, method: str, tasks: list[str],
                    task: str | None = None) -> torch.Tensor:  # fmt: skip
    """The Hessian ``method`` uses for (layer, group), from the store's per-task Hessians of ``tasks``."""
    if method in AGGREGATORS:
        return store.aggregate(layer, group, AGGREGATORS[method], tasks, task=task)
    return aggregate_loaded({t: store.load(t, layer, group) for t in sorted(tasks)}, method, task)


def aggregate_loaded(loaded: Mapping[str, tuple[torch.Tensor, int]], method: str,
                     task: str | None = None) -> torch.Tensor:  # fmt: skip
    """The Hessian ``method`` uses, from already loaded per-task ``(H, n_samples)`` (iterated in sorted order).

    Equals ``aggregate_group`` on a store holding the same Hessians (same reductions, same order); computed
    on the Hessians' device.
    """
    items = {t: loaded[t] for t in sorted(loaded)}
    if method in AGGREGATORS:
        return aggregate(items, AGGREGATORS[method], task=task)
    if method in NORMALIZED_OF:
        return aggregate_normalized(items, NORMALIZED_OF[method])
    if method == "mlgptq-psd":
        h = aggregate(items, "max").double()
        vals, vecs = torch.linalg.eigh((h + h.t()) / 2)
        return ((vecs * vals.clamp(min=0)) @ vecs.t()).to(torch.float32)
    if method == "mlgptq-diag":
        mean = aggregate(items, "mean")
        excess = (torch.diagonal(aggregate(items, "max")) - torch.diagonal(mean)).clamp(min=0)
        return mean + torch.diag(excess)
    raise ValueError(f"no Hessian aggregation for method {method!r}")


def requantize_layer(
    layer_idx: int,
    fp_weights: Mapping[str, torch.Tensor],
    store: HessianStore | None,
    tasks: list[str] | None,
    qcfg: QuantConfig,
) -> dict[str, dict[str, torch.Tensor]]:
    """Packed tensors of one decoder layer: ``{"self_attn.q_proj": {qweight, qzeros, scales, g_idx}, ...}``.

    ``fp_weights`` maps each of ``PROJECTIONS`` to its fp weight ``[out, in]``. ``tasks`` (default: all in the
    store) are the tasks aggregated; ``store`` may be None only for ``rtn``.
    """
    missing = [p for p in PROJECTIONS if p not in fp_weights]
    if missing:
        raise ValueError(f"layer {layer_idx}: fp weights are missing {missing}")
    if qcfg.method != "rtn" and store is None:
        raise ValueError(f"method {qcfg.method!r} needs a Hessian store")
    names = sorted(tasks) if tasks is not None else (store.tasks() if store is not None else [])
    if qcfg.method == "gptq-single" and qcfg.task not in names:
        raise ValueError(f"gptq-single task {qcfg.task!r} is not among the tasks {names}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group in ("qkv", "o", "gate_up", "down"):
        h = None
        if qcfg.method != "rtn":
            assert store is not None
            h = aggregate_group(store, layer_idx, group, qcfg.method, names, qcfg.task)
        rels = [p for p in PROJECTIONS if GROUP_OF[p] == group]
        if h is not None and not qcfg.act_order and len(rels) > 1:
            out.update(_quantize_stacked(rels, fp_weights, h, qcfg))
            continue
        for rel in rels:
            w = fp_weights[rel]
            out[rel] = _quantize_one(w, None if h is None else h.to(w.device), qcfg)
    return out


def _quantize_stacked(rels: list[str], fp_weights: Mapping[str, torch.Tensor], h: torch.Tensor,
                      qcfg: QuantConfig) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """GPTQ of the weights sharing Hessian ``h`` (q/k/v, gate/up) in one pass over their stacked rows.

    GPTQ quantizes rows independently, so this equals quantizing each weight alone (same codes; up to fp32
    summation order) with a third of the sequential column steps for q/k/v.
    """
    ws = [fp_weights[r] for r in rels]
    w = torch.cat([x.detach().to(device=ws[0].device, dtype=torch.float32) for x in ws])
    (res,) = gptq_quantize_many(w, h.to(w.device)[None], qcfg.bits, qcfg.group_size, qcfg.sym, qcfg.percdamp)
    return {rel: pack(r) for rel, r in zip(rels, split_rows(res, [x.shape[0] for x in ws]))}


def linear_layers(fp_state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {projection: weight}}`` of the decoder projections in an HF-named state dict."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in fp_state.items():
        m = _LINEAR_RE.match(name)
        if m and m.group(2) in GROUP_OF:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if not layers:
        raise ValueError("no 'model.layers.N.*_proj.weight' tensors in the state dict; is this a Llama-family model?")
    return layers


def quantize_weights(
    fp_state: Mapping[str, torch.Tensor], store: HessianStore | None, tasks: list[str] | None, method: str,
    bits: int, group_size: int, sym: bool = True, act_order: bool = False, task: str | None = None,
    percdamp: float = 0.01,
) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """Packed tensors per linear (``model.layers.N.self_attn.q_proj`` -> tensors), layer by layer."""
    qcfg = QuantConfig(method, bits, group_size, sym, act_order, percdamp, task)
    layers = linear_layers(fp_state)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for idx in tqdm(sorted(layers), desc=f"quantize {method} {bits}b g{group_size}", unit="layer", leave=False):
        for rel, tensors in requantize_layer(idx, layers[idx], store, tasks, qcfg).items():
            bias = fp_state.get(f"model.layers.{idx}.{rel}.bias")
            if bias is not None:
                tensors["bias"] = bias.detach().cpu()
            packed[f"model.layers.{idx}.{rel}"] = tensors
    return packed


def peak_memory_bytes(device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_NOT_COPIED = ("config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer / generation config files (everything but weights and model configs) from ``src``."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _NOT_COPIED:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did; written as ``quantize_report.json``."""

    model: str
    out_dir: str
    config: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    seconds_calibrate: float
    seconds_quantize: float
    seconds_total: float
    peak_memory_bytes: int
    peak_memory_kind: str
    device: str

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def _check_inputs(qcfg: QuantConfig, adapters: Mapping[str, str], calib: Mapping[str, str]) -> None:
    extra = sorted(set(adapters) - set(calib))
    if extra:
        raise ValueError(f"adapters {extra} have no calibration file; give --calib NAME=FILE for each adapter")
    if qcfg.method != "rtn" and not calib:
        raise ValueError(f"method {qcfg.method!r} needs calibration data: give at least one --calib NAME=FILE")
    if qcfg.method == "gptq-single" and qcfg.task not in calib:
        raise ValueError(f"gptq-single task {qcfg.task!r} has no calibration file; calib tasks: {sorted(calib)}")


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None  # dummy shapes: calibration rows must then be token ids


def _load_base(model: str, device: torch.device, dtype: torch.dtype, load_format: str) -> tuple[Any, Any, Path]:
    from inlaid.config import ModelConfig
    from inlaid.model.loader import load_model, resolve_model_path
    from inlaid.quant.linear import is_gptq_dir

    if is_gptq_dir(resolve_model_path(model)):
        raise ValueError(f"model {model!r} is already quantized; pass the full-precision base model")
    return load_model(ModelConfig(model=model, load_format=load_format), device, dtype)  # type: ignore[arg-type]


def quantize_model(
    model: str,
    adapters: Mapping[str, str],
    calib: Mapping[str, str],
    method: str,
    bits: int,
    group_size: int,
    out_dir: str | Path,
    *,
    sym: bool = True,
    act_order: bool = False,
    task: str | None = None,
    percdamp: float = 0.01,
    max_samples: int = 128,
    max_tokens: int = 65536,
    max_seq_len: int = 512,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_format: str = "auto",
) -> QuantizeReport:
    """Calibrate every task (with its adapter) into ``out_dir/hessians``, quantize, write the GPTQ checkpoint."""
    from inlaid.lora.adapter import load_adapter, validate_adapter
    from inlaid.quant.calibrate import calibrate_task, load_calibration

    t0 = time.perf_counter()
    device = torch.device(device)
    if method == "gptq-single" and task is None and len(calib) == 1:
        task = next(iter(calib))
    qcfg = QuantConfig(method, bits, group_size, sym, act_order, percdamp, task)
    _check_inputs(qcfg, adapters, calib)
    loaded = {name: load_adapter(name, path) for name, path in adapters.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fp_model, arch, src = _load_base(model, device, dtype, load_format)
    for a in loaded.values():
        validate_adapter(a, arch.lora_module_shapes(), arch.num_layers, a.rank)
    tokenizer = _load_tokenizer(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = HessianStore(out / HESSIAN_DIR) if qcfg.method != "rtn" else None
    task_info: dict[str, dict[str, Any]] = {}
    for name in sorted(calib) if store is not None else []:
        samples = load_calibration(calib[name], tokenizer, max_samples, max_tokens, max_seq_len)
        n = calibrate_task(fp_model, arch, name, samples, loaded.get(name), store, device, dtype)
        task_info[name] = {"calib": str(calib[name]), "adapter": adapters.get(name), "samples": len(samples), "tokens": n}
    t1 = time.perf_counter()
    fp_state = {k: v.detach() for k, v in fp_model.named_parameters()}
    packed = quantize_weights(fp_state, store, sorted(calib), method, bits, group_size, sym, act_order, task, percdamp)
    others = {k: v for k, v in fp_state.items() if not _LINEAR_RE.match(k)}
    config = json.loads((src / "config.json").read_text())
    save_quantized_checkpoint(out, packed, qcfg.checkpoint_config(), others, config)
    copy_side_files(src, out)
    t2 = time.perf_counter()
    report = QuantizeReport(
        model=str(model), out_dir=str(out), config={**asdict(qcfg), "calib_tasks": sorted(calib)}, tasks=task_info,
        seconds_calibrate=t1 - t0, seconds_quantize=t2 - t1, seconds_total=t2 - t0,
        peak_memory_bytes=peak_memory_bytes(device),
        peak_memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        device=str(device),
    )  # fmt: skip
    report.write(out / REPORT_NAME)
    logger.info("quantized %s with %s %d-bit g%d into %s in %.1f s", model, method, bits, group_size, out,
                report.seconds_total)  # fmt: skip
    return report

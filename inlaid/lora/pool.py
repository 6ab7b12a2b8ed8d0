"""LoRAPool: the device-resident adapter slots and the model's LoRA hook.

Owns, per projection module, stacked device buffers
``a[module]``: [num_layers, num_slots, max_rank, in] and
``b[module]``: [num_layers, num_slots, out, max_rank], plus
``scalings[module]``: [num_layers, num_slots] (float32).

Invariants:
- a slot holds at most one adapter; ranks below ``max_rank`` are zero-padded
  (rows of A / columns of B past the adapter's rank are 0), so any rank
  1..max_rank shares one buffer and the padding contributes exactly nothing;
- modules (or layers) an adapter does not target are all-zero for its slot;
- an empty slot is all-zero and has scaling 0.
Which adapter goes in which slot is decided elsewhere (``core.adapter_slots``);
this class only copies weights in and out and computes the batched deltas.

Slot sizing: a slot holds only the projections in ``target_modules`` (default:
every projection the base has), each at ``max_rank``. A pool for q,v-only
adapters therefore uses (in + out of q and v) / (in + out of all seven) of the all-projection memory
(Llama-2-13B at rank 64: 100 MB vs 478 MB per slot, ``benchmarks/results/serving/capacity.json``). ``slot_spec(adapters)`` gives the union of the adapters'
targets and their largest rank, to size a pool for a known set of adapters.
The pool does not grow: an adapter that targets a projection the slots do not
hold, or has a larger rank, is refused (``IncompatibleAdapterError`` naming the
option to change) by ``check_fits`` — which the engine's registry also runs at
registration, so such an adapter never reaches the scheduler. Growing instead
would reallocate buffers that captured CUDA graphs point at and eat memory the
KV cache was sized around. ``apply`` on a projection the slots do not hold adds
nothing (no resident adapter can have weights there).

Tensor parallelism (S-LoRA / vLLM layout; ``shards`` from
``inlaid.distributed.sharding.lora_shards``): for a column-parallel projection
A is replicated (the shrink reads the full, replicated x) and B holds this
rank's output rows, so the delta is this rank's output slice: no collective.
For a row-parallel projection A holds this rank's input columns and B is
replicated: ``x_r @ A_rᵀ @ Bᵀ`` is this rank's share of the delta, added to the
layer's partial sum *before* its all-reduce (``inlaid.model.llama._project``),
so LoRA adds no collective at all. Buffers hold the local shapes; adapters are
validated against the full shapes and sliced on ``load``; every rank loads the
same slots (slot state is replicated).

Per forward, ``prepare(batch)`` groups the tokens by slot once
(``batch.lora_meta``; from the runner's host copy of the slots when it passes
one, so the eager path needs no device read-back); each ``apply`` then runs the SGMV op of
``inlaid.kernels.lora_sgmv`` — a loop over the distinct slots present, never
over sequences.

GPU decode fast path (``triton_decode``, on by default where the Triton kernels
run): for decode-only batches ``prepare`` does no host sync and ``apply`` runs
the BGMV kernels of ``inlaid.kernels.lora_sgmv_triton`` reading the slots on
the device, so the forward is CUDA-graph capturable. The A stacks of q/k/v
(and of gate/up), which read the same x, are views into one buffer
``[L, S, n*R, in]``: one shrink launch serves the whole group (x read once;
partials cached in ``batch.lora_meta`` for the sibling projections, keyed by
layer and the identity of x), then one expand per projection; ``apply_group``
(what the model calls for q/k/v and gate/up) also fuses the expands into one
launch per group. Before each base projection the model asks ``offer_shrink``
for the shrink; a W4 launch on the tensor-core layout runs it beside its own
work and fills the offer's partials, which ``apply`` / ``apply_group`` then use
instead of a shrink launch (when the offer comes back unfilled they shrink
themselves, so every other base path stays correct). Slot ids are
not validated on this path (the scheduler assigns them; invalid ids are
undefined behaviour on the device, like an out-of-range embedding id).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from inlaid.kernels import lora_segment_triton as lseg
from inlaid.kernels import lora_sgmv_triton as lt
from inlaid.kernels.lora_sgmv import LoRASegments, build_segments, lora_apply
from inlaid.kernels.w4a16_gemv import PendingSums
from inlaid.distributed.sharding import Shard
from inlaid.lora.adapter import LoRAAdapter, check_fits, validate_adapter
from inlaid.model.batch import ForwardBatch

logger = logging.getLogger(__name__)

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections that read the same x: their A stacks share one buffer and one shrink launch."""


class DecodeMeta:
    """``batch.lora_meta`` of the device fast path: device slot ids plus this forward's shrink cache."""

    def __init__(self, token_slots: torch.Tensor, active: bool) -> None:
        self.token_slots = token_slots
        self.active = active
        self.shrunk: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.offers: dict[tuple[int, int], tuple[torch.Tensor, lt.LoRAShrink]] = {}  # offer_shrink, by group


class LoRAPool:
    """Fixed number of device adapter slots; implements ``inlaid.model.lora_hook.LoRAHook``."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        num_layers: int,
        module_shapes: Mapping[str, tuple[int, int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        triton_decode: bool | None = None,
        shards: Mapping[str, Shard] | None = None,
        target_modules: str | Sequence[str] | None = None,
    ) -> None:
        if num_slots < 1 or max_rank < 1 or num_layers < 1:
            raise ValueError(
                f"num_slots, max_rank and num_layers must be >= 1; got {num_slots}, {max_rank}, {num_layers}"
            )
        if not module_shapes:
            raise ValueError("module_shapes must name at least one projection, e.g. {'q_proj': (in, out)}")
        self.num_slots, self.max_rank, self.num_layers = num_slots, max_rank, num_layers
        self.base_shapes = {m: (int(i), int(o)) for m, (i, o) in module_shapes.items()}
        self.slot_modules = resolve_target_modules(target_modules, self.base_shapes)
        self.full_shapes = {m: self.base_shapes[m] for m in self.slot_modules}
        self.shards = {m: sh for m, sh in (shards or {}).items() if m in self.full_shapes and not sh.is_whole}
        self.module_shapes = {m: _local_shape(io, self.shards.get(m)) for m, io in self.full_shapes.items()}
        self.device, self.dtype = torch.device(device), dtype
        kw = dict(device=self.device, dtype=dtype)
        self.a: dict[str, torch.Tensor] = {}
        self.group_of: dict[str, tuple[torch.Tensor, int]] = {}  # module -> (group A buffer, index in group)
        for group in FUSED_GROUPS:
            members = [m for m in group if m in self.module_shapes]
            if len(members) > 1 and len({self.module_shapes[m][0] for m in members}) == 1:
                buf = torch.zeros(num_layers, num_slots, len(members) * max_rank, self.module_shapes[members[0]][0], **kw)
                for j, m in enumerate(members):
                    self.a[m] = buf[:, :, j * max_rank : (j + 1) * max_rank]
                    self.group_of[m] = (buf, j)
        for m, (i, o) in self.module_shapes.items():
            if m not in self.a:
                self.a[m] = torch.zeros(num_layers, num_slots, max_rank, i, **kw)
        self.b = {m: torch.zeros(num_layers, num_slots, o, max_rank, **kw) for m, (i, o) in self.module_shapes.items()}
        self.scalings = {
            m: torch.zeros(num_layers, num_slots, device=self.device, dtype=torch.float32) for m in self.module_shapes
        }
        # None: the device path on CUDA only; True: also under TRITON_INTERPRET=1 on CPU (tests)
        auto = self.device.type == "cuda" and lt.HAS_TRITON
        self.triton_decode = auto if triton_decode is None else (triton_decode and lt.triton_usable(
            torch.empty(0, device=self.device)))
        self.triton_prefill = auto
        """Prefill/mixed batches on CUDA: one segmented (SGMV) Triton shrink + expand per projection instead of
        the torch loop over slots (``lora_segment_triton``); False keeps the torch reference."""
        self._tiles: tuple[LoRASegments, torch.Tensor] | None = None  # tiles of the last segments used
        self.slot_names: list[str | None] = [None] * num_slots
        self._num_loaded = 0  # slots holding an adapter (kept by load/clear: read on every step)
        self._host_prepared: tuple[torch.Tensor, LoRASegments] | None = None  # last segments built from host slots
        self._slot_modules: list[frozenset[str]] = [frozenset()] * num_slots

    @property
    def has_adapters(self) -> bool:
        """True when at least one slot holds an adapter (O(1): the runner asks on every step)."""
        return self._num_loaded > 0

    @property
    def nbytes(self) -> int:
        """Device bytes held by the weight buffers."""
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    def check_fits(self, adapter: LoRAAdapter) -> None:
        """Raise ``IncompatibleAdapterError`` unless ``adapter`` fits a slot (targets held, rank <= max_rank)."""
        check_fits(adapter, self.slot_modules, self.max_rank)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range: the pool has slots 0..{self.num_slots - 1}")

    def clear(self, slot: int) -> None:
        """Zero a slot (weights and scalings) and mark it empty."""
        self._check_slot(slot)
        for m in self.module_shapes:
            self.a[m][:, slot].zero_()
            self.b[m][:, slot].zero_()
            self.scalings[m][:, slot] = 0.0
        if self.slot_names[slot] is not None:
            self._num_loaded -= 1
        self.slot_names[slot] = None
        self._slot_modules[slot] = frozenset()

    @torch.no_grad()
    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (replacing what was there); untargeted modules are zeroed."""
        self._check_slot(slot)
        validate_adapter(adapter, self.base_shapes, self.num_layers, self.max_rank)
        self.check_fits(adapter)
        self.clear(slot)
        for (layer, module), w in adapter.weights.items():
            r = w.rank
            a, b = _slice_lora(w.a, w.b, self.shards.get(module))
            self.a[module][layer, slot, :r].copy_(a, non_blocking=True)
            self.b[module][layer, slot, :, :r].copy_(b, non_blocking=True)
            self.scalings[module][layer, slot] = w.scaling
        self.slot_names[slot] = adapter.name
        self._num_loaded += 1
        self._slot_modules[slot] = frozenset(adapter.target_modules)
        logger.debug("loaded adapter %r into slot %d", adapter.name, slot)

    def uses_device_path(self, batch: ForwardBatch) -> bool:
        """True when ``batch`` runs on the sync-free Triton path (decode-only, kernels usable)."""
        return self.triton_decode and batch.is_decode_only

    def prepare(self, batch: ForwardBatch, host_slots: np.ndarray | None = None) -> None:
        """Group tokens by adapter slot once per batch into ``batch.lora_meta`` (device path: no host sync).

        ``host_slots`` (the runner's host copy of ``batch.lora_slots``) builds the segments without reading
        the device tensor back; the model's own ``prepare`` at the start of the forward then keeps them (only
        while the batch still holds that very ``lora_slots`` tensor and those segments).
        """
        if self.uses_device_path(batch):
            batch.lora_meta = DecodeMeta(batch.lora_slots, self.has_adapters)
            return
        last = self._host_prepared
        if host_slots is None and last is not None and last[0] is batch.lora_slots and last[1] is batch.lora_meta:
            return
        segments = (build_segments(batch.lora_slots) if host_slots is None
                    else host_segments(host_slots, batch.lora_slots.device))
        self._host_prepared = (batch.lora_slots, segments) if host_slots is not None else None
        for slot in segments.slots:
            if slot >= self.num_slots:
                raise ValueError(f"lora_slots holds slot {slot} but the pool has slots 0..{self.num_slots - 1}")
            if self.slot_names[slot] is None:
                raise ValueError(f"lora_slots refers to slot {slot}, which has no adapter loaded")
        batch.lora_meta = segments

    takes_pending_sums = True
    """``apply`` takes a base launch's uncast ``PendingSums`` as ``out`` (``llama._project``): it returns them
    untouched where it adds nothing, lets the device path's expand finish them, and materializes them before
    the prefill kernels."""

    def apply(
        self, layer_idx: int, module: str, x: torch.Tensor, out: torch.Tensor | PendingSums, batch: ForwardBatch
    ) -> torch.Tensor | PendingSums:
        """Add each token's adapter delta for (layer, module) to ``out`` in place and return it (a new tensor
        where ``out`` was ``PendingSums`` and a delta was added)."""
        if module not in self.a:
            if module in self.base_shapes:
                return out  # the slots do not hold this projection: no resident adapter targets it
            raise ValueError(f"LoRA pool has no module {module!r}; the base has {', '.join(self.base_shapes)}")
        if batch.lora_meta is None:
            self.prepare(batch)
        if isinstance(batch.lora_meta, DecodeMeta):
            return self._apply_device(layer_idx, module, x, out, batch.lora_meta)
        segments: LoRASegments = batch.lora_meta
        if not any(module in self._slot_modules[s] for s in segments.slots):
            return out
        a, b, sc = self.a[module][layer_idx], self.b[module][layer_idx], self.scalings[module][layer_idx]
        if isinstance(out, PendingSums):
            out = out.materialize()
        if self.triton_prefill and x.is_cuda:
            return lseg.lora_apply_segments(x, out, a, b, sc, segments.token_order, self._segment_tiles(segments))
        return lora_apply(x, out, a, b, sc, segments)

    def apply_group(self, layer_idx: int, modules: Sequence[str], x: torch.Tensor, outs: Sequence[torch.Tensor],
                    batch: ForwardBatch) -> list[torch.Tensor]:
        """``apply`` for projections that read the same ``x`` (q/k/v, gate/up), each ``outs[j]`` updated in place.

        On the device path a fused group (``FUSED_GROUPS``, its A stacks in one buffer) runs one shrink and ONE
        expand launch for all members (``lora_sgmv_triton.lora_expand_group``); otherwise ``apply`` per member.
        """
        buf = self._fused_buffer(modules, batch)
        if buf is None:
            return [self.apply(layer_idx, m, x, o, batch) for m, o in zip(modules, outs)]
        meta: DecodeMeta = batch.lora_meta
        if not meta.active:
            return list(outs)
        partials = self._shrunk(layer_idx, buf, x, meta)
        return lt.lora_expand_group(partials, [self.b[m][layer_idx] for m in modules],
                                    [self.scalings[m][layer_idx] for m in modules], meta.token_slots, list(outs))

    def offer_shrink(self, layer_idx: int, modules: Sequence[str], x: torch.Tensor,
                     batch: ForwardBatch) -> lt.LoRAShrink | None:
        """The shrink of one fused group (``apply_group``) or of one projection outside the groups (``apply``: o,
        down) for the base projections' launch to run beside its own work (``forward_group``,
        ``ParallelLinear.forward_local``), or None where no such shrink would run (prefill, no adapter loaded, a
        module the pool lacks, a group member on its own). ``apply`` / ``apply_group`` then use its partials if
        the base launch set them and shrink themselves otherwise."""
        if batch.lora_meta is None:
            self.prepare(batch)
        if len(modules) == 1 and modules[0] not in self.group_of:
            buf = self.a.get(modules[0]) if isinstance(batch.lora_meta, DecodeMeta) else None
        else:
            buf = self._fused_buffer(modules, batch)
        if buf is None or not batch.lora_meta.active:
            return None
        offer = lt.LoRAShrink(buf[layer_idx], batch.lora_meta.token_slots)
        batch.lora_meta.offers[(layer_idx, buf.data_ptr())] = (x, offer)
        return offer

    @staticmethod
    def _shrunk(layer_idx: int, buf: torch.Tensor, x: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
        """The shrink partials of ``x`` by the A stack ``buf[layer_idx]``: the ones the base launch computed for
        this layer's offer (``offer_shrink``), else a ``lora_shrink_partials`` launch."""
        offer = meta.offers.pop((layer_idx, buf.data_ptr()), None)
        if offer is not None and offer[0] is x and offer[1].partials is not None:
            return offer[1].partials
        return lt.lora_shrink_partials(x, buf[layer_idx], meta.token_slots)

    def _fused_buffer(self, modules: Sequence[str], batch: ForwardBatch) -> torch.Tensor | None:
        """The shared A buffer [L, S, n*R, in] when ``modules`` are one fused group (``FUSED_GROUPS``, in order) on
        the device path, else None; prepares the batch's metadata first."""
        if batch.lora_meta is None:
            self.prepare(batch)
        group = [self.group_of.get(m) for m in modules]
        fused = (isinstance(batch.lora_meta, DecodeMeta) and 2 <= len(modules) <= 3 and None not in group
                 and len({id(buf) for buf, _ in group}) == 1 and [j for _, j in group] == list(range(len(modules))))
        return group[0][0] if fused else None

    def _segment_tiles(self, segments: LoRASegments) -> torch.Tensor:
        """The kernel's tile table of ``segments``, built once per batch (every layer and projection reuses it)."""
        if self._tiles is None or self._tiles[0] is not segments:
            self._tiles = (segments, lseg.segment_tiles(segments.starts, segments.slots, self.device))
        return self._tiles[1]

    def _apply_device(self, layer_idx: int, module: str, x: torch.Tensor, out: torch.Tensor | PendingSums,
                      meta: DecodeMeta) -> torch.Tensor | PendingSums:
        """BGMV on the device; a fused group's shrink runs once (first member) and is reused by the others. The
        expand finishes ``PendingSums`` (``lora_expand``)."""
        if not meta.active:
            return out
        r = self.max_rank
        if module in self.group_of:
            buf, j = self.group_of[module]
            key = (layer_idx, buf.data_ptr())
            hit = meta.shrunk.get(key)
            if hit is None or hit[0] is not x:
                hit = (x, lt.lora_shrink_partials(x, buf[layer_idx], meta.token_slots))
                meta.shrunk[key] = hit
            partials = hit[1][:, :, j * r : (j + 1) * r]
        else:
            partials = self._shrunk(layer_idx, self.a[module], x, meta)
        return lt.lora_expand(partials, self.b[module][layer_idx], self.scalings[module][layer_idx],
                              meta.token_slots, out)


def host_segments(token_slots: np.ndarray, device: torch.device) -> LoRASegments:
    """``build_segments`` (same fields, same values) from a host int array [T]: no device read-back."""
    slots = np.asarray(token_slots, dtype=np.int64)
    if slots.ndim != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {slots.shape}")
    order = np.argsort(slots, kind="stable").astype(np.int64)
    sorted_slots = slots[order]
    keep = sorted_slots >= 0
    order, sorted_slots = order[keep], sorted_slots[keep]
    bounds = [0, *(np.flatnonzero(np.diff(sorted_slots)) + 1).tolist(), int(order.size)] if order.size else [0]
    order_list = order.tolist()
    contiguous = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        first = order_list[lo]
        contiguous.append(first if order_list[hi - 1] - first == hi - lo - 1 else -1)
    return LoRASegments(
        token_order=torch.from_numpy(order).to(device),
        slots=tuple(sorted_slots[bounds[:-1]].tolist()) if order.size else (),
        starts=tuple(bounds),
        contiguous=tuple(contiguous),
        num_tokens=int(slots.shape[0]),
    )


def resolve_target_modules(spec: str | Sequence[str] | None,
                           base_shapes: Mapping[str, tuple[int, int]]) -> tuple[str, ...]:
    """The projections a slot holds, in the base's order: ``None``/"all" = all of them, else a list or "q_proj,v_proj"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return tuple(base_shapes)
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in base_shapes]
    if unknown or not names:
        raise ValueError(f"lora_target_modules: {', '.join(map(repr, unknown)) or 'empty list'} is not a projection "
                         f"of the base; give a comma-separated subset of {', '.join(base_shapes)}, or 'all'")
    return tuple(m for m in base_shapes if m in names)


def slot_spec(adapters: Iterable[LoRAAdapter]) -> tuple[tuple[str, ...], int]:
    """(union of target modules, largest rank) of ``adapters``: the smallest slot that holds each of them."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("slot_spec needs at least one adapter to size the slots for")
    targets = sorted({m for a in adapters for m in a.target_modules})
    return tuple(targets), max(a.rank for a in adapters)


def _local_shape(io: tuple[int, int], shard: Shard | None) -> tuple[int, int]:
    """(in, out) held by this rank: a column shard (dim 0) cuts out, a row shard (dim 1) cuts in."""
    if shard is None:
        return io
    return (io[0], shard.size) if shard.dim == 0 else (shard.size, io[1])


def _slice_lora(a: torch.Tensor, b: torch.Tensor, shard: Shard | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A [r, in], B [out, r]): column -> B rows sliced; row -> A columns sliced."""
    if shard is None:
        return a, b
    if shard.dim == 0:
        return a, b[shard.start : shard.start + shard.size]
    return a[:, shard.start : shard.start + shard.size], b

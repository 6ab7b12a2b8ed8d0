"""ModelRunner: executes one SchedulerOutput on the device and returns sampled tokens.

Owns the device state: the model, the paged KV caches, the LoRA slot buffers and
per-request sampling generators. It never decides *what* runs (the scheduler
does); it only turns the step's plain lists into tensors, runs the forward and
samples.

Invariants:
- Adapter copies listed in ``SchedulerOutput.adapter_loads`` happen before the
  forward, so a step never sees a half-loaded slot.
- A step's inputs reach the device in two ``non_blocking`` copies from pinned staging buffers (CUDA); the
  only device->host copy of a step is the sampled token ids, started by ``launch`` (``non_blocking`` into
  pinned memory, then an event) and waited for by ``collect``: the engine's one synchronisation. Between the
  two the host is free, so the engine can ``launch`` the next (ahead) step first; ``execute`` is both at once.
- An ahead step (``SchedulerOutput.ahead``) takes its input ids from the previous launch's sampled tokens on
  the device (a device copy, stream-ordered after that sampling), never from the host.
- Per-request generators exist only for seeded requests and are dropped when
  the scheduler reports the request finished.
- With CUDA graphs (default on CUDA for fp16/bf16) one extra KV block past ``num_blocks`` is
  the scratch block that padding rows of a graph batch write to; decode-only
  steps replay a captured graph (``inlaid.worker.cuda_graphs``), every other
  step runs eagerly.
- Under tensor parallelism (``tp`` world > 1) the KV caches hold this rank's
  KV heads only; every rank runs the same forward and computes the full logits
  (all-gather), only rank 0 samples and returns tokens (workers return an empty
  ``RunnerOutput``). CUDA graphs are off under TP (collectives run eagerly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from inlaid.core.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput
from inlaid.distributed.context import TPContext
from inlaid.distributed.sharding import local_heads
from inlaid.kernels._triton import decode_batch
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.kernels.paged_attention_triton import unsplit_max_seq_len
from inlaid.lora.adapter import LoRAAdapter
from inlaid.lora.pool import LoRAPool
from inlaid.model.arch import ModelArch
from inlaid.model.batch import ForwardBatch
from inlaid.worker.cuda_graphs import CAPTURE_SIZES, CudaGraphRunner
from inlaid.worker.forward_batch import HostStaging, build_forward_inputs
from inlaid.worker.sampler import sample

logger = logging.getLogger(__name__)


def kv_bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of K and V for one block across all layers (of one rank's KV heads under TP)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * local_heads(arch, tp_size)[1] * arch.head_dim * elem


@dataclass
class StepHandle:
    """A launched step: its sampled tokens on the device and their pending copy to the host."""

    request_ids: list[str] = field(default_factory=list)
    """The sampling sequences' ids, in row order (empty: nothing was sampled, or a TP worker)."""
    tokens: torch.Tensor | None = None
    """[S] int64 sampled ids on the device (an ahead step's inputs)."""
    host: torch.Tensor | None = None
    """Their host copy (pinned on CUDA; valid once ``ready`` has completed)."""
    ready: torch.cuda.Event | None = None
    """Recorded after the host copy (CUDA only)."""


class ModelRunner:
    """Runs the model forward + sampling for scheduled steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        arch: ModelArch,
        lora_pool: LoRAPool,
        get_adapter: Callable[[str], LoRAAdapter],
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool | None = None,
        max_seq_len: int | None = None,
        tp: TPContext | None = None,
    ) -> None:
        self.tp = tp if tp is not None else TPContext.single(device)
        self.model = model
        self.arch = arch
        self.lora_pool = lora_pool
        self.get_adapter = get_adapter
        self.block_size = block_size
        self.device = device
        # default: on for 16-bit CUDA models (fp32 keeps the reference attention, which is not sync-free)
        use_graphs = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)) if cuda_graphs is None \
            else cuda_graphs
        use_graphs = use_graphs and self.tp.world_size == 1
        kv_heads = local_heads(arch, self.tp.world_size)[1]
        self.kv_caches = allocate_kv_caches(
            arch.num_layers, num_blocks + int(use_graphs), block_size, kv_heads, arch.head_dim, dtype, device
        )
        self._generators: dict[str, torch.Generator] = {}
        self._staging = HostStaging(device) if device.type == "cuda" else None
        self.graphs: CudaGraphRunner | None = None
        if use_graphs:
            bound = max_seq_len or arch.max_position_embeddings
            versioned = [m.quant_method for m in model.modules() if hasattr(getattr(m, "quant_method", None), "version")]
            self.graphs = CudaGraphRunner(
                model, self.kv_caches, -(-bound // block_size), block_size, num_blocks, device, CAPTURE_SIZES,
                lora_active=lambda: lora_pool.has_adapters,
                weights_version=lambda: sum(q.version for q in versioned),
                short_bound=lambda size: unsplit_max_seq_len(size, kv_heads),
            )

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def load_adapters(self, loads: dict[int, str]) -> None:
        for slot, name in loads.items():
            self.lora_pool.load(slot, self.get_adapter(name))

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step; returns a token for every sequence with ``sample=True``."""
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: StepHandle | None = None) -> StepHandle:
        """Queue one step's forward, sampling and token copy on the device; returns without waiting for them.

        ``prev``: the handle of the step launched just before, whose sampled tokens an ahead ``out`` reads.
        """
        for rid in out.finished_ids:
            self._generators.pop(rid, None)
        self.load_adapters(out.adapter_loads)
        if out.is_empty:
            return StepHandle()
        batch, host_slots = build_forward_inputs(out, self.block_size, self.device, self._staging)
        if out.ahead:
            self._feed_pending(out, batch, prev)
        hidden = self._forward(batch, host_slots)
        sampling = [s for s in out.scheduled if s.sample]
        if not sampling:
            return StepHandle()
        tokens = self._sample(hidden, batch, sampling)
        if tokens is None:
            return StepHandle()
        handle = StepHandle([s.request_id for s in sampling], tokens, tokens)
        if tokens.is_cuda:
            handle.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            handle.host.copy_(tokens, non_blocking=True)
            handle.ready = torch.cuda.Event()
            handle.ready.record()
        return handle

    def collect(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step's tokens and return them (the step's only synchronisation)."""
        if not handle.request_ids:
            return RunnerOutput()
        if handle.ready is not None:
            handle.ready.synchronize()
        return RunnerOutput(sampled=dict(zip(handle.request_ids, handle.host.tolist())))

    @staticmethod
    def _feed_pending(out: SchedulerOutput, batch: ForwardBatch, prev: StepHandle | None) -> None:
        """An ahead step's input ids are ``prev``'s sampled tokens, row for row (a device copy)."""
        ids = [s.request_id for s in out.scheduled]
        if prev is None or prev.tokens is None or prev.request_ids != ids:
            raise ValueError("an ahead step must follow the launch that samples its inputs, with the same "
                             f"sequences in the same order; got {ids[:4]} after "
                             f"{None if prev is None else prev.request_ids[:4]}")
        batch.input_ids.copy_(prev.tokens)

    def _forward(self, batch: ForwardBatch, host_slots: np.ndarray | None = None) -> torch.Tensor:
        """Hidden states of the step: a CUDA graph replay for decode-only batches that fit, else eager
        (the LoRA segments built first from the host copy of the slots, so the forward reads nothing back)."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        if host_slots is not None and not self.lora_pool.uses_device_path(batch):
            self.lora_pool.prepare(batch, host_slots)
        with decode_batch(batch.num_seqs if batch.is_decode_only else None):
            return self.model(batch, self.kv_caches)

    def _sample(self, hidden: torch.Tensor, batch: ForwardBatch,
                sampling: list[ScheduledSeq]) -> torch.Tensor | None:
        """Logits of the sampling rows and one token per row, on the device (None on TP workers)."""
        logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        if not self.tp.is_driver:
            return None
        gens = [self._generator(s.request_id, s.sampling_params.seed) for s in sampling]
        return sample(logits, [s.sampling_params for s in sampling], gens)

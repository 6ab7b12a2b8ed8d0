"""CUDA-graph decode: padding and static-buffer filling on CPU; replay == eager on CUDA (``gpu``).

The CPU tests check what ``StaticDecodeBuffers.fill`` writes row by row (real rows copied, padding rows pointing
at the scratch block with seq_len 0 and LoRA slot -1, stale rows of a larger earlier step cleared). The GPU test
runs the same decode steps of a tiny random Llama (with adapters in the LoRA pool) through a ModelRunner with
and without graphs, at several batch sizes that need padding, and compares hidden states and sampled tokens.
"""

from __future__ import annotations

import pytest
import torch

from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
from inlaid.model.batch import ForwardBatch
from inlaid.sampling import SamplingParams
from inlaid.worker.cuda_graphs import StaticDecodeBuffers, graph_bound, padded_size
from inlaid.worker.forward_batch import build_forward_batch

BLOCK = 4


def _decode_step(lens: list[int], slots: list[int], first_block: int = 0) -> SchedulerOutput:
    seqs, nxt = [], first_block
    for i, (n, s) in enumerate(zip(lens, slots)):
        nb = -(-n // BLOCK)
        seqs.append(ScheduledSeq(f"r{i}", [100 + i], n - 1, list(range(nxt, nxt + nb)), s, True,
                                 SamplingParams(max_tokens=4, temperature=0.0)))
        nxt += nb
    return SchedulerOutput(scheduled=seqs)


def test_padded_size_picks_the_next_captured_size() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 5, 32, 33, 128)] == [1, 2, 4, 8, 32, 64, 128]
    assert padded_size(129) is None
    with pytest.raises(ValueError):
        padded_size(0)


def test_graph_bound_gives_short_contexts_the_short_bound() -> None:
    assert graph_bound(200, 4096, 256) == 256 and graph_bound(256, 4096, 256) == 256
    assert graph_bound(257, 4096, 256) == 4096  # one key past it: the full graph
    assert graph_bound(10, 4096, None) == 4096  # the attention never splits at this size: one graph
    assert graph_bound(10, 128, 256) == 128  # the full bound is already shorter


def test_fill_copies_real_rows_and_pads_the_rest() -> None:
    bufs = StaticDecodeBuffers(8, max_blocks=6, block_size=BLOCK, scratch_block=50, device=torch.device("cpu"))
    big = build_forward_batch(_decode_step([5, 9, 3, 4, 7], [0, -1, 2, 1, 0]), BLOCK, torch.device("cpu"))
    bufs.fill(big, 8)
    batch = build_forward_batch(_decode_step([6, 13, 2], [1, -1, 3]), BLOCK, torch.device("cpu"))
    static = bufs.fill(batch, 4)
    assert isinstance(static, ForwardBatch) and static.num_seqs == 4 and static.is_decode_only
    assert static.max_seq_len == 6 * BLOCK
    assert static.input_ids.tolist() == [100, 101, 102, 0]
    assert static.positions.tolist() == [5, 12, 1, 0]
    assert static.seq_lens.tolist() == [6, 13, 2, 0]
    assert static.lora_slots.tolist() == [1, -1, 3, -1]
    assert static.slot_mapping.tolist()[:3] == batch.slot_mapping.tolist()
    assert static.slot_mapping[3].item() == 50 * BLOCK  # padding writes K/V into the scratch block only
    w = batch.block_tables.shape[1]
    assert torch.equal(static.block_tables[:3, :w], batch.block_tables)
    assert static.block_tables[3].tolist() == [50] * 6
    # rows 2..4 were real in earlier steps; replaying the size-8 graph for 2 seqs must see them as padding
    small = bufs.fill(build_forward_batch(_decode_step([3, 3], [0, 0]), BLOCK, torch.device("cpu")), 8)
    assert small.seq_lens.tolist() == [3, 3, 0, 0, 0, 0, 0, 0] and small.lora_slots[2:].eq(-1).all()
    assert small.slot_mapping[2:].eq(50 * BLOCK).all() and small.block_tables[2:].eq(50).all()


def test_fill_rejects_batches_a_graph_cannot_replay() -> None:
    bufs = StaticDecodeBuffers(4, max_blocks=2, block_size=BLOCK, scratch_block=9, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="blocks"):
        bufs.fill(build_forward_batch(_decode_step([20], [0]), BLOCK, torch.device("cpu")), 1)
    prefill = build_forward_batch(SchedulerOutput(scheduled=[ScheduledSeq(
        "p", [1, 2, 3], 0, [0], -1, True, SamplingParams(max_tokens=2))]), BLOCK, torch.device("cpu"))
    with pytest.raises(ValueError, match="decode-only"):
        bufs.fill(prefill, 1)
    with pytest.raises(ValueError, match="fit"):
        bufs.fill(build_forward_batch(_decode_step([3, 3], [0, 0]), BLOCK, torch.device("cpu")), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replay_equals_eager_decode(tiny_llama_dir, dtype: torch.dtype) -> None:
    from inlaid.lora.pool import LoRAPool
    from inlaid.lora.synthetic import random_adapter
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import build_model, init_dummy_weights
    from inlaid.worker.model_runner import ModelRunner

    dev = torch.device("cuda")
    arch = ModelArch.from_dir(tiny_llama_dir)
    model = build_model(arch, dev, dtype)
    init_dummy_weights(model, seed=1)
    pool = LoRAPool(3, 8, arch.num_layers, arch.lora_module_shapes(), dev, dtype)
    adapters = {f"a{i}": random_adapter(f"a{i}", arch.lora_module_shapes(), arch.num_layers, 4 + 2 * i, seed=i, std=0.2)
                for i in range(3)}
    model.set_lora_hook(pool)
    runners = [ModelRunner(model, arch, pool, adapters.__getitem__, 64, BLOCK, dev, dtype, cuda_graphs=g,
                           max_seq_len=64) for g in (False, True)]
    for eager, graphed in zip(runners[0].kv_caches, runners[1].kv_caches):  # same random "context" in both
        eager.normal_()
        graphed[:, :64].copy_(eager)  # block 64 of the graphed runner is its scratch block
    for lens, slots in (([5, 9, 3], [0, -1, 2]), ([17], [1]), ([2, 3, 4, 5, 6], [2, 1, 0, -1, 2])):
        step = _decode_step(lens, slots)
        step.adapter_loads = {0: "a0", 1: "a1", 2: "a2"}
        outs = []
        for r in runners:
            r.load_adapters(step.adapter_loads)
            batch = build_forward_batch(step, BLOCK, dev)
            with torch.inference_mode():
                hidden = r.graphs.run(batch) if r.graphs is not None else r.model(batch, r.kv_caches)
            outs.append(hidden.float().clone())
        assert runners[1].graphs.graphs, "no graph was captured"
        err = (outs[0] - outs[1]).abs().max().item()
        assert torch.isfinite(outs[1]).all() and err <= 1e-2 * outs[0].abs().max().item(), err
        torch.testing.assert_close(runners[0].kv_caches[1], runners[1].kv_caches[1][:, :64], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_short_and_long_contexts_replay_their_own_graphs(tiny_llama_dir) -> None:
    """Past ``unsplit_max_seq_len`` a step replays the full-bound graph (attention split, combine launch), up to
    it the short-bound graph (one partition); both equal eager, at the same batch size."""
    from inlaid.kernels.paged_attention_triton import (
        default_num_splits,
        unsplit_max_seq_len,
    )
    from inlaid.lora.pool import LoRAPool
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import build_model, init_dummy_weights
    from inlaid.worker.model_runner import ModelRunner

    dev, dtype, bound, blocks = torch.device("cuda"), torch.float16, 1024, 160
    arch = ModelArch.from_dir(tiny_llama_dir)
    model = build_model(arch, dev, dtype, max_positions=bound)
    init_dummy_weights(model, seed=3)
    pool = LoRAPool(2, 8, arch.num_layers, arch.lora_module_shapes(), dev, dtype)
    runners = [ModelRunner(model, arch, pool, {}.__getitem__, blocks, BLOCK, dev, dtype, cuda_graphs=g,
                           max_seq_len=bound) for g in (False, True)]
    for eager, graphed in zip(runners[0].kv_caches, runners[1].kv_caches):
        eager.normal_()
        graphed[:, :blocks].copy_(eager)
    short = unsplit_max_seq_len(2, arch.num_kv_heads)
    assert short is not None and default_num_splits(2, arch.num_kv_heads, bound) > 1  # two graphs at size 2
    for lens in ([7, short], [short + 1, 30], [40, 3]):
        batch = [build_forward_batch(_decode_step(lens, [-1, -1]), BLOCK, dev) for _ in runners]
        with torch.inference_mode():
            want = runners[0].model(batch[0], runners[0].kv_caches).float()
            got = runners[1].graphs.run(batch[1]).float()
        err = (want - got).abs().max().item()
        assert torch.isfinite(got).all() and err <= 1e-2 * want.abs().max().item(), (lens, err)
    assert sorted(key[:2] for key in runners[1].graphs.graphs) == [(2, short), (2, bound)]
    torch.testing.assert_close(runners[0].kv_caches[1], runners[1].kv_caches[1][:, :blocks], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_graphs_recapture_after_a_weight_swap(tiny_llama_dir) -> None:
    """A weights-version change drops every graph (and their memory pool); the next capture must work and see
    the new weights. Regression: capturing into the released pool failed an allocator assertion."""
    from inlaid.kernels.paged_attention import allocate_kv_caches
    from inlaid.model.arch import ModelArch
    from inlaid.model.loader import build_model, init_dummy_weights
    from inlaid.worker.cuda_graphs import CudaGraphRunner

    dev, dtype = torch.device("cuda"), torch.float16
    arch = ModelArch.from_dir(tiny_llama_dir)
    model = build_model(arch, dev, dtype)
    init_dummy_weights(model, seed=1)
    kv = allocate_kv_caches(arch.num_layers, 65, BLOCK, arch.num_kv_heads, arch.head_dim, dtype, dev)
    for c in kv:
        c.normal_()
    version = [0]
    runner = CudaGraphRunner(model, kv, 4, BLOCK, 64, dev, (1, 2, 4), weights_version=lambda: version[0])
    batch = build_forward_batch(_decode_step([5, 9], [-1, -1]), BLOCK, dev)
    with torch.inference_mode():
        for swap in range(3):
            out = runner.run(batch).float().clone()
            eager = model(batch, kv).float()
            assert (out - eager).abs().max().item() <= 1e-2 * eager.abs().max().item()
            proj = model.model.layers[0].self_attn.o_proj
            proj.weight = torch.nn.Parameter(torch.randn_like(proj.weight) * 0.05, requires_grad=False)
            version[0] += 1  # like a re-quantization swap: new tensors, new version
    assert len(runner.graphs) == 1


@pytest.mark.gpu
def test_a_held_capture_lock_runs_the_step_eagerly_and_captures_later(tiny_llama_dir) -> None:
    """Another thread's GPU work holds ``capture_lock``: no capture beside it; same hidden states eagerly."""
    from inlaid import LLM

    llm = LLM(model=str(tiny_llama_dir), device="cuda", dtype="float16", num_blocks=32, load_format="dummy")
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with graphs.capture_lock:
        held = llm.generate(["Hello world"], params)[0].token_ids
    assert graphs.eager_fallbacks > 0 and not graphs.graphs
    free = llm.generate(["Hello world"], params)[0].token_ids
    assert graphs.graphs and list(held) == list(free)

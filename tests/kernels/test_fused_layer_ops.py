"""Fused per-layer ops (RMSNorm + residual, silu * up, RoPE + KV write) vs their torch references.

Under ``TRITON_INTERPRET=1`` on CPU at tiny, odd shapes (hidden 96/100, T 1/7, KVH < H), compiled on CUDA,
plus ``gpu`` tests at Llama-2-7B shapes. Outputs are NaN-poisoned before the kernels run, so an element the
kernel never wrote shows up. What is claimed bit-identical is checked with ``torch.equal``; where the kernel
cannot be (the fp32 sum of squares' order, the interpreter's ``exp``), the distance is bounded in units in
the last place (ulp) of the output dtype. The model-wiring tests force the kernel path on CPU and check
that the fused residual stream gives the same bits as the plain layer call.
"""

from __future__ import annotations

import pytest
import torch

from triton_setup import DEVICE, HAS_CUDA, kernel_module  # skips the module without triton

rn, sm, rk = kernel_module("rms_norm"), kernel_module("silu_mul"), kernel_module("rotary_kv")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp16/bf16: one ulp at the intermediate rounding (normed x, silu(gate)), which the following product with the
# weight / up can spread to two ulp of the output; fp32: a few ulp of the fp32 statistics / exp.
ULP_BOUND = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place (adjacent floats are 1 apart; +0 and -0 are 0 apart)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = a.element_size() * 8
    itype = {16: torch.int16, 32: torch.int32}[bits]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(itype).long()
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


def _assert_within_ulp(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(y).all(), "non-finite output: some element was not written"
    d = ulps(y, ref)
    assert d.max().item() <= ULP_BOUND[y.dtype], f"max {d.max().item()} ulp apart ({(d > 0).sum().item()} elements)"
    if y.dtype != torch.float32:  # flips need an fp32 value next to a rounding boundary: rare
        assert (d > 0).float().mean().item() <= 0.01, f"{(d > 0).sum().item()} of {d.numel()} elements differ"


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch):
    """torch.empty / empty_like fill with NaN while the kernels allocate their outputs."""
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))
    yield
    monkeypatch.undo()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hidden", [(1, 96), (7, 100), (7, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(nan_empty, dtype, t, hidden, with_residual) -> None:
    g = _gen(hidden + t + with_residual)
    x = (torch.randn(t, hidden + 8, generator=g) * 3).to(DEVICE, dtype)[:, :hidden]  # strided rows
    w = (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, dtype)
    res = torch.randn(t, hidden, generator=g).to(DEVICE, dtype) if with_residual else None
    got = rn.rms_norm_triton(x, w, 1e-5, res)
    ref = rn.rms_norm_ref(x, w, 1e-5, res)
    if with_residual:
        assert torch.equal(got[1], ref[1]), "the new residual (x + residual) must be bit-identical"
        got, ref = got[0], ref[0]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    _assert_within_ulp(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_finishes_pending_sums(dtype) -> None:
    """A projection's uncast split-K sums (``PendingSums``) as the norm's x: with a residual the kernel rounds
    them as ``cast_sums`` would and zeroes them (the same bits as the cast launch then the norm); without one
    they are materialized first."""
    gemv = kernel_module("w4a16_gemv")
    g = torch.Generator().manual_seed(3)
    orig = (torch.randn(5, 96, generator=g) * 4).to(DEVICE)
    res = torch.randn(5, 96, generator=g).to(DEVICE, dtype)
    w = torch.rand(96, generator=g).to(DEVICE, dtype) + 0.5
    cast = torch.empty(5, 96, device=DEVICE, dtype=dtype)
    gemv.cast_sums(orig.clone(), [cast])
    for norm in (rn.rms_norm_triton, rn.rms_norm):  # the kernel itself (CPU: interpreted), then the dispatcher
        sums = orig.clone()
        want, got = norm(cast, w, 1e-5, res), norm(gemv.PendingSums(sums, dtype), w, 1e-5, res)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert int(sums.count_nonzero()) == 0
    sums = orig.clone()
    assert torch.equal(rn.rms_norm(gemv.PendingSums(sums, dtype), w, 1e-5), rn.rms_norm(cast, w, 1e-5))
    assert int(sums.count_nonzero()) == 0
    with pytest.raises(ValueError, match="residual"):
        rn.rms_norm_triton(gemv.PendingSums(orig.clone(), dtype), w, 1e-5)


def test_rms_norm_3d_input_and_bad_shapes() -> None:
    x = torch.randn(2, 3, 100).to(DEVICE, torch.float16)
    w = torch.rand(100).to(DEVICE, torch.float16) + 0.5
    _assert_within_ulp(rn.rms_norm_triton(x, w, 1e-6), rn.rms_norm_ref(x, w, 1e-6))
    with pytest.raises(ValueError, match="weight"):
        rn.rms_norm_triton(x, w[:99], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rn.rms_norm_triton(x, w, 1e-6, x[:1])


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_writes_the_scaled_fp16_copy(nan_empty, with_residual) -> None:
    """``x_half``: the kernel (and the dispatcher's torch path) also writes fp16(out * 2**-7), the input the M = 1
    W4 GEMV's pair step reads in place of bf16 x; checked bit for bit against that rounding of the returned
    output, with values that overflow fp16 unscaled (4e5) and ones whose scaled copy is subnormal (1e-5)."""
    g = _gen(7 + with_residual)
    x = (torch.randn(3, 96, generator=g) * 3).to(DEVICE, torch.bfloat16)
    w = (torch.rand(96, generator=g) + 0.5)
    w[:2] = torch.tensor([4e5, 1e-5])
    w = w.to(DEVICE, torch.bfloat16)
    res = torch.randn(3, 96, generator=g).to(DEVICE, torch.bfloat16) if with_residual else None
    for norm in (rn.rms_norm_triton, rn.rms_norm):
        half = torch.full((3, 96), float("nan"), device=DEVICE, dtype=torch.float16)
        got = norm(x, w, 1e-5, res, half)
        out = got[0] if with_residual else got
        assert torch.equal(half, (out.float() * 2**-7).half())
        assert torch.isfinite(half).all() and bool((half[:, 1] != 0).any())
    with pytest.raises(ValueError, match="x_half"):
        rn.rms_norm_triton(x, w, 1e-5, res, torch.empty(3, 96, device=DEVICE, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 100), (7, 96), (3, 5, 40), (2, 1500)])  # 1500: more than one block
def test_silu_mul_matches_reference(nan_empty, dtype, shape) -> None:
    g = _gen(sum(shape))
    gate = (torch.randn(shape, generator=g) * 4).to(DEVICE, dtype)
    up = torch.randn(shape, generator=g).to(DEVICE, dtype)
    got = sm.silu_mul_triton(gate, up)
    assert got.shape == gate.shape and got.dtype == dtype
    _assert_within_ulp(got, sm.silu_mul_ref(gate, up))
    if HAS_CUDA and dtype != torch.float32:  # the kernel copies torch's CUDA formula: claimed bit-identical
        assert torch.equal(got, sm.silu_mul_ref(gate, up))


def test_silu_mul_rejects_mismatched_inputs() -> None:
    a = torch.randn(3, 8).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="same shape"):
        sm.silu_mul_triton(a, a[:, :4])
    with pytest.raises(ValueError, match="out must be contiguous"):
        sm.silu_mul_triton(a, a, out=torch.empty(8, 3, device=DEVICE, dtype=torch.float16).t())


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_into_out_and_swiglu_materialize(dtype) -> None:
    """``out=`` receives the same values (kernel and reference); ``SwiGLU.materialize`` is ``silu_mul`` into its
    ``out`` and refuses an ``up`` / ``out`` unlike the gate."""
    g = _gen(5)
    gate, up = (torch.randn(4, 64, generator=g) * 4).to(DEVICE, dtype), torch.randn(4, 64, generator=g).to(DEVICE, dtype)
    for fn in (sm.silu_mul_triton, sm.silu_mul_ref, sm.silu_mul):
        out = torch.full_like(gate, float("nan"))
        assert fn(gate, up, out) is out and torch.equal(out, fn(gate, up))
    out = torch.empty_like(gate)
    assert sm.SwiGLU(up, out).materialize(gate) is out and torch.equal(out, sm.silu_mul(gate, up))
    assert torch.equal(sm.SwiGLU(up).materialize(gate), sm.silu_mul(gate, up))
    for bad in (sm.SwiGLU(up[:, :32]), sm.SwiGLU(up.to(torch.float64)), sm.SwiGLU(up, torch.empty(64, 4).t())):
        with pytest.raises(ValueError, match="like the gate"):
            bad.materialize(gate)


def _rope_inputs(t: int, h: int, kvh: int, d: int, dtype: torch.dtype, seed: int):
    """q/k/v as views of one fused qkv output (strided rows), cos/sin [T, 1, D] like RotaryEmbedding.cos_sin."""
    g = _gen(seed)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g).to(DEVICE, dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d: (h + kvh) * d].view(t, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 4000, (t,), generator=g)
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)
    return q, k, v, emb.cos().to(DEVICE, dtype)[:, None], emb.sin().to(DEVICE, dtype)[:, None]


def _cache(blocks: int, bs: int, kvh: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((2, blocks, bs, kvh, d), float("nan"), dtype=dtype, device=DEVICE)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where written, NaN (untouched) in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,kvh,d", [(1, 6, 2, 16), (7, 6, 2, 32), (7, 4, 4, 24)])  # d/2 = 12: masked lanes
def test_rotary_and_write_kv_bit_identical(nan_empty, dtype, t, h, kvh, d) -> None:
    q, k, v, cos, sin = _rope_inputs(t, h, kvh, d, dtype, seed=t * h + d)
    slots = torch.randperm(6 * 4, generator=_gen(d))[:t].to(DEVICE)
    c_got, c_ref = _cache(6, 4, kvh, d, dtype), _cache(6, 4, kvh, d, dtype)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    qg, kg = rk.rotary_and_write_kv_triton(q, k, v, cos, sin, c_got, slots)
    qr, kr = rk.rotary_and_write_kv_ref(q, k, v, cos, sin, c_ref, slots)
    assert torch.equal(qg, qr) and torch.equal(kg, kr), "q_rot/k_rot must be bit-identical"
    assert _same(c_got, c_ref), "cache contents must be bit-identical (and untouched slots untouched)"
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0), "inputs must not be written"


def test_rotary_padding_rows_share_the_scratch_slot() -> None:
    t, h, kvh, d = 5, 4, 2, 16
    q, k, v, cos, sin = _rope_inputs(t, h, kvh, d, torch.float16, seed=9)
    slots = torch.tensor([5, 2, 0, 0, 0], device=DEVICE)  # rows 2-4: CUDA-graph padding on scratch slot 0
    c_got, c_ref = _cache(2, 4, kvh, d, torch.float16), _cache(2, 4, kvh, d, torch.float16)
    _, kg = rk.rotary_and_write_kv_triton(q, k, v, cos, sin, c_got, slots)
    rk.rotary_and_write_kv_ref(q, k, v, cos, sin, c_ref, slots)
    flat = c_got.view(2, 8, kvh, d)
    assert _same(c_got.view(2, 8, kvh, d)[:, 1:], c_ref.view(2, 8, kvh, d)[:, 1:])
    # the padding rows race for slot 0 (on a GPU element by element): each element holds one of theirs
    assert all(torch.stack([flat[i, 0] == x[r] for r in (2, 3, 4)]).any(0).all() for i, x in ((0, kg), (1, v)))


def test_rotary_rejects_bad_shapes() -> None:
    q, k, v, cos, sin = _rope_inputs(3, 4, 2, 16, torch.float16, seed=1)
    cache = _cache(2, 4, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="slot_mapping"):
        rk.rotary_and_write_kv_triton(q, k, v, cos, sin, cache, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="kv_cache"):
        rk.rotary_and_write_kv_triton(q, k, v, cos, sin, _cache(2, 4, 1, 16, torch.float16),
                                      torch.zeros(3, dtype=torch.long, device=DEVICE))


# ---- wiring into the model --------------------------------------------------------------------------------

def _tiny_model(dtype: torch.dtype, device: str = DEVICE):  # noqa: ANN202
    from inlaid.model.arch import ModelArch
    from inlaid.model.llama import LlamaForCausalLM
    from inlaid.model.loader import init_dummy_weights

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=200,
               num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2, vocab_size=300,
               rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(ModelArch.from_dict(cfg), torch.device(device), dtype)
    init_dummy_weights(model, seed=3)
    return model


def _prefill_batch(lens: list[int], block_size: int, device: str = DEVICE):  # noqa: ANN202
    """Fresh sequences of ``lens`` tokens; sequence b owns blocks b*8 .. b*8+7 (reversed, so not contiguous)."""
    from inlaid.model.batch import ForwardBatch

    ids, pos, slots, starts = [], [], [], [0]
    tables = [list(range(b * 8 + 7, b * 8 - 1, -1)) for b in range(len(lens))]
    for b, n in enumerate(lens):
        ids += [(7 * b + 3 * i) % 290 + 5 for i in range(n)]
        pos += list(range(n))
        slots += [tables[b][p // block_size] * block_size + p % block_size for p in range(n)]
        starts.append(starts[-1] + n)
    i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
    return ForwardBatch(input_ids=torch.tensor(ids, **i64), positions=torch.tensor(pos, **i64),
                        slot_mapping=torch.tensor(slots, **i64), query_start_loc=torch.tensor(starts, **i32),
                        seq_lens=torch.tensor(lens, **i32), block_tables=torch.tensor(tables, **i32),
                        lora_slots=torch.full((sum(lens),), -1, **i64),
                        logits_indices=torch.tensor([s - 1 for s in starts[1:]], **i64),
                        max_query_len=max(lens), max_seq_len=max(lens))


def _forward(model, lens: list[int]):  # noqa: ANN001, ANN202
    from inlaid.kernels.paged_attention import allocate_kv_caches

    dtype = model.model.embed_tokens.weight.dtype
    caches = allocate_kv_caches(2, 8 * len(lens), 4, 2, 16, dtype, DEVICE)
    with torch.no_grad():
        return model(_prefill_batch(lens, 4), caches), caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_residual_stream_gives_the_plain_layers_bits(dtype) -> None:
    """LlamaModel's (h, residual) form == plain ``layer(x) -> x`` calls (what calibration uses) + final norm."""
    from inlaid.kernels.paged_attention import allocate_kv_caches

    model = _tiny_model(dtype)
    fused, _ = _forward(model, [9, 5])
    batch = _prefill_batch([9, 5], 4)
    inner = model.model
    with torch.no_grad():
        x = inner.embed_tokens(batch.input_ids)
        cos, sin = inner.rotary_emb.cos_sin(batch.positions, dtype)
        for layer, cache in zip(inner.layers, allocate_kv_caches(2, 16, 4, 2, 16, dtype, DEVICE)):
            x = layer(x, cos, sin, cache, batch, None)
        plain = inner.norm(x)
    assert torch.equal(fused, plain)


def test_model_runs_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the kernel path (on CPU: the interpreter): every op dispatches to its kernel; output ~ reference."""
    model = _tiny_model(torch.float16)
    ref, ref_caches = _forward(model, [9, 5])
    calls = {"rms": 0, "silu": 0, "rope": 0}
    for mod, name, key in ((rn, "rms_norm_triton", "rms"), (sm, "silu_mul_triton", "silu"),
                           (rk, "rotary_and_write_kv_triton", "rope")):
        def counted(*a, _f=getattr(mod, name), _k=key, **kw):  # noqa: ANN002, ANN003, ANN202
            calls[_k] += 1
            return _f(*a, **kw)

        monkeypatch.setattr(mod, name, counted)
        monkeypatch.setattr(mod, "fused_ok", lambda x, *a: x.dtype == torch.float16)
    got, caches = _forward(model, [9, 5])
    assert calls == {"rms": 2 * 2 + 1, "silu": 2, "rope": 2}
    assert torch.isfinite(got).all()
    scale = ref.float().abs().max().item()
    assert (got.float() - ref.float()).abs().max().item() <= 2e-2 * scale
    for c, r in zip(caches, ref_caches):  # layer 0's K/V: same inputs, bit-identical rotary + write
        assert torch.equal(c, r)
        break


# ---- GPU, Llama-2-7B shapes (the lead runs these on the H200) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 32, 2048])
def test_gpu_7b_shapes(dtype, t) -> None:
    g = _gen(t)
    x = torch.randn(t, 4096, generator=g).to("cuda", dtype)
    res = torch.randn(t, 4096, generator=g).to("cuda", dtype)
    w = (torch.rand(4096, generator=g) + 0.5).to("cuda", dtype)
    assert rn.fused_ok(x, w, res)
    (o, r), (oref, rref) = rn.rms_norm(x, w, 1e-5, res), rn.rms_norm_ref(x, w, 1e-5, res)
    assert torch.equal(r, rref)
    _assert_within_ulp(o, oref)
    gate = (torch.randn(t, 11008, generator=g) * 4).to("cuda", dtype)
    up = torch.randn(t, 11008, generator=g).to("cuda", dtype)
    assert torch.equal(sm.silu_mul(gate, up), sm.silu_mul_ref(gate, up)), "silu_mul claimed bit-identical on CUDA"
    q, k, v, cos, sin = _rope_inputs(t, 32, 8, 128, dtype, seed=t)
    blocks = -(-t // 16) + 1
    slots = torch.randperm(blocks * 16, generator=g)[:t].cuda()
    c1, c2 = _cache(blocks, 16, 8, 128, dtype), _cache(blocks, 16, 8, 128, dtype)
    got, ref = rk.rotary_and_write_kv(q, k, v, cos, sin, c1, slots), rk.rotary_and_write_kv_ref(q, k, v, cos, sin,
                                                                                                c2, slots)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and _same(c1, c2)


@pytest.mark.gpu
def test_gpu_fused_model_matches_reference_and_captures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp16 model on CUDA with the kernels vs with the references forced; a decode step in a CUDA graph."""
    model = _tiny_model(torch.float16, "cuda")
    got, _ = _forward(model, [9, 5])
    for mod in (rn, sm, rk):
        monkeypatch.setattr(mod, "fused_ok", lambda *a, **k: False)
    ref, _ = _forward(model, [9, 5])
    monkeypatch.undo()
    assert (got.float() - ref.float()).abs().max().item() <= 2e-2 * ref.float().abs().max().item()
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    w = torch.ones(4096, device="cuda", dtype=torch.float16)
    out, _ = rn.rms_norm(x, w, 1e-5, x)  # warm-up (compile) outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = rn.rms_norm(x, w, 1e-5, x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rn.rms_norm(x, w, 1e-5, x)[0])


def test_bench_script_cpu_smoke(tmp_path) -> None:
    """benchmarks/fused_ops_bench.py --device cpu --quick writes its two files and finds every op exact here."""
    import importlib.util
    import json
    from pathlib import Path

    if HAS_CUDA:
        pytest.skip("the CPU smoke path; the lead runs the script on the GPU")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_ops_bench.py"
    spec = importlib.util.spec_from_file_location("fused_ops_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "f")]) == 0
    data = json.loads((tmp_path / "f.json").read_text())
    assert {r["op"] for r in data["rows"]} == {"rms_norm+residual", "silu_mul", "rotary+write_kv"}
    for r in data["rows"]:  # the same bounds as the tests above
        assert all(v["max_ulp"] <= 2 for v in r["check"].values()), r
    assert "Exactness" in (tmp_path / "f.md").read_text()

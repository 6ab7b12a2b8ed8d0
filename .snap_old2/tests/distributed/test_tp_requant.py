"""Re-quantization under tensor parallelism (CPU, gloo, 2 ranks) on a 4-bit g32 MLGPTQ tiny checkpoint.

Adding task c with calibration at TP=2 must give what it gives at TP=1: the same live logits (every step's, all
ranks contribute through the all-reduces) and greedy outputs, a bit-identical written checkpoint and status
"done". A failure mid-job (in the GPTQ, or a swap that one rank refuses) leaves the old base on every rank.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from tp_helpers import OPTS, PROMPTS

from inlaid import LLM, SamplingParams
from inlaid.distributed import requant as tp_requant
from inlaid.distributed.requant import cut_layer
from inlaid.quant import requant as requant_mod
from inlaid.quant.hessian import HessianStore
from inlaid.quant.linear import PROJECTIONS
from inlaid.quant.quantize_model import quantize_model

ADAPTERS = [None, "a", "b", "c", "c"]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _rows(k: int) -> list[dict]:
    return [{"prompt": f"Translate: cat {i} t{k}", "completion": "chat " * (i % 4 + k + 1)} for i in range(8)]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    """The {a, b} MLGPTQ base (kept pristine) and calibration files."""
    root = tmp_path_factory.mktemp("tp_requant")
    calib = {}
    for k, n in enumerate("abc"):
        calib[n] = root / f"{n}.jsonl"
        calib[n].write_text("".join(json.dumps(r) + "\n" for r in _rows(k)))
    ads = {n: str(tiny_adapters[n]) for n in "abc"}
    quantize_model(str(tiny_llama_dir), {k: ads[k] for k in "ab"}, {k: calib[k] for k in "ab"}, "mlgptq", 4, 32,
                   root / "ab")
    return {"root": root, "ab": root / "ab", "calib": calib, "ads": ads}


def _record_logits(llm: LLM) -> list[torch.Tensor]:
    """Every step's full logits as rank 0 sees them (after the vocab all-gather under TP)."""
    model, seen = llm.engine.parts.model, []
    real = model.compute_logits

    def compute_logits(hidden):
        out = real(hidden)
        seen.append(out.detach().clone())
        return out

    model.compute_logits = compute_logits
    return seen


def _run(llm: LLM, seen: list[torch.Tensor]) -> tuple[list[list[int]], list[torch.Tensor]]:
    seen.clear()
    tokens = [o.token_ids for o in llm.generate(PROMPTS, PARAMS, adapter=ADAPTERS)]
    return tokens, list(seen)


def _served(llm: LLM) -> dict[int, dict]:
    layers = llm.engine.parts.model.model.layers
    return {i: {rel: dict(layers[i].get_submodule(rel)._buffers) for rel in PROJECTIONS} for i in range(len(layers))}


def _add_c(setup, tp: int) -> dict:
    ckpt = setup["root"] / f"tp{tp}"
    shutil.copytree(setup["ab"], ckpt)
    llm = LLM(model=str(ckpt), adapters={n: setup["ads"][n] for n in "ab"}, tensor_parallel_size=tp, **OPTS)
    before = {i: {rel: {k: t.clone() for k, t in d.items() if t is not None} for rel, d in layer.items()}
              for i, layer in _served(llm).items()}  # copies: swaps write into the served buffers
    llm.add_adapter("c", setup["ads"]["c"], calibration=str(setup["calib"]["c"]))
    status = llm.wait_requant("c", timeout=120)
    seen = _record_logits(llm)
    tokens, logits = _run(llm, seen)
    return {"llm": llm, "ckpt": ckpt, "status": status, "tokens": tokens, "logits": logits, "seen": seen,
            "before": before}


@pytest.fixture(scope="module")
def added(setup):
    """Task c added with calibration to a TP=1 and a TP=2 engine, each on its own copy of the {a, b} base."""
    one = _add_c(setup, 1)
    two = _add_c(setup, 2)
    yield {1: one, 2: two}
    two["llm"].shutdown()


def test_tp2_requant_serves_like_tp1(added):
    one, two = added[1], added[2]
    for run in (one, two):
        status = run["status"]
        assert status["quantization"] == "done", status
        assert status["layers_swapped"] == status["num_layers"] == 2 and status["tasks"] == ["a", "b", "c"]
        assert run["llm"].adapter_status("c")["base_tasks"] == ["a", "b", "c"]
    assert two["tokens"] == one["tokens"]
    assert len(two["logits"]) == len(one["logits"]) > 0
    for got, want in zip(two["logits"], one["logits"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # rank 0 serves exactly the loader's cut of the TP=1 layers (rank 1's share shows in the logits above)
    full, shard = _served(one["llm"]), _served(two["llm"])
    for i in full:
        want = cut_layer(full[i], two["llm"].engine.parts.arch, 0, 2, 4, 32)
        for rel in PROJECTIONS:
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(shard[i][rel][key], want[rel][key]), (i, rel, key)
    # not vacuous: the swaps changed the served weights on rank 0
    assert any(not torch.equal(two["before"][i][rel]["qweight"], shard[i][rel]["qweight"])
               for i in shard for rel in PROJECTIONS)


def _split_safetensors(path) -> tuple[dict, bytes]:
    """(parsed JSON header, raw tensor bytes). The header is compared parsed: safetensors writes the metadata
    keys in hash-map order, which differs between two saves of the same dict even in one process."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_tp2_written_checkpoint_is_bit_identical_to_tp1(added):
    one, two = added[1], added[2]
    header1, data1 = _split_safetensors(one["ckpt"] / "model.safetensors")
    header2, data2 = _split_safetensors(two["ckpt"] / "model.safetensors")
    assert header2 == header1 and json.loads(header1["__metadata__"]["inlaid_tasks"]) == ["a", "b", "c"]
    assert data2 == data1  # every tensor byte, at the same offsets
    assert HessianStore(two["ckpt"] / "hessians").tasks() == ["a", "b", "c"]
    s1, s2 = HessianStore(one["ckpt"] / "hessians"), HessianStore(two["ckpt"] / "hessians")
    for i in range(2):
        for g in ("qkv", "o", "gate_up", "down"):
            (h1, n1), (h2, n2) = s1.load("c", i, g), s2.load("c", i, g)
            assert n1 == n2 and torch.equal(h1, h2), (i, g)


def _drain_until(llm: LLM, name: str, swapped: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while llm.adapter_status(name)["layers_swapped"] < swapped:
        assert time.monotonic() < deadline, llm.adapter_status(name)
        llm.engine.run_between_steps()
        time.sleep(0.01)


@pytest.mark.parametrize("where", ["gptq", "swap refused on rank 0"])
def test_tp2_failure_mid_requant_keeps_the_old_base_on_every_rank(added, setup, monkeypatch, where):
    two = added[2]
    llm, ckpt = two["llm"], two["ckpt"]
    stored = (ckpt / "model.safetensors").read_bytes()
    gate = threading.Event()
    real_q, real_prep = requant_mod.requantize_layer, tp_requant._prepare

    def gptq(idx, *args, **kw):
        if idx == 1:
            assert gate.wait(60)
            raise RuntimeError("injected failure at layer 1")
        return real_q(idx, *args, **kw)

    def prepare(model, arch, tp, idx, full):
        if idx == 1 and not gate.is_set():
            raise ValueError("injected refusal at layer 1")
        return real_prep(model, arch, tp, idx, full)

    monkeypatch.setattr(requant_mod, "requantize_layer", gptq if where == "gptq" else real_q)
    monkeypatch.setattr(tp_requant, "_prepare", prepare)
    name = "d" if where == "gptq" else "e"
    llm.add_adapter(name, setup["ads"]["a"], calibration=_rows(5 if where == "gptq" else 6))
    _drain_until(llm, name, 1)  # layer 0 is on the new base on every rank
    if where == "gptq":  # the job is held before layer 1: the ranks serve a half-new base now
        _, mid = _run(llm, two["seen"])
        assert any(not torch.allclose(m, r, atol=1e-4) for m, r in zip(mid, two["logits"]))
        gate.set()
    status = llm.wait_requant(name, timeout=60)
    gate.set()
    assert status["quantization"] == "failed", status
    assert "injected" in status["error"]
    tokens, logits = _run(llm, two["seen"])
    assert tokens == two["tokens"]
    for got, want in zip(logits, two["logits"]):
        assert torch.equal(got, want)  # layer 0 rolled back on both ranks; layer 1 never changed anywhere
    assert (ckpt / "model.safetensors").read_bytes() == stored
    assert HessianStore(ckpt / "hessians").tasks() == ["a", "b", "c"]


def test_tp2_a_swap_one_rank_refuses_changes_no_rank(added, monkeypatch):
    """The all-or-nothing agreement itself (no rollback involved): rank 0 refuses, so rank 1 must not install."""
    two = added[2]
    llm = two["llm"]
    target = llm.engine.requantizer.swap_target
    full = target.snapshot(1)
    flipped = {rel: {**d, "qweight": d["qweight"] ^ 0x11111111} for rel, d in full.items()}
    real_prep = tp_requant._prepare

    def refuse(model, arch, tp, idx, layer):
        raise ValueError("injected refusal")

    monkeypatch.setattr(tp_requant, "_prepare", refuse)
    with pytest.raises(ValueError, match="refused on the tensor-parallel ranks.*injected refusal"):
        target.install(1, flipped)
    tokens, logits = _run(llm, two["seen"])
    assert tokens == two["tokens"] and all(torch.equal(g, w) for g, w in zip(logits, two["logits"]))
    monkeypatch.setattr(tp_requant, "_prepare", real_prep)
    target.install(1, flipped)  # accepted: the flipped codes change the outputs (the check above is not vacuous)
    _, changed = _run(llm, two["seen"])
    assert any(not torch.allclose(g, w, atol=1e-4) for g, w in zip(changed, two["logits"]))
    target.install(1, full)
    _, back = _run(llm, two["seen"])
    assert all(torch.equal(g, w) for g, w in zip(back, two["logits"]))


def test_tp2_requant_through_async_llm_lands_between_idle_steps(added, setup):
    """The server path: AsyncLLM's engine thread applies the swaps when the requantizer wakes it (no requests),
    and the result equals the same addition at TP=1. Runs last: closing the AsyncLLM stops the TP=2 engine."""
    import asyncio

    from inlaid.engine.async_llm import AsyncLLM

    one, two = added[1], added[2]
    one["llm"].add_adapter("f", setup["ads"]["b"], calibration=_rows(7), wait=True)
    allm = AsyncLLM(two["llm"].engine)

    async def scenario() -> tuple[dict, list[int]]:
        await allm.add_adapter("f", setup["ads"]["b"], calibration=_rows(7))
        deadline = time.monotonic() + 60
        while (status := await allm.adapter_status("f"))["quantization"] in ("pending", "running"):
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        outs = [o async for o in allm.generate("r1", PROMPTS[0], PARAMS, adapter="f")]
        return status, outs[-1].token_ids

    try:
        status, tokens = asyncio.run(scenario())
    finally:
        allm.close()
    assert status["quantization"] == "done" and status["layers_swapped"] == 2, status
    assert tokens == one["llm"].generate(PROMPTS[0], PARAMS, adapter="f")[0].token_ids
    assert _split_safetensors(two["ckpt"] / "model.safetensors") == _split_safetensors(one["ckpt"] / "model.safetensors")
    assert not any(p.is_alive() for p in two["llm"].engine.parts.tp_group.procs)  # close() stopped the workers

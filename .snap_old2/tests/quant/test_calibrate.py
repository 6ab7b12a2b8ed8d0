"""Calibration: JSONL samples (same tokens as the task suite), and layer-by-layer Hessians vs a full hooked forward."""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.config import ModelConfig
from inlaid.kernels.paged_attention import allocate_kv_caches
from inlaid.lora.adapter import load_adapter
from inlaid.lora.errors import IncompatibleAdapterError
from inlaid.lora.synthetic import random_adapter, save_peft
from inlaid.model.loader import load_model
from inlaid.quant.calibrate import (
    HOOK_POINTS,
    BLOCK_SIZE,
    CalibrationError,
    calibrate_task,
    capture_task_hessians,
    chunk_samples,
    load_calibration,
    prefill_batch,
    single_adapter_pool,
)
from inlaid.quant.hessian import HessianAccumulator, HessianStore

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model, arch, path = load_model(ModelConfig(model=str(tiny_llama_dir)), CPU, torch.float32)
    from transformers import AutoTokenizer

    return model, arch, AutoTokenizer.from_pretrained(str(path))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_tokens_match_the_task_suite(tmp_path, tiny):
    from inlaid.tasks.prompting import encode_example
    from inlaid.tasks.registry import get_task

    _, _, tok = tiny
    rows = [{"prompt": "Translate: cat", "completion": "chat"}, {"prompt": "12 + 7 =", "completion": "19"}]
    samples = load_calibration(_write(tmp_path / "c.jsonl", rows), tok)
    for row, ids in zip(rows, samples):
        p, a = encode_example(tok, get_task("math_gsm"), row["prompt"], row["completion"])
        assert ids == p + a


def test_text_rows_and_caps(tmp_path, tiny):
    _, _, tok = tiny
    rows = [{"text": "Hello world, this is a tiny tokenizer for tests. " * 3}] * 5
    path = _write(tmp_path / "t.jsonl", rows)
    full = tok(rows[0]["text"])["input_ids"]
    assert load_calibration(path, tok) == [full] * 5
    assert len(load_calibration(path, tok, max_samples=2)) == 2
    assert all(len(s) == 7 for s in load_calibration(path, tok, max_seq_len=7))
    capped = load_calibration(path, tok, max_tokens=len(full) + 3)
    assert [len(s) for s in capped] == [len(full), 3]


@pytest.mark.parametrize("content, match", [
    ("", "no usable examples"),
    ("\n\n", "no usable examples"),
    ("{not json\n", "not valid JSON"),
    ('{"prompt": "x"}\n', "'prompt' and 'completion'"),
    ("[1, 2]\n", "JSON object"),
])  # fmt: skip
def test_bad_calibration_files(tmp_path, tiny, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_calibration(path, tiny[2])


def test_missing_calibration_file(tmp_path, tiny):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nope.jsonl", tiny[2])


def _samples(n=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 384, (int(L),), generator=g).tolist() for L in torch.randint(5, 40, (n,), generator=g)]


@torch.no_grad()
def _full_forward_hessians(model, arch, samples, adapter, chunk_tokens):
    """Reference: hook every layer and run whole-model forwards (not layer by layer)."""
    accs = {i: {g: HessianAccumulator(n) for g, n in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 128))}
            for i in range(arch.num_layers)}  # fmt: skip
    # The model calls ParallelLinear.forward_local (module hooks would not fire): wrap each linear's
    # quant_method.apply, the one call every forward path makes, and restore it afterwards.
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for group, (sub, proj) in HOOK_POINTS.items():
            method = getattr(getattr(layer, sub), proj).quant_method
            inner = method.apply

            def apply(lin, x, acc=accs[i][group], inner=inner):
                acc.add(x)
                return inner(lin, x)

            method.apply = apply
            wrapped.append(method)
    pool = single_adapter_pool(adapter, arch, CPU, torch.float32) if adapter else None
    model.set_lora_hook(pool)
    try:
        for chunk in chunk_samples(samples, chunk_tokens):
            batch, n_blocks = prefill_batch(chunk, CPU, 0 if pool else -1)
            caches = allocate_kv_caches(arch.num_layers, n_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim,
                                        torch.float32, CPU)  # fmt: skip
            model(batch, caches)
    finally:
        model.set_lora_hook(None)
        for method in wrapped:
            method.__dict__.pop("apply", None)
    return accs


@pytest.mark.parametrize("adapter_name", [None, "b"])
def test_layer_by_layer_equals_full_forward(tiny, tiny_adapters, adapter_name):
    model, arch, _ = tiny
    adapter = load_adapter(adapter_name, tiny_adapters[adapter_name]) if adapter_name else None
    samples = _samples()
    got = capture_task_hessians(model, arch, samples, adapter, CPU, torch.float32, max_batch_tokens=50)
    ref = _full_forward_hessians(model, arch, samples, adapter, chunk_tokens=50)
    assert sorted(got) == list(range(arch.num_layers))
    for i in range(arch.num_layers):
        for g in HOOK_POINTS:
            assert got[i][g].n_samples == sum(map(len, samples)) == ref[i][g].n_samples
            torch.testing.assert_close(got[i][g].hessian, ref[i][g].hessian, rtol=1e-5, atol=1e-5)


def test_adapter_changes_hessians_where_it_should(tiny, tiny_adapters):
    model, arch, _ = tiny
    samples = _samples()
    base = capture_task_hessians(model, arch, samples, None, CPU, torch.float32)
    with_a = capture_task_hessians(model, arch, samples, load_adapter("a", tiny_adapters["a"]), CPU, torch.float32)
    # layer 0's q/k/v input is the normed embedding: no adapter can change it
    assert torch.equal(base[0]["qkv"].hessian, with_a[0]["qkv"].hessian)
    # adapter "a" adapts q/v, so o_proj's input in layer 0 and everything in layer 1 move
    for layer, group in ((0, "o"), (1, "qkv"), (1, "gate_up"), (1, "down")):
        diff = (base[layer][group].hessian - with_a[layer][group].hessian).abs().max()
        assert float(diff) > 1e-3 * float(base[layer][group].hessian.abs().max()), (layer, group)


def test_calibrate_task_writes_the_store(tmp_path, tiny, tiny_adapters):
    model, arch, _ = tiny
    adapter = load_adapter("c", tiny_adapters["c"])
    samples = _samples(3)
    store = HessianStore(tmp_path / "h")
    n = calibrate_task(model, arch, "c", samples, adapter, store, CPU, torch.float32)
    ref = capture_task_hessians(model, arch, samples, adapter, CPU, torch.float32)
    assert n == sum(map(len, samples)) and store.tasks() == ["c"] and store.layers("c") == [0, 1]
    for i in range(arch.num_layers):
        for g in HOOK_POINTS:
            h, count = store.load("c", i, g)
            assert count == n and torch.equal(h, ref[i][g].hessian)


def test_adapter_of_another_base_is_rejected(tmp_path, tiny):
    model, arch, _ = tiny
    shapes = {m: (i * 2, o * 2) for m, (i, o) in arch.lora_module_shapes().items()}
    path = save_peft(random_adapter("x", shapes, arch.num_layers, 4), tmp_path / "x")
    with pytest.raises(IncompatibleAdapterError, match="another base"):
        capture_task_hessians(model, arch, _samples(2), load_adapter("x", path), CPU, torch.float32)


def test_no_samples_is_an_error(tiny):
    model, arch, _ = tiny
    with pytest.raises(CalibrationError):
        capture_task_hessians(model, arch, [], None, CPU, torch.float32)

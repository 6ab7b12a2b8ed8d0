"""Bad input to incremental re-quantization (issue 7) that ``test_requant.py`` does not cover: each case is a
clear ``ValueError`` subclass naming the fix, and the stored checkpoint, its Hessian store and (where a model
is served) the served weights stay exactly as they were."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from requant_gate import hold_requant_layers
from safetensors.torch import load_file, save_file

from inlaid import LLM
from inlaid.lora.adapter import load_adapter
from inlaid.lora.errors import IncompatibleAdapterError
from inlaid.quant.calibrate import CalibrationError
from inlaid.quant.hessian import HessianStore
from inlaid.quant.quantize_model import HESSIAN_DIR, quantize_model
from inlaid.quant.requant import RequantError, Requantizer, samples_from_rows


@pytest.fixture(scope="module")
def base(tiny_llama_dir, tiny_adapters, tmp_path_factory, write_calib):
    """A 4-bit g32 MLGPTQ checkpoint for task {a} (kept pristine; tests copy it)."""
    root = tmp_path_factory.mktemp("requant_errors")
    calib = write_calib(root, ["a"], n=6)["a"]
    quantize_model(str(tiny_llama_dir), {"a": str(tiny_adapters["a"])}, {"a": str(calib)}, "mlgptq", 4, 32, root / "q")
    return {"root": root, "q": root / "q", "calib": calib, "ads": {n: str(p) for n, p in tiny_adapters.items()}}


@pytest.fixture
def ckpt(base, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(base["q"], dst)
    return dst


def _unchanged(ckpt, stored: bytes) -> bool:
    return (ckpt / "model.safetensors").read_bytes() == stored and HessianStore(ckpt / HESSIAN_DIR).tasks() == ["a"]


def test_bad_samples_are_rejected_before_anything_is_queued(ckpt, tiny_llama_dir):
    from inlaid.model.arch import ModelArch

    arch = ModelArch.from_dir(tiny_llama_dir)
    rq = Requantizer(ckpt, arch)
    stored = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(CalibrationError, match=r"token ids must be in \[0, "):
        rq.submit("c", None, [[1, 2, arch.vocab_size]])
    with pytest.raises(CalibrationError, match="samples are empty"):
        rq.submit("c", None, [[1, 2], []])
    with pytest.raises(CalibrationError, match="have no tokens"):
        samples_from_rows([{"input_ids": []}], None)
    with pytest.raises(CalibrationError, match="object or a list of token ids"):
        samples_from_rows(["just a string"], None)
    with pytest.raises(CalibrationError, match="no tokenizer"):
        samples_from_rows([{"prompt": "p", "completion": "c"}], None)
    assert rq.status("c") is None and not rq.busy() and _unchanged(ckpt, stored)
    rq.close()


def test_malformed_calibration_file_names_the_line(base, ckpt, tmp_path, calib_rows):
    llm = LLM(model=str(ckpt), adapters={"a": base["ads"]["a"]}, device="cpu", num_blocks=32)
    stored = (ckpt / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(calib_rows()[0]) + "\n{not json\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:2: not valid JSON"):
        llm.add_adapter("c", base["ads"]["c"], calibration=str(bad))
    bad.write_text("[1, 2, 3]\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:1: each line must be a JSON object"):
        llm.add_adapter("c", base["ads"]["c"], calibration=str(bad))
    bad.write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    with pytest.raises(CalibrationError, match="'prompt' and 'completion'"):
        llm.add_adapter("c", base["ads"]["c"], calibration=str(bad))
    assert "c" not in llm.engine.list_adapters() and _unchanged(ckpt, stored)


def test_incompatible_adapter_is_refused_by_the_requantizer(base, ckpt, tiny_llama_dir, tmp_path):
    """``Requantizer.submit`` validates the adapter itself (not only the engine's registry)."""
    from inlaid.model.arch import ModelArch

    rq = Requantizer(ckpt, ModelArch.from_dir(tiny_llama_dir))
    stored = (ckpt / "model.safetensors").read_bytes()
    foreign = tmp_path / "foreign"  # adapter "b" as if trained for a base with twice the hidden size
    shutil.copytree(base["ads"]["b"], foreign)
    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    save_file({k: torch.cat([t, t], 1) if "lora_A" in k else t for k, t in tensors.items()},
              str(foreign / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(IncompatibleAdapterError):
        rq.submit("b", load_adapter("b", str(foreign)), [[1, 2, 3]])
    assert rq.status("b") is None and not rq.busy() and _unchanged(ckpt, stored)
    rq.close()


def test_same_task_while_it_runs_is_refused_and_the_running_job_finishes(base, ckpt, tiny_llama_dir, monkeypatch):
    from inlaid.model.arch import ModelArch

    rq = Requantizer(ckpt, ModelArch.from_dir(tiny_llama_dir))
    gate, entered = hold_requant_layers(monkeypatch)
    rq.submit("c", None, [[5, 6, 7, 8]] * 3)
    assert entered.wait(60)
    assert rq.status("c")["quantization"] == "running"
    with pytest.raises(RequantError, match="already being added"):
        rq.submit("c", None, [[1, 2, 3]])
    queued = rq.submit("d", None, [[9, 10, 11]])  # another task queues behind it (FIFO)
    assert queued.state == "pending"
    gate.set()
    assert rq.wait(timeout=120)
    assert rq.status("c")["quantization"] == rq.status("d")["quantization"] == "done"
    assert rq.committed_tasks() == ["a", "c", "d"]
    rq.close()


def test_checkpoints_that_cannot_be_requantized(base, tmp_path, tiny_llama_dir):
    from inlaid.model.arch import ModelArch

    arch = ModelArch.from_dir(tiny_llama_dir)
    rtn = tmp_path / "rtn"
    quantize_model(str(tiny_llama_dir), {}, {}, "rtn", 4, 32, rtn)
    with pytest.raises(RequantError, match="does not aggregate task Hessians"):
        Requantizer(rtn, arch)
    nostore = tmp_path / "nostore"
    shutil.copytree(base["q"], nostore)
    shutil.rmtree(nostore / HESSIAN_DIR)
    with pytest.raises(RequantError, match="no Hessian store"):
        Requantizer(nostore, arch)
    noweights = tmp_path / "noweights"
    shutil.copytree(base["q"], noweights)
    (noweights / "model.safetensors").unlink()
    with pytest.raises(RequantError, match="no model.safetensors"):
        Requantizer(noweights, arch)
    with pytest.raises(ValueError, match="num_threads"):
        Requantizer(base["q"], arch, num_threads=0)


def test_served_model_of_another_checkpoint_is_refused(base, tmp_path, tiny_llama_dir):
    g64 = tmp_path / "g64"
    quantize_model(str(tiny_llama_dir), {"a": base["ads"]["a"]}, {"a": str(base["calib"])}, "mlgptq", 4, 64, g64)
    llm = LLM(model=str(g64), device="cpu", num_blocks=16)
    with pytest.raises(RequantError, match="not the 4-bit g32 GPTQ checkpoint"):
        Requantizer(base["q"], llm.engine.parts.arch, llm.engine.parts.model)


def test_a_bin_only_base_is_requantized_from_its_real_weights(tiny_llama_dir, tmp_path):
    """A base with only pytorch_model.bin is read (memory-mapped), not replaced by dummy weights."""
    from safetensors.torch import load_file as load_st

    from inlaid.model.arch import ModelArch

    fp = tmp_path / "bin_base"
    shutil.copytree(tiny_llama_dir, fp)
    torch.save(load_st(str(fp / "model.safetensors")), fp / "pytorch_model.bin")
    (fp / "model.safetensors").unlink()
    rows = {n: [{"input_ids": [k + 3 * i for i in range(10)]}] * 3 for k, n in enumerate("ab", 1)}
    calib = {}
    for n, r in rows.items():
        calib[n] = tmp_path / f"{n}.jsonl"
        calib[n].write_text("".join(json.dumps(x) + "\n" for x in r))
    quantize_model(str(fp), {}, {"a": str(calib["a"])}, "mlgptq", 4, 32, tmp_path / "a")
    quantize_model(str(fp), {}, {n: str(p) for n, p in calib.items()}, "mlgptq", 4, 32, tmp_path / "ab")
    rq = Requantizer(tmp_path / "a", ModelArch.from_dir(fp))
    assert not rq.source.dummy and rq.source.bin
    rq.submit("b", None, [r["input_ids"] for r in rows["b"]])
    assert rq.wait("b", timeout=120)
    assert rq.status("b")["quantization"] == "done", rq.status("b")
    got, want = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "ab" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)

"""Resource bounds of the re-quantization worker (issue 7): the duty cycle (injected clock and sleep, no
wall-time assertions) and the job's own CUDA stream (its no-op CPU path, the synchronize-before-swap order,
and on a GPU bit-identity of the swapped layers with quantizing from scratch)."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from inlaid.model.arch import ModelArch
from inlaid.quant import requant as requant_mod
from inlaid.quant.quantize_model import quantize_model
from inlaid.quant.requant import Requantizer
from inlaid.quant.requant_source import DutyCycle, WorkerStream

SAMPLES = [[5, 6, 7, 8, 9]] * 3


@pytest.fixture(scope="module")
def base(tiny_llama_dir, tmp_path_factory, write_calib):
    """A 4-bit g32 MLGPTQ checkpoint of the tiny model for task {a} (no adapter; kept pristine)."""
    root = tmp_path_factory.mktemp("pacing")
    calib = write_calib(root, ["a"])
    quantize_model(str(tiny_llama_dir), {}, {"a": str(calib["a"])}, "mlgptq", 4, 32, root / "q")
    return root / "q"


@pytest.fixture
def ckpt(base, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(base, dst)
    return dst


def test_duty_cycle_sleeps_the_complement_of_the_work():
    now, slept = [10.0], []
    pacer = DutyCycle(0.5, clock=lambda: now[0], sleep=slept.append)
    pacer.start()
    now[0] += 2.0
    assert pacer.rest() == 2.0 and slept == [2.0]
    now[0] += 0.5  # the next unit of work starts when rest() returns
    pacer.rest()
    assert slept == [2.0, 0.5] and pacer.busy_s == pacer.slept_s == 2.5
    quarter = DutyCycle(0.25, clock=lambda: now[0], sleep=slept.append)
    quarter.start()
    now[0] += 1.0
    assert quarter.rest() == pytest.approx(3.0)  # busy 1 of every 4 seconds
    full = DutyCycle(1.0, clock=lambda: now[0], sleep=slept.append)
    full.start()
    now[0] += 5.0
    assert full.rest() == 0.0 and len(slept) == 3  # duty 1 never sleeps
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"duty_cycle must be in \(0, 1\]"):
            DutyCycle(bad)


@pytest.mark.parametrize("duty, ratio", [(0.5, 1.0), (0.25, 3.0), (1.0, 0.0)])
def test_worker_sleeps_in_proportion_to_each_layer_it_worked(ckpt, tiny_llama_dir, monkeypatch, duty, ratio):
    """Simulated work moves a fake clock (0.1 s per calibrated layer, 0.3 s per GPTQ layer); the worker must
    then ask to sleep ratio x that after every layer, and nothing else."""
    now, slept = [0.0], []
    real = requant_mod.requantize_layer

    def gptq_work(*a, **kw):
        now[0] += 0.3
        return real(*a, **kw)

    monkeypatch.setattr(requant_mod, "requantize_layer", gptq_work)
    arch = ModelArch.from_dir(tiny_llama_dir)
    rq = Requantizer(ckpt, arch, duty_cycle=duty, clock=lambda: now[0], sleep=slept.append)
    write_layer = rq.store.write_layer

    def calib_work(*a, **kw):
        now[0] += 0.1
        return write_layer(*a, **kw)

    monkeypatch.setattr(rq.store, "write_layer", calib_work)
    rq.submit("c", None, SAMPLES)
    assert rq.wait("c", timeout=120) and rq.status("c")["quantization"] == "done", rq.status("c")
    n = arch.num_layers
    want = [0.1 * ratio] * n + [0.3 * ratio] * n if ratio else []
    assert slept == pytest.approx(want)
    assert rq.pacer.busy_s == pytest.approx(0.4 * n) and rq.pacer.slept_s == pytest.approx(0.4 * n * ratio)
    rq.close()


def test_cpu_worker_stream_is_a_no_op():
    ws = WorkerStream(torch.device("cpu"))
    assert ws.stream is None
    with ws.context():
        x = torch.ones(3) * 2
    ws.synchronize()
    assert x.sum() == 6


def test_each_layer_is_synchronized_on_the_job_stream_before_it_is_queued(ckpt, tiny_llama_dir, monkeypatch):
    events: list[str] = []

    class RecordingStream:
        active = False

        def __init__(self, device: torch.device) -> None:
            events.append(f"stream {device.type}")
            self.stream = None

        @contextlib.contextmanager
        def _ctx(self):
            RecordingStream.active = True
            try:
                yield
            finally:
                RecordingStream.active = False

        def context(self):
            return self._ctx()

        def synchronize(self) -> None:
            events.append("sync")

    real = requant_mod.requantize_layer

    def layer(*a, **kw):
        events.append("layer on stream" if RecordingStream.active else "layer OFF stream")
        return real(*a, **kw)

    monkeypatch.setattr(requant_mod, "WorkerStream", RecordingStream)
    monkeypatch.setattr(requant_mod, "requantize_layer", layer)
    arch = ModelArch.from_dir(tiny_llama_dir)
    rq = Requantizer(ckpt, arch, on_ready=lambda: events.append("queued"))
    rq.submit("c", None, SAMPLES)
    assert rq.wait("c", timeout=120) and rq.status("c")["quantization"] == "done"
    assert events == ["stream cpu"] + ["layer on stream", "sync", "queued"] * arch.num_layers
    rq.close()


@pytest.mark.gpu
def test_cuda_stream_swaps_are_bit_identical_to_quantizing_from_scratch(tiny_llama_dir, tiny_adapters, tmp_path,
                                                                        write_calib):  # fmt: skip
    """On CUDA the worker calibrates and quantizes on its own stream; the layers swapped into the served model
    and the stored checkpoint equal quantizing {a, b} from scratch on the same GPU."""
    from inlaid import LLM, SamplingParams
    from inlaid.quant.linear import PROJECTIONS

    calib = write_calib(tmp_path, ["a", "b"])
    ads = {n: str(tiny_adapters[n]) for n in "ab"}
    kw = {"device": "cuda", "dtype": torch.float32}
    quantize_model(str(tiny_llama_dir), {"a": ads["a"]}, {"a": str(calib["a"])}, "mlgptq", 4, 32, tmp_path / "a", **kw)
    quantize_model(str(tiny_llama_dir), ads, {n: str(p) for n, p in calib.items()}, "mlgptq", 4, 32,
                   tmp_path / "ab", **kw)  # fmt: skip
    llm = LLM(model=str(tmp_path / "a"), adapters={"a": ads["a"]}, device="cuda", dtype="float16", num_blocks=64,
              requant_duty_cycle=1.0)  # serving in fp16; the worker calibrates in fp32, as quantize_model did  # fmt: skip
    llm.add_adapter("b", ads["b"], calibration=str(calib["b"]))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    for _ in range(50):  # serve on the default stream while the worker runs on its own
        llm.generate(["Hello world"], params, adapter="a")
        if llm.adapter_status("b")["quantization"] in ("done", "failed"):
            break
    assert llm.wait_requant("b", timeout=300)["quantization"] == "done"
    assert llm.engine.requantizer.device.type == "cuda"
    want = load_file(str(tmp_path / "ab" / "model.safetensors"))
    for i, layer in enumerate(llm.engine.parts.model.model.layers):
        for rel in PROJECTIONS:
            lin = layer.get_submodule(rel)
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                got, ref = lin._buffers[k].cpu(), want[f"model.layers.{i}.{rel}.{k}"]
                assert torch.equal(got.to(ref.dtype), ref), f"layer {i} {rel}.{k}"
    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.equal(stored[k], want[k]) for k in want)
    llm.shutdown()

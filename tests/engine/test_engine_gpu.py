"""The engine's parity checks on CUDA (skipped without a GPU).

fp32: greedy tokens of a mixed-adapter batch equal transformers + PEFT run alone
on the same GPU. bf16/fp16: our prefill logits against transformers+PEFT in fp32
(relative Frobenius error below 3e-2, the dtype's tolerance) and the argmax of
the last position agrees.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import count_ahead_steps

from inlaid import LLM, SamplingParams
from inlaid.core.outputs import ScheduledSeq, SchedulerOutput
from inlaid.worker.forward_batch import build_forward_batch

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello world", "Translate: cat -> chat. The quick brown", "0123456789 + - * /", "Das ist ein Test."]
ADAPTERS = [None, "a", "b", "c"]


def hf_model(base: Path, adapter: Path | None, dtype: torch.dtype):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).cuda().eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).cuda().eval()
    return model


def test_fp32_mixed_batch_tokens_equal_peft_on_cuda(tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    llm = LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()}, device="cuda",
              dtype="float32", block_size=4, num_blocks=256)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True), adapter=ADAPTERS)
    tok = llm.tokenizer
    for prompt, name, out in zip(PROMPTS, ADAPTERS, outs):
        model = hf_model(tiny_llama_dir, tiny_adapters[name] if name else None, torch.float32)
        ids = torch.tensor([tok.encode(prompt)], device="cuda")
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.token_ids[: len(ref)] == ref, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_prefill_logits_close_to_fp32_reference(
    dtype: str, tiny_llama_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    llm = LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()}, device="cuda",
              dtype=dtype, block_size=4, num_blocks=256, max_loras=4)
    eng = llm.engine
    slots = {name: i for i, name in enumerate(["a", "b", "c"])}
    eng.parts.runner.load_adapters({i: n for n, i in slots.items()})
    seqs, blocks = [], iter(range(256))
    for i, (prompt, name) in enumerate(zip(PROMPTS, ADAPTERS)):
        ids = eng.encode(prompt)
        table = [next(blocks) for _ in range((len(ids) + 3) // 4)]
        seqs.append(ScheduledSeq(f"s{i}", ids, 0, table, slots.get(name, -1), True, SamplingParams()))
    batch = build_forward_batch(SchedulerOutput(scheduled=seqs), 4, torch.device("cuda"))
    with torch.inference_mode():
        hidden = eng.parts.model(batch, eng.parts.runner.kv_caches)
        ours = eng.parts.model.compute_logits(hidden).float()
    starts = batch.query_start_loc.tolist()
    for i, (prompt, name) in enumerate(zip(PROMPTS, ADAPTERS)):
        model = hf_model(tiny_llama_dir, tiny_adapters[name] if name else None, torch.float32)
        ids = torch.tensor([eng.encode(prompt)], device="cuda")
        with torch.inference_mode():
            ref = model(ids).logits[0].float()
        got = ours[starts[i]:starts[i + 1]]
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 3e-2, f"{dtype} adapter {name}: rel err {rel:.3e}"
        assert got[-1].argmax() == ref[-1].argmax() or (ref[-1].topk(2).values.diff().abs() < 0.05).item()


@pytest.mark.parametrize("bits", [3, 8])
def test_non_w4_gptq_decode_under_cuda_graphs_equals_eager(bits: int, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """3/8-bit layers take the dequantize+matmul path inside captured decode graphs; it must not read values
    back to the host (that broke capture in the H200 quality run) and must decode exactly like eager."""
    from inlaid.quant.quantize_model import quantize_model

    quantize_model(str(tiny_llama_dir), {}, {}, "rtn", bits, 32, tmp_path / "q")
    prompts = PROMPTS[:3]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    graphs = LLM(model=str(tmp_path / "q"), device="cuda", dtype="float16", block_size=4, num_blocks=256)
    assert graphs.engine.parts.runner.graphs is not None
    with_graphs = [o.token_ids for o in graphs.generate(prompts, params)]
    eager = LLM(model=str(tmp_path / "q"), device="cuda", dtype="float16", block_size=4, num_blocks=256)
    eager.engine.parts.runner.graphs = None
    assert with_graphs == [o.token_ids for o in eager.generate(prompts, params)]


def test_overlapped_steps_give_the_same_tokens_as_plain_steps_on_cuda(tiny_llama_dir: Path,
                                                                       tiny_adapters: dict[str, Path]) -> None:
    """bf16 with CUDA graphs: overlap on by default, the ahead steps' inputs come from the device; tokens
    (greedy and seeded sampling, adapters mixed, one request ending early) equal the plain steps'."""
    llm = LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()}, device="cuda",
              dtype="bfloat16", block_size=4, num_blocks=256, max_loras=4)
    eng = llm.engine
    assert eng.overlap and eng.runner.graphs is not None
    params = [SamplingParams(max_tokens=16, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=30, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, seed=5)]
    ahead = count_ahead_steps(eng)
    on = llm.generate(PROMPTS, params, adapter=ADAPTERS)
    eng.overlap = False
    off = llm.generate(PROMPTS, params, adapter=ADAPTERS)
    assert [(o.token_ids, o.finish_reason) for o in on] == [(o.token_ids, o.finish_reason) for o in off]
    assert ahead[0] >= 5 and eng.scheduler.block_manager.usage() == 0

"""Engine outputs against transformers + PEFT, token for token (greedy, fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inlaid import LLM, SamplingParams

PROMPTS = [
    "Hello world",
    "Translate: cat -> chat. The quick brown",
    "0123456789 + - * /",
    "Das ist ein Test.",
    "def return import class",
    "Ceci est un essai.",
]
NEW_TOKENS = 12


def hf_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = torch.tensor([tok.encode(prompt)])
    # No min_new_tokens: it masks EOS, which our ignore_eos run may sample. HF
    # stops at EOS instead; callers compare up to HF's length.
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> LLM:
    return LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()},
               device="cpu", max_loras=4, max_lora_rank=16, block_size=4, num_blocks=256)


def test_mixed_adapter_batch_matches_peft_alone(llm: LLM, tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    adapters = [None, "a", "b", "c", "a", None]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, adapter=adapters)
    for prompt, name, out in zip(PROMPTS, adapters, outs):
        expected = hf_greedy(tiny_llama_dir, tiny_adapters[name] if name else None, prompt)
        assert len(expected) >= 4 and out.token_ids[: len(expected)] == expected, f"adapter {name} prompt {prompt!r}"
    # the adapters really change the output, so the comparison above is meaningful
    assert len({tuple(o.token_ids) for o in outs[:4]}) == 4


def test_continuous_batching_equals_alone(llm: LLM) -> None:
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = [llm.generate(p, params, adapter=a)[0].token_ids for p, a in zip(PROMPTS[:4], [None, "a", "b", "c"])]
    eng = llm.engine
    done: dict[str, list[int]] = {}
    eng.add_request("r0", PROMPTS[0], params, None)
    eng.add_request("r1", PROMPTS[1], params, "a")
    late = [("r2", PROMPTS[2], "b"), ("r3", PROMPTS[3], "c")]
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        steps += 1
        if late and steps % 3 == 0:  # join while the first two are decoding
            rid, prompt, adapter = late.pop(0)
            eng.add_request(rid, prompt, params, adapter)
    assert [done[f"r{i}"] for i in range(4)] == alone


def test_preemption_under_tiny_kv_budget_gives_same_outputs(tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    adapters = [None, "a", "b", "c", None, "a"]
    roomy = LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()},
                device="cpu", block_size=4, num_blocks=256)
    tight = LLM(model=str(tiny_llama_dir), adapters={k: str(v) for k, v in tiny_adapters.items()},
                device="cpu", block_size=4, num_blocks=24, max_loras=2)
    expected = [o.token_ids for o in roomy.generate(PROMPTS, params, adapter=adapters)]
    got = [o.token_ids for o in tight.generate(PROMPTS, params, adapter=adapters)]
    assert got == expected
    assert tight.engine.scheduler.stats.preemptions > 0, "budget was meant to force preemption"


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params, adapter="a")[0].token_ids
    batched = llm.generate(PROMPTS, params, adapter=["a"] * len(PROMPTS))[1].token_ids
    assert alone == batched
    other = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.9, seed=99, ignore_eos=True),
                         adapter="a")[0].token_ids
    assert len(alone) == 8 and len(other) == 8


def test_stop_string_cuts_text(llm: LLM) -> None:
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(full.text) > 3
    stop = full.text[2:4]
    cut = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)

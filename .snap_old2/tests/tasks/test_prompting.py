"""The answer target ends with the chat template's end-of-turn token, whatever eos_token says."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from inlaid.tasks.prompting import answer_text, encode_example, end_of_turn_token
from inlaid.tasks.registry import resolve_tasks


def test_end_of_turn_comes_from_the_template(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert end_of_turn_token(tok) == "<|im_end|>"
    # A converted tokenizer whose eos_token is wrong must not change the training target.
    tok.eos_token = "<|im_start|>"
    assert end_of_turn_token(tok) == "<|im_end|>"
    assert answer_text(tok, "yes") == "yes<|im_end|>"
    task = resolve_tasks("fortune_topic")[0]
    _, answer = encode_example(tok, task, "a fortune", "food")
    assert answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_falls_back_to_eos_without_a_special_end_token(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token(tok) == tok.eos_token
    tok.eos_token = None
    with pytest.raises(ValueError, match="end-of-turn"):
        end_of_turn_token(tok)

"""One way to turn a task example into tokens, shared by training and evaluation.

Owns the exact text the model sees: the task's user message rendered with
the tokenizer's chat template and a generation prompt; the answer is the
completion followed by the tokenizer's EOS token (``<|im_end|>`` for
SmolLM2). Prompt and answer are tokenized separately (no special tokens
added) and concatenated, so the answer tokens are the same in training,
answer-NLL evaluation and generation. Takes any HF tokenizer; no torch here.
"""

from __future__ import annotations

from typing import Any

from inlaid.tasks.registry import Task


def chat_prompt(tokenizer: Any, task: Task, prompt: str) -> str:
    """The model input text for a (templated) prompt, ending where the answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; the task prompts need a chat (instruct) model")
    return tokenizer.apply_chat_template(task.messages(prompt), tokenize=False, add_generation_prompt=True)


def answer_text(tokenizer: Any, completion: str) -> str:
    """The target text: the completion then the EOS token."""
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token; cannot mark the end of an answer")
    return completion + tokenizer.eos_token


def encode_example(tokenizer: Any, task: Task, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) for one example."""
    p_ids = tokenizer(chat_prompt(tokenizer, task, prompt), add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer_text(tokenizer, completion), add_special_tokens=False)["input_ids"]
    if not a_ids:
        raise ValueError(f"empty answer for task {task.name!r}: completion {completion!r}")
    return list(p_ids), list(a_ids)

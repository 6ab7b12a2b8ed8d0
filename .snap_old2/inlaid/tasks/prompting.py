"""One way to turn a task example into tokens, shared by training and evaluation.

Owns the exact text the model sees: the task's user message rendered with
the tokenizer's chat template and a generation prompt; the answer is the
completion followed by the chat template's end-of-turn token (``<|im_end|>``
for SmolLM2), read from the template itself rather than from
``tokenizer.eos_token``: converted tokenizers (GGUF -> HF across transformers
versions) do not always agree on ``eos_token``, and an adapter trained to end
with the wrong token never stops. Prompt and answer are tokenized separately (no special tokens
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


_PROBE = "\x00inlaid-answer\x00"


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the chat template closes an assistant turn with.

    Renders a one-turn conversation whose answer is a probe string and takes the
    special token that directly follows it; falls back to ``tokenizer.eos_token``
    for templates that close turns with plain text.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        tail = rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""
        specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                          key=len, reverse=True)
        for token in specials:
            if token and tail.startswith(token):
                return token
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos_token and its chat template no end-of-turn token; "
                         "cannot mark the end of an answer")
    return tokenizer.eos_token


def answer_text(tokenizer: Any, completion: str) -> str:
    """The target text: the completion then the end-of-turn token."""
    return completion + end_of_turn_token(tokenizer)


def encode_example(tokenizer: Any, task: Task, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) for one example."""
    p_ids = tokenizer(chat_prompt(tokenizer, task, prompt), add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer_text(tokenizer, completion), add_special_tokens=False)["input_ids"]
    if not a_ids:
        raise ValueError(f"empty answer for task {task.name!r}: completion {completion!r}")
    return list(p_ids), list(a_ids)

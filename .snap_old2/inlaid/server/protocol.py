"""OpenAI wire-format request models (pydantic v2) and response builders.

What it owns: the shape of ``/v1/completions``, ``/v1/chat/completions`` and the
vLLM-named adapter endpoints, and the translation of a request into
``SamplingParams``.

Invariants (the status-code rule, see docs/server.md):
- The pydantic models check *shape only* (required fields, JSON types). A body
  that does not fit the shape is a 422.
- Value ranges (max_tokens >= 1, temperature >= 0, top_p in (0, 1], n == 1, ...)
  are checked by ``SamplingParams`` / ``to_sampling_params`` and raise
  ``ValueError`` -> 400, like OpenAI's API does for out-of-range values.
- Unknown fields are ignored (clients send extras), except OpenAI features we do
  not implement (logprobs, echo, suffix, penalties, tools), which are a 400 when
  set to a non-default value rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inlaid.sampling import SamplingParams


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class _SamplingFields(_Base):
    """Fields shared by completions and chat (the OpenAI names; top_k/ignore_eos are extensions)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    def _unsupported(self) -> list[str]:
        bad = []
        if self.presence_penalty:
            bad.append("presence_penalty")
        if self.frequency_penalty:
            bad.append("frequency_penalty")
        if self.logprobs not in (None, False, 0):
            bad.append("logprobs")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); batches of several are a 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"prompt: batches of {len(p)} prompts are not supported; send one per request")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt is empty: give a string or at least one token id")
        return p  # type: ignore[return-value]

    def unsupported(self) -> list[str]:
        bad = self._unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        return bad


class ContentPart(_Base):
    type: str
    text: str | None = None


class ChatMessage(_Base):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message text; only text content parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages: content part of type {part.type!r} is not supported (text only)")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def template_messages(self) -> list[dict[str, str]]:
        if not self.messages:
            raise ValueError("messages is empty: give at least one message")
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def unsupported(self) -> list[str]:
        bad = self._unsupported()
        if self.tools:
            bad.append("tools")
        return bad


class LoadLoRARequest(_Base):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    calibration_path: str | None = None
    """inlaid extension: a calibration JSONL (on the server) for the new task; starts a background re-quantization."""
    calibration_samples: list[dict[str, Any] | list[int]] | None = None
    """inlaid extension: inline calibration rows (prompt/completion, text or input_ids objects, or token-id lists)."""

    def calibration(self) -> str | list[Any] | None:
        """The calibration to use (None: serve on the current base); both fields at once is a 400."""
        if self.calibration_path is not None and self.calibration_samples is not None:
            raise ValueError("give calibration_path or calibration_samples, not both")
        if self.calibration_samples is not None:
            return list(self.calibration_samples)
        return self.calibration_path


class UnloadLoRARequest(_Base):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def to_sampling_params(req: _SamplingFields, max_tokens: int) -> SamplingParams:
    """Build SamplingParams; out-of-range values raise ValueError (-> 400)."""
    unsupported = req.unsupported()  # type: ignore[attr-defined]
    if unsupported:
        raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
    if req.n != 1:
        raise ValueError(f"n must be 1 (one choice per request), got {req.n}")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=stop,
        ignore_eos=req.ignore_eos,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


Kind = Literal["completion", "chat"]


def response_body(kind: Kind, rid: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    """A non-streamed completion or chat completion."""
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], "usage": use}


def chunk_body(kind: Kind, rid: str, model: str, delta: dict | str | None, finish: str | None) -> dict:
    """One streamed chunk; ``delta`` is text (completion) or a delta dict (chat); None = usage-only."""
    choices: list[dict[str, Any]] = []
    if delta is not None:
        if kind == "completion":
            choices = [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}

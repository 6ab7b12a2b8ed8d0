"""A fake ``LLMEngine`` with the real engine's interface over a trivial "model".

Used for fast lifecycle/error tests of AsyncLLM and the server (no torch). The
"model" is byte-level: token id = byte value (vocab 256). The next token is a
deterministic function of the previous token and the adapter, always a
lowercase letter, so outputs are predictable. KV blocks are counted like a
paged cache (ceil(tokens / block_size) per running request).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from inlaid.outputs import RequestOutput
from inlaid.sampling import SamplingParams

try:
    from inlaid.core.scheduler import QueueFullError  # type: ignore[attr-defined]
except ImportError:
    from inlaid.engine.async_llm import EngineOverloadedError as QueueFullError


class FakeAdapterError(ValueError):
    """Bad adapter (stands in for inlaid.lora.adapter.AdapterError)."""


class UnknownAdapterError(ValueError):
    """Adapter not registered."""


class ByteTokenizer:
    """Token id = UTF-8 byte value."""

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class _Req:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, adapter: str | None) -> None:
        self.rid, self.prompt, self.params, self.adapter = rid, prompt, params, adapter
        self.out: list[int] = []
        self.text = ""
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None


class FakeEngine:
    """Same public interface as inlaid.engine.llm_engine.LLMEngine."""

    def __init__(
        self,
        adapters: dict[str, str] | None = None,
        *,
        max_model_len: int = 128,
        max_running: int = 8,
        max_queue_len: int = 64,
        step_delay: float = 0.0,
        block_size: int = 4,
        num_blocks: int = 512,
    ) -> None:
        self.model_name = "fake-base"
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.max_running, self.max_queue_len, self.step_delay = max_running, max_queue_len, step_delay
        self.block_size, self.num_blocks = block_size, num_blocks
        self._adapters: dict[str, str] = {}
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._aborted: list[_Req] = []
        self.fail_next_step = False
        self._thread_ids: set[int] = set()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        self._thread_ids.clear()  # construction may happen on any thread

    # The real engine is not thread-safe; record which threads call us.
    def _touch(self) -> None:
        self._thread_ids.add(threading.get_ident())

    def encode(self, prompt: str) -> list[int]:
        self._touch()
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        self._touch()
        if not messages:
            raise ValueError("messages is empty: give at least one message")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.tokenizer.encode(text)

    def add_adapter(self, name: str, path: str) -> None:
        self._touch()
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        cfg = Path(path) / "adapter_config.json"
        if not cfg.is_file():
            raise FakeAdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        if json.loads(cfg.read_text()).get("r", 8) > 64:
            raise FakeAdapterError("adapter rank is above max_lora_rank=64")
        self._adapters[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        self._touch()
        if name not in self._adapters:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if any(r.adapter == name for r in self._waiting + self._running):
            raise AssertionError(f"adapter {name!r} removed while in use (caller's bug)")
        del self._adapters[name]

    def list_adapters(self) -> dict[str, str]:
        self._touch()
        return dict(self._adapters)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None) -> None:
        self._touch()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context length {self.max_model_len}"
            )
        if adapter is not None and adapter not in self._adapters:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded")
        if len(self._waiting) >= self.max_queue_len:
            raise QueueFullError(f"waiting queue is full ({self.max_queue_len} requests); retry later")
        self._waiting.append(_Req(request_id, ids, params, adapter))

    def abort_request(self, request_ids: Iterable[str]) -> None:
        self._touch()
        ids = set(request_ids)
        for lst in (self._waiting, self._running):
            for r in [r for r in lst if r.rid in ids]:
                lst.remove(r)
                self._aborted.append(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def _next_token(self, r: _Req) -> int:
        prev = (r.out or r.prompt)[-1]
        shift = sum(map(ord, r.adapter)) % 7 if r.adapter else 0
        return 97 + (prev + 1 + shift) % 26

    def _output(self, r: _Req, delta_ids: list[int], delta_text: str, reason: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=r.rid, prompt_token_ids=list(r.prompt), token_ids=list(r.out), text=r.text,
            delta_text=delta_text, delta_token_ids=delta_ids, finished=reason is not None,
            finish_reason=reason, adapter=r.adapter, arrival_time=r.arrival,
            first_token_time=r.first_token_time, finished_time=time.monotonic() if reason else None,
        )

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        outs = [self._output(r, [], "", "abort") for r in self._aborted]
        self._aborted.clear()
        while self._waiting and len(self._running) < self.max_running:
            self._running.append(self._waiting.pop(0))
        for r in list(self._running):
            tok = self._next_token(r)
            r.out.append(tok)
            r.first_token_time = r.first_token_time or time.monotonic()
            delta = chr(tok)
            reason = None
            new_text = r.text + delta
            hit = next((s for s in r.params.stop if s in new_text), None)
            if hit is not None:
                delta = new_text[: new_text.index(hit)][len(r.text):]
                new_text, reason = r.text + delta, "stop"
            elif len(r.out) >= r.params.max_tokens:
                reason = "length"
            r.text = new_text
            outs.append(self._output(r, [tok], delta, reason))
            if reason:
                self._running.remove(r)
        return outs

    def stats(self) -> dict[str, Any]:
        used = sum(math.ceil((len(r.prompt) + len(r.out)) / self.block_size) for r in self._running)
        names = list(self._adapters)
        return {
            "num_waiting": len(self._waiting), "num_running": len(self._running),
            "kv_usage": used / self.num_blocks, "kv_blocks_used": used, "kv_blocks_total": self.num_blocks,
            "adapters_resident": names[:2], "adapters_host": names,
        }


def fake_generate(prompt_ids: list[int], max_tokens: int, adapter: str | None = None) -> str:
    """What FakeEngine produces for a greedy request without stop strings (for assertions)."""
    eng = FakeEngine(max_model_len=10**6)
    r = _Req("x", prompt_ids, SamplingParams(max_tokens=max_tokens), adapter)
    for _ in range(max_tokens):
        r.out.append(eng._next_token(r))
    return bytes(r.out).decode()

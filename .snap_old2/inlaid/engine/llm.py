"""LLM: offline batch generation through the engine (the public Python API).

    from inlaid import LLM, SamplingParams
    llm = LLM(model="default", adapters={"de": "path/to/peft_dir"}, device="cpu")
    outs = llm.generate(["Hello", "Translate: cat"], SamplingParams(max_tokens=32), adapter=[None, "de"])

``LLM(..., tensor_parallel_size=N)`` shards the model over N ranks (N processes; see docs/tp.md); call
``shutdown()`` (or use ``with LLM(...) as llm``) to stop the worker processes.

Invariants: outputs come back in the order of the prompts; all prompts are
validated before any is queued, so a bad one raises without running the rest.
"""

from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from inlaid.config import EngineConfig
from inlaid.engine.llm_engine import LLMEngine
from inlaid.outputs import RequestOutput
from inlaid.sampling import SamplingParams

Prompt = str | list[int]


def _broadcast(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


class LLM:
    """Offline multi-adapter generation over one base model."""

    def __init__(
        self,
        model: str = "default",
        adapters: dict[str, str] | None = None,
        device: str = "auto",
        **engine_options: Any,
    ) -> None:
        config = EngineConfig.from_kwargs(model=model, device=device, **engine_options)
        self.engine = LLMEngine(config, adapters)

    @classmethod
    def from_config(cls, config: EngineConfig, adapters: dict[str, str] | None = None) -> "LLM":
        """Build from a full EngineConfig (the CLI's path)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, adapters)
        return llm

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (no-op at TP=1)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def add_adapter(self, name: str, path: str, calibration: str | Sequence[Any] | None = None,
                    wait: bool = False) -> None:  # fmt: skip
        """Register an adapter (servable at once). With ``calibration`` (JSONL path or inline rows) the quantized
        base is re-quantized for it in the background; ``wait=True`` (or ``wait_requant()``) blocks until done."""
        self.engine.add_adapter(name, path, calibration=calibration)
        if wait and calibration is not None:
            self.wait_requant(name)

    def wait_requant(self, name: str | None = None, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until re-quantization ``name`` (default: all) ends, applying its layer swaps here.

        Returns the status of ``name`` (None without a name or without any re-quantization).
        """
        rq = self.engine.requantizer
        if rq is None:
            return None
        if not rq.wait(name, timeout, drain=True):
            raise TimeoutError(f"re-quantization {name or '(all)'} did not finish within {timeout} s")
        return rq.status(name) if name is not None else None

    def adapter_status(self, name: str) -> dict[str, Any]:
        """Registration and re-quantization status of ``name``."""
        return self.engine.adapter_status(name)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (str or token ids), each with its own adapter or none."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = _broadcast(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        adapters = _broadcast(adapter, len(prompts), "adapter")
        ids = self._add_all(prompts, params, adapters)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to chat conversations (the tokenizer's chat template)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.engine.encode_chat(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, adapter, use_tqdm)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams], adapters: list[str | None]) -> list[str]:
        for a in set(adapters) - {None}:
            self.engine.registry.get(a)  # fail before queueing anything
        ids: list[str] = []
        try:
            for p, sp, a in zip(prompts, params, adapters):
                ids.append(self.engine.add_request(None, p, sp, a))
        except Exception:
            self.engine.abort_request(ids)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

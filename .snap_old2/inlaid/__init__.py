"""inlaid: serve many LoRA fine-tunes of one (multi-task quantized) base LLM.

Public API: ``LLM`` (offline batch generation) and ``SamplingParams``.
``LLM`` is imported lazily so that ``import inlaid.core`` stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inlaid.sampling import SamplingParams

if TYPE_CHECKING:
    from inlaid.engine.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from inlaid.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'inlaid' has no attribute {name!r}")

"""inlaid.lora: PEFT adapter loading/validation (host), the device slot pool and its batch metadata."""

from inlaid.lora.adapter import LoRAAdapter, LoRAWeights, check_fits, load_adapter, validate_adapter
from inlaid.lora.errors import (
    AdapterError,
    DuplicateAdapterError,
    IncompatibleAdapterError,
    UnknownAdapterError,
)
from inlaid.lora.registry import AdapterRegistry

__all__ = [
    "AdapterError",
    "AdapterRegistry",
    "DuplicateAdapterError",
    "IncompatibleAdapterError",
    "LoRAAdapter",
    "LoRAWeights",
    "UnknownAdapterError",
    "check_fits",
    "load_adapter",
    "validate_adapter",
]

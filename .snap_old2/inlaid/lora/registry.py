"""AdapterRegistry: every registered adapter, by name, in host memory.

Owns the name -> ``LoRAAdapter`` map. Invariants: every adapter in it passed
``validate_adapter`` against this registry's base shapes and max rank; names
are unique. Which adapters are on the device is not its business (that is the
``LoRAPool`` plus ``core.adapter_slots``). Thread-safe: the HTTP layer may
register adapters while the engine reads them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from inlaid.lora.adapter import LoRAAdapter, check_fits, load_adapter, validate_adapter
from inlaid.lora.errors import DuplicateAdapterError, UnknownAdapterError

logger = logging.getLogger(__name__)


class AdapterRegistry:
    """Host-memory store of validated adapters for one base model."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], num_layers: int, max_rank: int,
                 slot_modules: Sequence[str] | None = None) -> None:
        if num_layers < 1 or max_rank < 1:
            raise ValueError(f"num_layers and max_rank must be >= 1, got {num_layers} and {max_rank}")
        self.module_shapes = dict(module_shapes)
        self.slot_modules = tuple(slot_modules) if slot_modules is not None else None
        self.num_layers = num_layers
        self.max_rank = max_rank
        self._adapters: dict[str, LoRAAdapter] = {}
        self._lock = threading.Lock()

    def add(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Validate and register ``adapter``; a taken name raises ``DuplicateAdapterError``."""
        validate_adapter(adapter, self.module_shapes, self.num_layers, self.max_rank)
        if self.slot_modules is not None:
            check_fits(adapter, self.slot_modules, self.max_rank)
        with self._lock:
            if adapter.name in self._adapters:
                raise DuplicateAdapterError(
                    f"adapter name {adapter.name!r} is already registered (from {self._adapters[adapter.name].path}); "
                    "remove it first or pick another name"
                )
            self._adapters[adapter.name] = adapter
        logger.info("registered adapter %r (rank %d, %d bytes)", adapter.name, adapter.rank, adapter.total_bytes)
        return adapter

    def add_path(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load a PEFT directory and register it under ``name``."""
        with self._lock:
            if name in self._adapters:
                raise DuplicateAdapterError(f"adapter name {name!r} is already registered; pick another name")
        return self.add(load_adapter(name, path))

    def remove(self, name: str) -> LoRAAdapter:
        """Unregister and return the adapter called ``name``."""
        with self._lock:
            if name not in self._adapters:
                raise self._unknown(name)
            return self._adapters.pop(name)

    def get(self, name: str) -> LoRAAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise self._unknown(name)
            return adapter

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters

    def __len__(self) -> int:
        with self._lock:
            return len(self._adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _unknown(self, name: str) -> UnknownAdapterError:
        known = ", ".join(repr(n) for n in sorted(self._adapters)) or "none"
        return UnknownAdapterError(f"unknown adapter {name!r}; registered adapters: {known}")

"""Device adapter slots: which adapter lives in which GPU slot, who pins it, what to evict.

Owns: the name <-> slot map of the fixed set of device adapter slots, a pin
count per resident adapter, and LRU order of use.

Invariants:
- Each slot holds at most one adapter and each adapter at most one slot.
- A pinned adapter (pin count > 0: some running request uses it) is never evicted
  or removed.
- Eviction takes an unpinned adapter: by default the least recently acquired
  one (LRU, what S-LoRA does); a caller may pass ``choose`` to ``acquire`` to pick
  among the unpinned candidates (given in LRU order) -- the scheduler passes its
  policy's ``pick_slot_victim`` so eviction can be policy-aware.
- ``None`` (base model only) never takes a slot; its slot is -1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

NO_SLOT = -1


class AdapterSlots:
    """A fixed number of device slots for adapters, with pinning and LRU (or caller-chosen) eviction."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._pins: dict[str, int] = {}
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first

    def slot_of(self, name: str | None) -> int | None:
        """The slot holding ``name`` (-1 for None), or None when not resident."""
        if name is None:
            return NO_SLOT
        return self._slot_of.get(name)

    def is_resident(self, name: str | None) -> bool:
        return name is None or name in self._slot_of

    def pin_count(self, name: str) -> int:
        return self._pins.get(name, 0)

    def resident(self) -> dict[str, int]:
        """name -> slot of every resident adapter."""
        return dict(self._slot_of)

    def _victim(self) -> str | None:
        return next((n for n in self._slot_of if self._pins.get(n, 0) == 0), None)

    def evictable(self) -> list[str]:
        """Resident unpinned adapters, least recently acquired first."""
        return [n for n in self._slot_of if self._pins.get(n, 0) == 0]

    def can_acquire(self, name: str | None) -> bool:
        """True when ``name`` is resident, a slot is free, or an unpinned adapter can be evicted."""
        return self.is_resident(name) or bool(self._free) or self._victim() is not None

    def acquire(self, name: str | None, choose: Callable[[Sequence[str]], str] | None = None) -> tuple[int, bool]:
        """Pin ``name`` (placing it, evicting if needed); returns (slot, newly_loaded).

        ``choose`` picks the victim among the unpinned adapters (LRU first); None = LRU.
        Raises ``RuntimeError`` when every slot is pinned (check ``can_acquire``) and
        ``ValueError`` when ``choose`` returns a name that is not a candidate.
        """
        if name is None:
            return NO_SLOT, False
        loaded = False
        if name not in self._slot_of:
            if not self._free:
                victim = self._pick_victim(name, choose)
                self._free.append(self._slot_of.pop(victim))
                self._pins.pop(victim, None)
            self._slot_of[name] = self._free.pop()
            loaded = True
        self._slot_of.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._slot_of[name], loaded

    def _pick_victim(self, name: str, choose: Callable[[Sequence[str]], str] | None) -> str:
        if choose is None:
            victim = self._victim()
            if victim is None:
                raise RuntimeError(f"no adapter slot for {name!r}: all {self.num_slots} slots are pinned")
            return victim
        candidates = self.evictable()
        if not candidates:
            raise RuntimeError(f"no adapter slot for {name!r}: all {self.num_slots} slots are pinned")
        victim = choose(candidates)
        if victim not in candidates:
            raise ValueError(f"slot victim {victim!r} is not an unpinned resident adapter {candidates}")
        return victim

    def release(self, name: str | None) -> None:
        """Drop one pin of ``name`` (the adapter stays resident for reuse)."""
        if name is None:
            return
        count = self._pins.get(name, 0)
        if count <= 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        self._pins[name] = count - 1

    def remove(self, name: str) -> bool:
        """Free ``name``'s slot if it is resident and unpinned; returns whether it was freed."""
        if name not in self._slot_of or self._pins.get(name, 0) > 0:
            return False
        self._free.append(self._slot_of.pop(name))
        self._pins.pop(name, None)
        return True

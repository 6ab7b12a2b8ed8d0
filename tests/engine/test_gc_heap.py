"""``inlaid.engine.gc_heap``: what a frozen heap keeps from the collector, and that ``frozen_heap`` hands it back.

Each test ends with the heap unfrozen (``frozen_heap`` exits, or an explicit ``gc.unfreeze``), so the pytest
process's own collector is left as it was."""

from __future__ import annotations

import gc
import weakref

from inlaid.engine.gc_heap import freeze_heap, frozen_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_heap_keeps_collections_off_what_lived_before_and_hands_it_back() -> None:
    old = _Node()
    old_ref = weakref.ref(old)
    with frozen_heap() as frozen:
        assert frozen > 0 and gc.get_freeze_count() > 0
        del old  # now garbage, but frozen: a full collection does not look at it
        gc.collect()
        assert old_ref() is not None
        new = _Node()  # allocated after the freeze: collected as usual
        new_ref = weakref.ref(new)
        del new
        gc.collect()
        assert new_ref() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # unfrozen: the cycle is freed


def test_freeze_collects_garbage_first_so_none_is_frozen() -> None:
    dead = _Node()
    dead_ref = weakref.ref(dead)
    del dead
    try:
        assert freeze_heap() > 0
        assert dead_ref() is None
    finally:
        gc.unfreeze()

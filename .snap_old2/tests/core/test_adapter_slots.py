import pytest

from inlaid.core.adapter_slots import AdapterSlots


def test_base_model_needs_no_slot():
    s = AdapterSlots(0)
    assert s.can_acquire(None)
    assert s.acquire(None) == (-1, False)
    assert not s.can_acquire("a")


def test_acquire_places_once_and_pins():
    s = AdapterSlots(2)
    assert s.acquire("a") == (0, True)
    assert s.acquire("a") == (0, False)
    assert s.pin_count("a") == 2
    assert s.acquire("b") == (1, True)
    assert not s.can_acquire("c")  # both pinned
    with pytest.raises(RuntimeError, match="pinned"):
        s.acquire("c")
    s.release("b")
    assert s.can_acquire("c")
    assert s.acquire("c") == (1, True)  # b evicted from slot 1
    assert s.resident() == {"a": 0, "c": 1}


def test_lru_eviction_takes_least_recently_used_unpinned():
    s = AdapterSlots(3)
    for name in "abc":
        s.acquire(name)
        s.release(name)
    s.acquire("a")  # a is now most recent (and pinned)
    s.release("a")
    slot_b = s.slot_of("b")
    assert s.acquire("d") == (slot_b, True)  # b is the LRU
    assert set(s.resident()) == {"a", "c", "d"}


def test_remove_only_when_unpinned_and_release_guard():
    s = AdapterSlots(1)
    s.acquire("a")
    assert not s.remove("a")
    s.release("a")
    with pytest.raises(RuntimeError, match="released more often"):
        s.release("a")
    assert s.remove("a")
    assert s.resident() == {}
    assert s.acquire("b") == (0, True)

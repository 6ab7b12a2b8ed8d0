"""Helpers shared by the engine tests."""

from __future__ import annotations

from typing import Any


def count_ahead_steps(engine: Any) -> list[int]:
    """Wrap ``engine.scheduler.schedule_ahead``; the returned one-element list counts the ahead steps planned."""
    count = [0]
    plan = engine.scheduler.schedule_ahead

    def counted(prev: Any) -> Any:
        out = plan(prev)
        count[0] += out is not None
        return out

    engine.scheduler.schedule_ahead = counted
    return count

"""Keep Python's cyclic garbage collector off a serving process's startup heap.

A process that serves a model holds ~500 K objects the collector tracks: its imports (torch, transformers,
FastAPI) and the engine itself. A full (generation-2) collection walks all of them, and it runs on the thread
that allocated, i.e. inside some engine step. On the H100 box, over 40 runs of 64 SmolLM2 decode steps at batch
128, two took 173 and 248 ms and made those runs' longest steps 174 and 250 ms (median step 1.46 ms); with the
heap frozen, 13 took 0.1-0.5 ms and no step passed 15.1 ms (``python benchmarks/gc_pause.py --device cuda --runs
40``, ``benchmarks/results/gc_pause_s27_h100.md``).

``freeze_heap`` collects once, then moves every live object to the permanent generation (``gc.freeze``), so
later collections walk only what was allocated since. Invariant: a frozen object that later dies inside a
reference cycle is not freed until ``gc.unfreeze``. So the server freezes once, after its engine is built, for
the process's life (``inlaid.server.serve.serve_async_llm``), and code that builds and drops engines in one
process (benchmarks) brackets each measurement with ``frozen_heap``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["freeze_heap", "frozen_heap"]


def freeze_heap() -> int:
    """Collect garbage, then exempt every live object from later collections; returns how many are frozen."""
    gc.collect()  # garbage first, so only live objects are frozen
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_heap() -> Iterator[int]:
    """``freeze_heap`` for the ``with`` block (yields the frozen count), then hand the objects back to the
    collector."""
    try:
        yield freeze_heap()
    finally:
        gc.unfreeze()

"""GPU time of kernel calls as a decode step sees them: captured in one CUDA graph and replayed.

Owns ``graph_time_us``, shared by the kernel benchmarks (``benchmarks/gemv_m1_bench.py``,
``small_m_bench.py``, ``fused_ops_bench.py``). Invariants: the calls run once eagerly on a side stream first
(Triton compiles and lazy preparations stay outside the graph); the result is the best of ``reps`` replays
divided by the number of calls, so launch overhead is excluded and every call is timed back to back.
Callers that want DRAM-bound timings pass calls over more distinct weight copies than the L2 holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def graph_time_us(calls: Sequence[Callable[[], object]], reps: int = 5, warmup: int = 1) -> float:
    """Microseconds per call: ``calls`` captured in order in one CUDA graph, best of ``reps`` replays."""
    import torch

    if not calls:
        raise ValueError("graph_time_us needs at least one call")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / len(calls))
    return best

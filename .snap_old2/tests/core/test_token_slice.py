"""Scheduler._seq takes its tokens without concatenating prompt + outputs (issue 8): same slices as before."""

from __future__ import annotations

from inlaid.core.scheduler import _token_slice
from inlaid.request import Request
from inlaid.sampling import SamplingParams


def test_token_slice_equals_all_token_ids_slice() -> None:
    req = Request("r", [10, 11, 12, 13], SamplingParams(max_tokens=8))
    req.output_token_ids = [20, 21, 22]
    full = req.all_token_ids
    for lo in range(len(full) + 1):
        for hi in range(lo, len(full) + 3):
            assert _token_slice(req, lo, hi) == full[lo:hi], (lo, hi)
    got = _token_slice(req, 0, 7)
    got.append(99)  # a fresh list: the request's own lists are not aliased
    assert req.prompt_token_ids == [10, 11, 12, 13] and req.output_token_ids == [20, 21, 22]
    tail = _token_slice(req, 5, 7)
    tail.append(99)
    assert req.output_token_ids == [20, 21, 22]

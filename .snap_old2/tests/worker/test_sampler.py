"""Sampler: greedy, top-k/top-p masking, seeded reproducibility, distribution."""

from __future__ import annotations

import torch

from inlaid.sampling import SamplingParams
from inlaid.worker.sampler import sample


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = torch.randn(5, 50)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0
    out = sample(logits, [SamplingParams()] * 5, [None] * 5)
    expected = logits.argmax(-1)
    assert torch.equal(out, expected) and out[2] == 7


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(6, 40)
    params = [SamplingParams(temperature=1.0, top_k=1)] * 3 + [SamplingParams(temperature=1.0, top_p=1e-6)] * 3
    out = sample(logits, params, [gen(i) for i in range(6)])
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_restricts_support() -> None:
    logits = torch.randn(1, 30)
    allowed = set(logits[0].topk(3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3)
    draws = {int(sample(logits, [p], [gen(s)])[0]) for s in range(200)}
    assert draws <= allowed and len(draws) == 3


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7: tokens {0, 1}
    draws = {int(sample(logits, [p], [gen(s)])[0]) for s in range(200)}
    assert draws == {0, 1}


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(4, 64)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = sample(logits[1:2], [p], [gen(7)])
    batched = sample(logits, [SamplingParams(temperature=1.0)] * 4, [None, gen(7), None, None])
    assert alone[0] == batched[1]


def test_sampling_follows_the_softmax() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().unsqueeze(0).repeat(4000, 1)
    g = gen(0)
    out = sample(logits, [SamplingParams(temperature=1.0)] * 4000, [g] * 4000)
    freq = torch.bincount(out, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq

import random

import pytest

from core_helpers import make_req
from inlaid.core.predictor import LengthPredictor


def _finished(task, prompt_len, n_out, max_tokens=512):
    req = make_req("x", prompt_len=prompt_len, max_tokens=max_tokens, adapter=task)
    req.output_token_ids.extend([5] * n_out)
    return req


def test_cold_start_uses_prior_clamped_to_max_tokens():
    p = LengthPredictor(prior_mean=100.0)
    req = make_req("a", max_tokens=300, adapter="t")
    assert p.predict(req) == 100.0 and req.predicted_output_len == 100.0
    assert p.predict(make_req("b", max_tokens=20)) == 20.0


def test_learns_per_task_means():
    p = LengthPredictor(prior_mean=100.0, shrinkage=1.0)
    rng = random.Random(0)
    for _ in range(200):
        p.observe(_finished("short", 8, rng.randint(8, 12)))
        p.observe(_finished("long", 8, rng.randint(180, 220)))
    s = p.predict(make_req("s", prompt_len=8, max_tokens=512, adapter="short"))
    l_ = p.predict(make_req("l", prompt_len=8, max_tokens=512, adapter="long"))
    assert 9 < s < 12 and 190 < l_ < 210
    # an unseen task falls back to the global mean, not the prior
    u = p.predict(make_req("u", prompt_len=8, max_tokens=512, adapter="new"))
    assert 95 < u < 115
    assert p.num_observed() == 400 and p.num_observed_task("short") == 200


def test_prompt_length_buckets_condition_the_prediction():
    p = LengthPredictor(shrinkage=1.0)
    for _ in range(50):
        p.observe(_finished("t", 4, 10))
        p.observe(_finished("t", 200, 100))
    assert p.bucket_of(4) != p.bucket_of(200)
    assert p.predict(make_req("a", prompt_len=5, max_tokens=512, adapter="t")) < 15
    assert p.predict(make_req("b", prompt_len=180, max_tokens=512, adapter="t")) > 90


def test_bad_parameters():
    with pytest.raises(ValueError, match="prior_mean"):
        LengthPredictor(prior_mean=0)
    with pytest.raises(ValueError, match="shrinkage"):
        LengthPredictor(shrinkage=-1)

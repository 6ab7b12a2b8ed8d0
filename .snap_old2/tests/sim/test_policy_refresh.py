"""The inlaid policy re-estimates waiting requests from what the predictor learned since they arrived."""

from inlaid.config import SchedulerConfig
from inlaid.core.inlaid_policy import InlaidPolicy
from inlaid.core.policies import make_policy
from inlaid.core.predictor import LengthPredictor
from inlaid.request import Request
from inlaid.sampling import SamplingParams


def _req(rid, adapter, arrival, out_len=0):
    r = Request(rid, [1] * 8, SamplingParams(max_tokens=200), adapter=adapter, arrival_time=arrival)
    r.output_token_ids.extend([5] * out_len)
    return r


def test_stale_cold_start_prediction_is_refreshed():
    pred = LengthPredictor(prior_mean=128.0)
    pol = make_policy(SchedulerConfig(policy="inlaid", aging_s=1e9), pred)
    assert isinstance(pol, InlaidPolicy) and pol.predictor is pred
    early = _req("early", "short_task", 0.0)
    pred.predict(early)  # cold start: ~128
    pol.on_add(early, 0.0)
    assert early.predicted_output_len == 128.0
    for i in range(20):  # the task turns out to be short
        pred.observe(_req(f"done{i}", "short_task", 0.0, out_len=3))
    mid = _req("mid", "other", 1.0)
    mid.predicted_output_len = 40.0
    pol.attach(None, {}, [], 8)
    pol.use_grouping = False
    pol.on_add(mid, 1.0)  # hand-set prediction: not the predictor's, never refreshed
    assert [r.request_id for r in pol.order_waiting([early, mid], 2.0)] == ["early", "mid"]
    assert early.predicted_output_len < 10 and mid.predicted_output_len == 40.0
    # a request that already produced tokens keeps its prediction (a later stage may have set it)
    started = _req("started", "short_task", 0.0)
    pred.predict(started)
    pol.on_add(started, 0.0)
    started.output_token_ids.append(5)
    started.predicted_output_len = 77.0
    pol.order_waiting([started], 2.0)
    assert started.predicted_output_len == 77.0


def test_no_refresh_without_prediction():
    pred = LengthPredictor(prior_mean=50.0)
    pol = InlaidPolicy(predictor=pred, use_prediction=False, use_grouping=False)
    r = _req("a", "t", 0.0)
    r.predicted_output_len = 9.0
    pol.attach(None, {}, [], 8)
    pol.on_add(r, 0.0)
    pol.order_waiting([r], 1.0)
    assert r.predicted_output_len == 9.0


def test_off_device_adapters_are_brought_in_by_group_value():
    """On-device requests first (SRTF); then the off-device adapter whose waiting group holds the most short work."""
    from inlaid.core.adapter_slots import AdapterSlots

    slots = AdapterSlots(4)
    slots.acquire("hot")
    slots.release("hot")  # resident, unpinned
    pol = InlaidPolicy(aging_s=1e9)
    pol.attach(slots, {}, [], 8)
    reqs = [_req("hot-long", "hot", 0.0), _req("lone-short", "lone", 0.1), _req("g1", "grp", 0.2),
            _req("g2", "grp", 0.3), _req("g3", "grp", 0.4)]
    for r, pred in zip(reqs, [30.0, 4.0, 6.0, 6.0, 9.0]):
        r.predicted_output_len = pred
    # group value: lone = 1/4 = 0.25; grp = 1/6 + 1/6 + 1/9 = 0.44
    order = [r.request_id for r in pol.order_waiting(reqs, 1.0)]
    assert order == ["hot-long", "g1", "g2", "g3", "lone-short"]
    pol.use_grouping = False  # ablation: plain SRTF
    assert [r.request_id for r in pol.order_waiting(reqs, 1.0)][:2] == ["lone-short", "g1"]

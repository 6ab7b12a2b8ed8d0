import pytest

from core_helpers import EOS, FakeClock, check_output, fake_result, make_req, make_sched, run_to_completion
from inlaid.core.outputs import RunnerOutput
from inlaid.core.scheduler import QueueFullError
from inlaid.request import RequestStatus


def test_chunked_prefill_splits_a_long_prompt():
    sched = make_sched(max_num_batched_tokens=8)
    req = make_req("a", prompt_len=20, max_tokens=2)
    sched.add_request(req)
    chunks = []
    while req.num_output_tokens == 0:
        out = sched.schedule()
        check_output(sched, out)
        (seq,) = out.scheduled
        chunks.append((seq.start_pos, len(seq.token_ids), seq.sample))
        sched.update(out, fake_result(out))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert req.num_computed_tokens == 20 and req.output_token_ids == [7]


def test_decode_and_prefill_mix_within_budget():
    sched = make_sched(max_num_batched_tokens=10)
    a = make_req("a", prompt_len=3, max_tokens=10)
    sched.add_request(a)
    sched.update(out := sched.schedule(), fake_result(out))
    assert a.num_output_tokens == 1
    for i in range(3):
        sched.add_request(make_req(f"b{i}", prompt_len=6, max_tokens=10))
    out = sched.schedule()
    check_output(sched, out)
    plan = [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled]
    # decode first (1 token), then b0 whole (6), then b1 chunk (3); b2 waits
    assert plan == [("a", 1, True), ("b0", 6, True), ("b1", 3, False)]
    assert out.num_batched_tokens == 10
    assert sched.num_running == 3 and sched.num_waiting == 1


def test_max_num_seqs_caps_a_step():
    sched = make_sched(max_num_seqs=2)
    for i in range(5):
        sched.add_request(make_req(f"r{i}"))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    run_to_completion(sched)
    assert sched.stats.finished == 5


@pytest.mark.parametrize(
    "kwargs, tokens, status, n_out",
    [
        ({}, [5, 6, EOS, 9], RequestStatus.FINISHED_STOPPED, 3),
        ({"ignore_eos": True}, [5, EOS, 6, 8], RequestStatus.FINISHED_LENGTH, 4),
        ({"stop_token_ids": (6,)}, [5, 6, 8, 9], RequestStatus.FINISHED_STOPPED, 2),
        ({}, [5, 5, 5, 5], RequestStatus.FINISHED_LENGTH, 4),
    ],
)
def test_stop_conditions(kwargs, tokens, status, n_out):
    sched = make_sched()
    req = make_req("a", max_tokens=4, **kwargs)
    sched.add_request(req)
    outs = run_to_completion(sched, tokens={"a": tokens})
    assert req.status == status and req.output_token_ids == tokens[:n_out]
    assert req.finished_time is not None and req.first_token_time is not None
    assert sched.kv_usage() == 0.0
    # the runner hears about the finished request at the next schedule()
    assert sched.schedule().finished_ids == ["a"]
    assert all("a" not in o.finished_ids for o in outs)


def test_max_model_len_stops_generation():
    sched = make_sched(max_model_len=8)
    req = make_req("a", prompt_len=4, max_tokens=4)
    sched.add_request(req)
    run_to_completion(sched)
    assert req.num_tokens == 8 and req.status == RequestStatus.FINISHED_LENGTH


def test_update_returns_requests_with_tokens():
    sched = make_sched(max_num_batched_tokens=4)
    sched.add_request(make_req("a", prompt_len=2, max_tokens=1))
    sched.add_request(make_req("b", prompt_len=6, max_tokens=3))
    out = sched.schedule()
    changed = sched.update(out, fake_result(out))
    assert [r.request_id for r in changed] == ["a"]  # b got only a chunk, no token
    assert changed[0].is_finished
    with pytest.raises(ValueError, match="no sampled token"):
        out = sched.schedule()
        sched.update(out, RunnerOutput())


def test_preemption_under_tiny_block_budget_and_readmission():
    clock = FakeClock()
    # 6 blocks of 4 tokens: two requests of 8 prompt + 12 outputs cannot both finish resident
    sched = make_sched(clock, num_blocks=6, block_size=4)
    a = make_req("a", prompt_len=8, max_tokens=12, arrival=0.0)
    b = make_req("b", prompt_len=8, max_tokens=12, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    want = [10 + i for i in range(12)]
    outs = run_to_completion(sched, clock=clock, tokens={"a": want, "b": want})
    preempted = [rid for o in outs for rid in o.preempted_ids]
    assert preempted and set(preempted) == {"b"}  # fifo: the latest arrival is the victim
    assert sched.stats.preemptions == len(preempted) == b.num_preemptions
    # outputs survive preemption; recompute prefill covers prompt + outputs
    assert a.output_token_ids == want and b.output_token_ids == want
    re_prefill = [s for o in outs for s in o.scheduled if s.request_id == "b" and s.start_pos == 0]
    assert len(re_prefill) == 1 + b.num_preemptions
    assert len(re_prefill[-1].token_ids) > 8  # prompt plus generated tokens
    assert sched.block_manager.num_free_blocks == 6


def test_abort_frees_blocks_and_pins():
    sched = make_sched(slots=1)
    a = make_req("a", prompt_len=10, adapter="x")
    w = make_req("w", prompt_len=3)
    sched.add_request(a)
    out = sched.schedule()
    sched.update(out, fake_result(out))
    sched.add_request(w)
    assert sched.kv_usage() > 0 and sched.slots.pin_count("x") == 1
    aborted = sched.abort_requests(["a", "nope", "w"])
    assert [r.request_id for r in aborted] == ["a", "w"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert sched.kv_usage() == 0.0 and sched.slots.pin_count("x") == 0
    assert not sched.has_unfinished_requests()
    assert sorted(sched.schedule().finished_ids) == ["a", "w"]
    sched.remove_adapter("x")
    assert sched.resident_adapters() == {}


def test_finish_request_for_stop_strings():
    sched = make_sched()
    sched.add_request(make_req("a", max_tokens=10))
    out = sched.schedule()
    sched.update(out, fake_result(out))
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert not sched.has_unfinished_requests() and sched.kv_usage() == 0.0
    with pytest.raises(ValueError, match="FINISHED"):
        sched.finish_request("a", RequestStatus.RUNNING)


def test_adapter_loads_and_waiting_when_all_slots_pinned():
    sched = make_sched(slots=2)
    for rid, ad in [("a", "x"), ("b", "y"), ("c", "z"), ("d", "x"), ("e", None)]:
        sched.add_request(make_req(rid, max_tokens=3, adapter=ad))
    out = sched.schedule()
    check_output(sched, out)
    assert [s.request_id for s in out.scheduled] == ["a", "b", "d", "e"]  # c skipped, not an error
    assert out.adapter_loads == {0: "x", 1: "y"}
    assert sched.num_waiting == 1
    run_to_completion(sched)
    assert sched.stats.finished == 5 and sched.stats.adapter_loads == 3
    assert "z" in sched.resident_adapters()


def test_queue_full_and_impossible_requests():
    sched = make_sched(num_blocks=4, block_size=4, max_model_len=32, max_queue_len=2)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_req("long", prompt_len=30, max_tokens=4))
    with pytest.raises(ValueError, match="KV"):
        sched.add_request(make_req("kv", prompt_len=16, max_tokens=4))
    sched.add_request(make_req("a"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_req("a"))
    sched.add_request(make_req("b"))
    with pytest.raises(QueueFullError):
        sched.add_request(make_req("c"))
    no_slots = make_sched(slots=0)
    with pytest.raises(ValueError, match="adapter slots"):
        no_slots.add_request(make_req("x", adapter="x"))


def test_stats_and_predictor_hook():
    sched = make_sched()
    for i in range(4):
        sched.add_request(make_req(f"r{i}", max_tokens=3, adapter=f"t{i % 2}"))
    assert all(r.predicted_output_len is not None for r in sched.waiting)
    run_to_completion(sched)
    st = sched.stats
    assert st.steps == 3 and st.finished == 4
    assert st.distinct_adapters_hist == {2: 3} and st.mean_distinct_adapters == 2.0
    assert sched.predictor.num_observed() == 4

"""Test helpers for the core scheduler: request factory and a fake runner."""

from __future__ import annotations

from inlaid.config import SchedulerConfig
from inlaid.core.outputs import RunnerOutput, SchedulerOutput
from inlaid.core.scheduler import Scheduler
from inlaid.request import Request
from inlaid.sampling import SamplingParams

EOS = 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_req(rid: str, prompt_len: int = 4, max_tokens: int = 4, adapter: str | None = None,
             arrival: float = 0.0, eos: int | None = EOS, **sp: object) -> Request:
    """A request whose prompt tokens are 1..prompt_len (never EOS)."""
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **sp),
                   adapter=adapter, eos_token_id=eos, arrival_time=arrival)


def make_sched(clock: FakeClock | None = None, num_blocks: int = 64, block_size: int = 4, slots: int = 4,
               max_model_len: int = 256, **cfg: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), num_blocks=num_blocks, block_size=block_size,
                     num_adapter_slots=slots, max_model_len=max_model_len, clock=clock or FakeClock())


def fake_result(out: SchedulerOutput, token: int = 7, per_req: dict[str, int] | None = None) -> RunnerOutput:
    """Sample ``token`` (or ``per_req[id]``) for every sequence that samples."""
    per_req = per_req or {}
    return RunnerOutput(sampled={s.request_id: per_req.get(s.request_id, token) for s in out.scheduled if s.sample})


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants every SchedulerOutput must satisfy."""
    cfg = sched.cfg
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    owned: dict[int, str] = {}
    for s in out.scheduled:
        req = sched.requests[s.request_id]
        assert s.token_ids == req.all_token_ids[s.start_pos : s.start_pos + len(s.token_ids)]
        assert s.start_pos == req.num_computed_tokens
        assert len(s.block_ids) * sched.block_manager.block_size >= s.start_pos + len(s.token_ids)
        assert s.sample == (s.start_pos + len(s.token_ids) == req.num_tokens)
        for b in s.block_ids:
            assert owned.setdefault(b, s.request_id) == s.request_id, "block handed out twice"
        if req.adapter is not None:
            assert sched.slots.slot_of(req.adapter) == s.adapter_slot
        else:
            assert s.adapter_slot == -1


def run_to_completion(sched: Scheduler, max_steps: int = 10_000, clock: FakeClock | None = None,
                      tokens: dict[str, list[int]] | None = None) -> list[SchedulerOutput]:
    """Drive the scheduler with a fake runner until nothing is left; returns every step's output."""
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        out = sched.schedule()
        check_output(sched, out)
        per_req = {}
        if tokens:
            for s in out.scheduled:
                if s.sample and s.request_id in tokens:
                    seq = tokens[s.request_id]
                    k = s.num_output_tokens
                    per_req[s.request_id] = seq[k] if k < len(seq) else 7
        sched.update(out, fake_result(out, per_req=per_req))
        outs.append(out)
        if clock is not None:
            clock.t += 0.01
    raise AssertionError("scheduler did not finish")

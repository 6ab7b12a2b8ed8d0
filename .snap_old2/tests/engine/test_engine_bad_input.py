"""Bad input raises a clear ValueError and the engine keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inlaid import LLM, SamplingParams
from inlaid.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tiny_adapters: dict[str, Path]) -> LLMEngine:
    return LLM(model=str(tiny_llama_dir), adapters={"a": str(tiny_adapters["a"])}, device="cpu",
               max_lora_rank=4, num_blocks=128, max_model_len=64).engine


def still_serves(engine: LLMEngine) -> None:
    rid = engine.add_request(None, "Hello world", SamplingParams(max_tokens=3, ignore_eos=True), "a")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [rid] and len(finished[0].token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-5), "top_k"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_adapter(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="nope"):
        engine.add_request(None, "Hello", SamplingParams(), adapter="nope")
    still_serves(engine)


def test_empty_prompt(engine: LLMEngine) -> None:
    for prompt in ("", []):
        with pytest.raises(ValueError, match="empty"):
            engine.add_request(None, prompt, SamplingParams())
    still_serves(engine)


def test_prompt_longer_than_context(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="context"):
        engine.add_request(None, list(range(5, 70)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(None, list(range(5, 40)), SamplingParams(max_tokens=40))
    still_serves(engine)


def test_adapter_rank_above_max(engine: LLMEngine, tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="rank"):
        engine.add_adapter("b", str(tiny_adapters["b"]))  # rank 8 > max_lora_rank 4
    still_serves(engine)


def test_adapter_of_another_base(engine: LLMEngine, tmp_path: Path) -> None:
    from tiny import make_peft_adapter, make_tiny_llama_dir

    other = make_tiny_llama_dir(tmp_path / "other", hidden_size=32, intermediate_size=64, head_dim=8)
    adapter = make_peft_adapter(other, tmp_path / "adapter", 4, ["q_proj", "v_proj"], seed=5)
    with pytest.raises(ValueError, match="another base model"):
        engine.add_adapter("other", str(adapter))
    still_serves(engine)


def test_adapter_path_that_is_not_an_adapter(engine: LLMEngine, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        engine.add_adapter("x", str(tmp_path / "missing"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError):
        engine.add_adapter("y", str(tmp_path))
    still_serves(engine)


def test_duplicate_adapter_name(engine: LLMEngine, tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="a"):
        engine.add_adapter("a", str(tiny_adapters["a"]))
    still_serves(engine)


def test_abort_frees_kv(engine: LLMEngine) -> None:
    rid = engine.add_request(None, "Hello world", SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort_request([rid])
    outs = engine.step()
    assert any(o.request_id == rid and o.finish_reason == "abort" for o in outs)
    assert engine.stats()["kv_blocks_used"] == 0
    still_serves(engine)

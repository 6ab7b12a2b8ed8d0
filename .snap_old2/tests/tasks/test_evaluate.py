"""inlaid.tasks.evaluate and `inlaid eval` on the tiny random model with synthetic task data.

Checks: one mixed run (all tasks, several adapters, one generate call) gives the
same predictions, metrics and NLL as each task alone; the answer NLL equals a
transformers+PEFT teacher-forcing reference; the CLI writes JSON + Markdown;
bad input (unknown task, missing split, adapter for another base, unknown
adapter) raises clear ValueErrors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from inlaid.lora.errors import IncompatibleAdapterError, UnknownAdapterError
from inlaid.tasks.dataset import MissingSplitError, load_split
from inlaid.tasks.registry import UnknownTaskError, get_task

TASKS = ("math_gsm", "fortune_topic", "definitions")


def _rows(task: str, n: int) -> list[dict[str, str]]:
    if task == "math_gsm":
        return [{"id": f"m{i}", "prompt": f"{i} + {i} = ?", "completion": str(2 * i), "label": str(2 * i)}
                for i in range(n)]  # fmt: skip
    if task == "fortune_topic":
        labels = get_task(task).labels
        return [{"id": f"f{i}", "prompt": f"Quote {i}: the cat", "completion": labels[i % len(labels)],
                 "label": labels[i % len(labels)]} for i in range(n)]  # fmt: skip
    return [{"id": f"d{i}", "prompt": f"Define: dog {i}", "completion": "a brown dog that jumps"} for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task_data")
    for task in TASKS:
        (root / task).mkdir()
        text = "".join(json.dumps(r) + "\n" for r in _rows(task, 3))
        (root / task / "test.jsonl").write_text(text)
    return root


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, tiny_adapters):
    from inlaid import LLM

    adapters = {"math_gsm": str(tiny_adapters["a"]), "fortune_topic": str(tiny_adapters["b"]),
                "definitions": str(tiny_adapters["c"])}  # fmt: skip
    return LLM(model=str(tiny_llama_dir), adapters=adapters, device="cpu", max_num_seqs=8)


def test_mixed_run_equals_each_task_alone(llm, data_dir):
    from inlaid.tasks.evaluate import evaluate_runs

    runs = [("math_gsm", "math_gsm"), ("fortune_topic", "fortune_topic"), ("definitions", "definitions"),
            ("math_gsm", None)]  # fmt: skip
    mixed = evaluate_runs(llm, runs, data_dir=data_dir, max_batch_tokens=256, max_pool_slots=2)
    for task, adapter in runs:
        alone = evaluate_runs(llm, [(task, adapter)], data_dir=data_dir).get(task, adapter)
        m = mixed.get(task, adapter)
        assert m.predictions == alone.predictions
        assert m.metric == alone.metric
        assert m.nll == pytest.approx(alone.nll, abs=1e-5)
        assert m.examples == 3 and m.answer_tokens == alone.answer_tokens > 0
    # the adapters matter: base and adapter runs of a task differ
    assert mixed.get("math_gsm", None).nll != pytest.approx(mixed.get("math_gsm", "math_gsm").nll, abs=1e-3)


def _peft_nll(base_dir: Path, adapter_dir: Path | None, task: str, data_dir: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.tasks.prompting import encode_example

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    total, count = 0.0, 0
    for ex in load_split(task, "test", data_dir=data_dir):
        p, a = encode_example(tok, get_task(task), ex.prompt, ex.completion)
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].double()
        lp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(a) - 1], dim=-1)
        total -= float(lp.gather(1, torch.tensor(a)[:, None]).sum())
        count += len(a)
    return total / count


def test_nll_matches_transformers_peft(llm, data_dir, tiny_llama_dir, tiny_adapters):
    from inlaid.tasks.evaluate import evaluate

    res = evaluate(llm, ["fortune_topic", "definitions"], {"fortune_topic": "fortune_topic"}, generate=False,
                   data_dir=data_dir)  # fmt: skip
    assert math.isnan(res.get("fortune_topic", "fortune_topic").metric)
    want_a = _peft_nll(tiny_llama_dir, tiny_adapters["b"], "fortune_topic", data_dir)
    want_base = _peft_nll(tiny_llama_dir, None, "definitions", data_dir)
    assert res.get("fortune_topic", "fortune_topic").nll == pytest.approx(want_a, abs=1e-4)
    assert res.get("definitions", None).nll == pytest.approx(want_base, abs=1e-4)


def test_cli_end_to_end(tiny_llama_dir, tiny_adapters, data_dir, tmp_path, capsys):
    from inlaid.cli import main

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["eval", "--model", str(tiny_llama_dir), "--device", "cpu", "--adapter",
               f"math_gsm={tiny_adapters['a']}", "--tasks", "math_gsm,fortune_topic", "--limit", "2", "--base-too",
               "--data-dir", str(data_dir), "--out", str(out), "--markdown", str(md)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {(r["task"], r["adapter"]) for r in data["runs"]}
    assert runs == {("math_gsm", "math_gsm"), ("fortune_topic", None), ("math_gsm", None)}
    assert all(r["examples"] == 2 and len(r["predictions"]) == 2 and r["nll"] > 0 for r in data["runs"])
    table = md.read_text()
    assert "| math_gsm | exact_match_number | math_gsm | 2 |" in table and "(base)" in table
    assert "answer NLL" in capsys.readouterr().out


def test_cli_unknown_task_is_a_clear_error(tiny_llama_dir, capsys):
    from inlaid.cli import main

    assert main(["eval", "--model", str(tiny_llama_dir), "--device", "cpu", "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_bad_input(llm, data_dir, tmp_path, tiny_llama_dir):
    from inlaid import LLM
    from inlaid.tasks.evaluate import evaluate, evaluate_runs
    from tiny import make_peft_adapter, make_tiny_llama_dir

    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        evaluate(llm, ["nope"], data_dir=data_dir)
    with pytest.raises(MissingSplitError, match="validation.jsonl is missing"):
        evaluate(llm, ["math_gsm"], split="validation", data_dir=data_dir)
    with pytest.raises(UnknownAdapterError):
        evaluate_runs(llm, [("math_gsm", "not_registered")], data_dir=data_dir)
    with pytest.raises(ValueError, match="not evaluated"):
        evaluate(llm, ["math_gsm"], {"definitions": "definitions"}, data_dir=data_dir)
    with pytest.raises(ValueError, match="no \\(task, adapter\\) runs"):
        evaluate_runs(llm, [], data_dir=data_dir)
    other = make_tiny_llama_dir(tmp_path / "other", hidden_size=32, head_dim=8, intermediate_size=64)
    foreign = make_peft_adapter(other, tmp_path / "foreign", 2, ["q_proj"], seed=5)
    with pytest.raises(IncompatibleAdapterError, match="another base"):
        LLM(model=str(tiny_llama_dir), adapters={"math_gsm": str(foreign)}, device="cpu")


def test_deferred_metrics_rescored_from_json_equal_scoring_in_place(llm, data_dir):
    import json

    from inlaid.tasks.evaluate import EvalResults, evaluate_runs

    runs = [("math_gsm", None), ("definitions", None)]
    scored = evaluate_runs(llm, runs, data_dir=data_dir, nll=False)
    deferred = evaluate_runs(llm, runs, data_dir=data_dir, nll=False, score=False)
    assert all(math.isnan(r.metric) for r in deferred.runs)
    back = EvalResults.from_json(json.loads(json.dumps(deferred.to_json(with_predictions=True))))
    rescored = back.rescored(data_dir)
    assert [r.metric for r in rescored.runs] == [r.metric for r in scored.runs]
    assert [r.predictions for r in rescored.runs] == [r.predictions for r in scored.runs]

import json

import pytest

from inlaid.bench import task_lengths as tl
from inlaid.bench.workload import WorkloadConfig, generate_workload, task_suite


def _write(d, task, rows, split="train"):
    (d / task).mkdir(parents=True, exist_ok=True)
    (d / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_counts_prompt_and_completion_plus_eos(tmp_path):
    _write(tmp_path, "a", [{"prompt": "one two three four", "completion": "x y"}, {"prompt": "p", "completion": ""},
                           {"prompt": 3, "completion": "bad row skipped"}])
    _write(tmp_path, "b", [{"prompt": "hi", "completion": "a b c d e f g h i j"}], split="test")
    files = tl.data_files(tmp_path)
    suite = tl.count_lengths(files, tl.words_counter)
    assert suite == {"a": [(5, 4), (1, 1)], "b": [(1, 14)]}  # 1.3 tokens/word, completion + 1 for EOS
    assert tl.count_lengths(files, lambda s: len(s))["a"][0] == (18, 4)


def test_cache_is_used_only_when_it_matches_the_data(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache.json"
    _write(data, "a", [{"prompt": "one two", "completion": "x"}])
    assert tl.load_task_lengths(tmp_path / "nothing", cache) == ({}, "none")
    monkeypatch.setattr(tl, "bundled_token_counter", lambda: (lambda s: 100, "fake-tok"))
    tl.build_cache(data, cache)
    assert tl.load_task_lengths(data, cache) == ({"a": [(100, 101)]}, "fake-tok")
    _write(data, "a", [{"prompt": "one two", "completion": "x y"}])  # data changed: cache is stale
    assert tl.load_task_lengths(data, cache) == ({"a": [(3, 4)]}, "words*1.3")


def test_workload_samples_suite_lengths_per_task():
    suite = dict(task_suite())
    if not suite:
        pytest.skip("task suite data not present")
    names = sorted(suite)
    specs = generate_workload(WorkloadConfig(num_requests=300, num_tasks=len(names) + 2, lengths="suite",
                                             max_tokens=64, max_prompt=128, seed=5))
    for s in specs:
        src = names[int(s.adapter[1:]) % len(names)]
        assert any(min(p, 128) == s.prompt_len and min(o, 64) == s.output_len for p, o in suite[src])
    synth = generate_workload(WorkloadConfig(num_requests=300, num_tasks=len(names) + 2, lengths="synthetic", seed=5))
    assert [s.output_len for s in synth] != [s.output_len for s in specs]
    with pytest.raises(ValueError, match="lengths"):
        WorkloadConfig(lengths="real")

import json

from inlaid.cli import main


def test_bench_sim_prints_a_table(capsys):
    rc = main(["bench", "sim", "--requests", "40", "--rates", "3", "--tasks", "4", "--lengths", "synthetic",
               "--slots", "2", "--num-blocks", "128"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| tasks | rate | policy | throughput_rps")
    assert [ln.split("|")[3].strip() for ln in lines[2:]] == ["fifo", "mlfq", "inlaid"]


def test_bench_sim_json_and_cost_model_file(tmp_path, capsys):
    f = tmp_path / "cm.json"
    f.write_text(json.dumps({"coefficients": {"base": 0.1, "prefill_token": 0.001, "decode_seq": 0.01,
                                              "distinct_adapter": 0.0, "adapter_load": 0.0}, "device": "x"}))
    assert main(["bench", "sim", "--requests", "20", "--rates", "1", "--tasks", "2", "--policies", "inlaid",
                 "--lengths", "synthetic", "--cost-model", str(f), "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["policy"] == "inlaid" and rows[0]["finished"] == 20
    assert main(["bench", "sim", "--cost-model", str(tmp_path / "missing.json")]) == 2
    assert "fit_cost_model.py" in capsys.readouterr().err


def test_bench_offline_on_a_tiny_model(tiny_llama_dir, capsys):
    rc = main(["bench", "offline", "--model", str(tiny_llama_dir), "--dummy", "--device", "cpu", "--num-prompts", "3",
               "--prompt-len", "5", "--max-tokens", "4", "--adapters", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["requests"] == 3 and res["output_tokens"] == 12 and res["device"] == "cpu"

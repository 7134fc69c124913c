"""``specdec bench --batch-size B``: HF ``generate`` on left-padded batches as the baseline, the engines'
``generate_batch``, aggregate throughput, latency percentiles, and the documented JSON fields."""

from __future__ import annotations

import json

import pytest

from specdec.app.cli import main

from .test_cli import tiny_model_dir  # noqa: F401 - fixture

PROMPTS = [{"prompt": "Copy: red green blue red green blue", "category": "rewriting"},
           {"prompt": "Say hi", "category": "chat"},
           {"prompt": "List three fruits, one per line, and nothing else please.", "category": "qa"}]


@pytest.mark.slow
def test_left_padded_hf_batches_equal_one_prompt_at_a_time(tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.app.batch_bench import hf_generate_batch
    from specdec.app.bench import hf_generate
    from specdec.app.prompts import encode_prompt
    from specdec.sampling import GREEDY

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in PROMPTS]
    assert len({p.numel() for p in prompts}) == 3  # padding matters
    rows, seconds = hf_generate_batch(model, prompts, 6, GREEDY, pad_id=tokenizer.eos_token_id, eos=[])
    assert seconds > 0
    assert rows == [hf_generate(model, p, 6)[0] for p in prompts]


@pytest.mark.slow
def test_bench_batch_size_reports_throughput_latency_and_batch_size(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "b2.json"
    assert main(["bench", "--prompts", str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "8",
                 "--batch-size", "2", "--drafter", "ngram", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["batch_size"] == 2 and report["complete"] and report["baseline"]["name"] == "hf_greedy"
    assert [r["name"] for r in report["runs"]] == ["specdec_ar", "ngram"]
    for run in report["runs"]:
        assert run["n_prompts"] == 3 and set(run["per_category"]) == {"rewriting", "chat", "qa"}
        assert run["speedup"] == pytest.approx(run["tokens_per_s"] / report["baseline"]["tokens_per_s"])
        assert 0 < run["latency_p50_s"] <= run["latency_p99_s"]
        assert run["identical_to_baseline"] + run["near_ties"] == 3  # greedy: lossless up to float near-ties
    assert len(report["requests"]) == 2 * 3 and all(r["latency_s"] > 0 for r in report["requests"])
    table = capsys.readouterr().out
    assert "p50 s" in table and "batch size 2" in table and "aggregate throughput ratio" in table

"""Experiment runner (experiments/run.py, specdec.app.experiment) on a tiny random model saved with the SmolLM2
tokenizer: documented JSON fields, valid PNGs, an offline W&B run holding the same tau, multi-turn prompts, YAML
grids, bootstrap intervals, and an equality check that catches a wrong drafter result."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from specdec.app.bench import check_greedy, hf_generate
from specdec.app.prompts import encode_prompt
from specdec.app.tracking import read_offline_run
from specdec.engine import SpeculativeEngine
from specdec.stats import mean_ci

from .test_cli import tiny_model_dir  # noqa: F401 - fixture

PNG = b"\x89PNG\r\n\x1a\n"
RUNNER = Path(__file__).resolve().parents[1] / "experiments" / "run.py"
PROMPTS = [
    {"question_id": 81, "category": "writing", "turns": ["Copy: red green blue red green blue", "Now reverse it."]},
    {"question_id": 82, "category": "qa", "turns": ["Say hi"]},
    {"prompt": "Repeat: a b c a b c a b c", "category": "rewriting"},
]
REQUEST_FIELDS = {"kind", "temperature", "method", "prompt_index", "question_id", "category", "turn", "new_tokens",
                  "tau", "tokens_per_s", "baseline_tokens_per_s", "speedup", "draft_s", "verify_s",
                  "acceptance_by_depth", "equality", "latency_s"}
SUMMARY_FIELDS = {"kind", "temperature", "baseline", "name", "tokens_per_s", "speedup", "speedup_mean_ci", "tau",
                  "tau_mean_ci", "acceptance_by_depth", "accepted_length_hist", "draft_s", "verify_s",
                  "identical_to_baseline", "near_ties", "differences", "n_prompts", "per_category", "label",
                  "latency_p50_s", "latency_p99_s"}


def _runner():
    spec = importlib.util.spec_from_file_location("experiments_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _read(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "request"], [r for r in records if r["kind"] == "summary"]


@pytest.mark.slow
def test_runner_writes_every_documented_field_plots_and_wandb(tiny_model_dir, prompt_file, tmp_path, monkeypatch,  # noqa: F811
                                                              capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "exp"
    argv = ["--prompts", str(prompt_file), "--model", tiny_model_dir, "--max-new-tokens", "8", "--multi-turn",
            "--drafter", "ngram", "eagle:tree=dynamic,depth=3", "--budget", "4", "8", "--temperature", "0", "0.7",
            "--seed", "1", "--out", str(out)]
    assert _runner().main(argv) == 0
    printed = capsys.readouterr().out
    assert "temperature 0, baseline hf_greedy" in printed and "temperature 0.7, baseline hf_sample" in printed
    requests, summaries = _read(out)
    methods = ["specdec_ar", "ngram", "eagle:tree=dynamic,depth=3,budget=4", "eagle:tree=dynamic,depth=3,budget=8"]
    assert [s["name"] for s in summaries] == methods * 2
    assert len(requests) == 2 * len(methods) * 4  # 2 temperatures x methods x (2 + 1 + 1 turns)
    for r in requests:
        assert set(r) == REQUEST_FIELDS
        assert (r["equality"] is None) == (r["temperature"] > 0)
    assert {r["turn"] for r in requests if r["question_id"] == "81"} == {0, 1}
    for s in summaries:
        assert set(s) == SUMMARY_FIELDS
        assert s["n_prompts"] == 4 and s["speedup_mean_ci"][1] <= s["speedup_mean_ci"][0] <= s["speedup_mean_ci"][2]
        if s["temperature"] == 0:
            assert s["identical_to_baseline"] == 4 and s["differences"] == []  # greedy is lossless
        else:
            assert s["identical_to_baseline"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"]["budgets"] == [4, 8] and len(summary["reports"]) == 2 and summary["complete"]
    assert not list(out.glob("*.partial.jsonl"))  # the journals go once the results are written
    assert all("requests" not in r for r in summary["reports"])
    for stem in ("T0", "T0.7"):
        for plot in ("speedup_by_category", "acceptance_by_depth", "tau_vs_budget"):
            assert (out / f"{stem}_{plot}.png").read_bytes()[:8] == PNG
    [run_dir] = (out / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)
    for s in summaries:
        key = f"T{s['temperature']:g}/{s['name']}/tau"
        assert logged["summary"][key] == pytest.approx(s["tau"])
    assert logged["config"]["grid"]["temperatures"] == [0.0, 0.7]


@pytest.mark.slow
def test_equality_check_flags_a_wrong_drafter_result(tiny_model_dir, prompt_file, tmp_path, monkeypatch):  # noqa: F811
    real_generate = SpeculativeEngine.generate

    def corrupt(self, *args, **kwargs):  # the n-gram run's token 2 is wrong
        result = real_generate(self, *args, **kwargs)
        if self.drafter is None or len(result.tokens) < 3:
            return result
        tokens = list(result.tokens)
        tokens[2] = (tokens[2] + 1) % 100
        return dataclasses.replace(result, tokens=tokens)

    monkeypatch.setattr(SpeculativeEngine, "generate", corrupt)
    out = tmp_path / "exp"
    argv = ["--prompts", str(prompt_file), "--model", tiny_model_dir, "--max-new-tokens", "6", "--no-wandb",
            "--out", str(out)]
    assert _runner().main(argv) == 0
    _, summaries = _read(out)
    by_name = {s["name"]: s for s in summaries}
    assert by_name["specdec_ar"]["identical_to_baseline"] == 3
    assert by_name["ngram"]["identical_to_baseline"] == 0
    diffs = by_name["ngram"]["differences"]
    assert len(diffs) == 3 and all(d["first_diff"] == 2 and not d["near_tie"] for d in diffs)
    assert all(d["margin"] > 0 for d in diffs)
    assert not (out / "wandb").exists()


@pytest.mark.slow
def test_check_greedy_by_hand(tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_prompt(tokenizer, "Name three colours.")
    ref, _ = hf_generate(model, ids, 6)
    assert check_greedy(model, ids, ref, ref).identical
    wrong = list(ref)
    wrong[4] = ref[4] + 1
    check = check_greedy(model, ids, ref, wrong)
    assert not check.identical and check.first_diff == 4 and check.margin > 1e-4 and not check.near_tie
    assert check_greedy(model, ids, ref, ref[:3]).first_diff == 3  # cut short


def test_yaml_grid_and_errors(tmp_path, capsys):
    runner = _runner()
    config = tmp_path / "grid.yaml"
    config.write_text("drafter: [ngram, 'medusa:tree=dynamic']\nbudget: [4, 16]\ntemperature: [0, 0.5]\n"
                      "max_new_tokens: 32\n")
    args = runner.parse_args(["--config", str(config), "--max-new-tokens", "16"])
    grid = runner.grid_from_args(args)
    assert grid.temperatures == (0.0, 0.5) and grid.max_new_tokens == 16  # the flag wins over the file
    assert list(grid.methods()) == ["ngram", "medusa:tree=dynamic,budget=4", "medusa:tree=dynamic,budget=16"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("drafters: [ngram]\n")
    assert runner.main(["--config", str(bad)]) == 2
    assert "unknown keys ['drafters']" in capsys.readouterr().err
    assert runner.main(["--drafter", "nope"]) == 2
    assert "unknown drafter 'nope'" in capsys.readouterr().err


def test_mean_ci_bootstrap():
    assert mean_ci([2.0]) == (2.0, 2.0, 2.0)
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert mean == 4.5 and 2.5 < low < 4.5 < high < 6.5
    assert mean_ci([1.0, 2.0, 3.0]) == mean_ci([1.0, 2.0, 3.0])  # fixed seed: reproducible
    with pytest.raises(ValueError, match="mean_ci needs at least one value"):
        mean_ci([])


def test_prompt_sets_multi_turn_and_hf_dataset_errors(tmp_path):
    from specdec.app.prompts import load_hf_prompts, load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    prompts = load_prompts(path)
    assert prompts[0].all_turns == tuple(PROMPTS[0]["turns"]) and prompts[0].question_id == "81"
    assert prompts[2].all_turns == ("Repeat: a b c a b c a b c",)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n"
                                               for i in range(10)))
    sample = load_hf_prompts(str(folder), "test", limit=3, seed=0)
    assert len(sample) == 3 and all(p.category == "ds" for p in sample)
    assert sample == load_hf_prompts(str(folder), "test", limit=3, seed=0)  # a fixed sample
    assert sample != load_hf_prompts(str(folder), "test", limit=3, seed=1)
    assert len(load_hf_prompts(str(folder), "test")) == 10
    with pytest.raises(ValueError, match="no text field 'body'"):
        load_hf_prompts(str(folder), "test", field="body")
    with pytest.raises(ValueError, match="cannot load dataset"):
        load_hf_prompts(str(folder), "validation")


@pytest.mark.slow
def test_conversation_encoding_holds_earlier_answers():
    from specdec.app.loaders import load_tokenizer
    from specdec.app.prompts import encode_conversation

    tokenizer = load_tokenizer(None)
    ids = encode_conversation(tokenizer, ["Hi", "And?"], ["Hello there"])
    text = tokenizer.decode(ids)
    assert text.index("Hi") < text.index("Hello there") < text.index("And?")
    assert torch.equal(encode_conversation(tokenizer, ["Hi"], []), encode_prompt(tokenizer, "Hi"))
    with pytest.raises(ValueError, match="needs 1 answers"):
        encode_conversation(tokenizer, ["a", "b"], [])


def test_repeats_time_every_method_interleaved_and_keep_the_median_run(tiny_model_dir, monkeypatch):  # noqa: F811
    """``--repeats 3``: per request the baseline and every method run three times, interleaved (baseline, AR,
    n-gram, baseline, ...); the kept run is the median one, its tokens those of every repeat (greedy)."""
    from transformers import AutoModelForCausalLM

    import specdec.app.bench as B
    from specdec.app.loaders import load_tokenizer
    from specdec.app.prompts import Prompt
    from specdec.drafters import DrafterSpec
    from specdec.target import TargetModel

    order = []
    real_hf, real_gen = B.hf_generate, SpeculativeEngine.generate

    def hf(*args, **kw):
        order.append("hf")
        return real_hf(*args, **kw)

    def gen(self, *args, **kw):
        order.append("ngram" if self.drafter is not None else "ar")
        return real_gen(self, *args, **kw)

    monkeypatch.setattr(B, "hf_generate", hf)
    monkeypatch.setattr(SpeculativeEngine, "generate", gen)
    tokenizer = load_tokenizer(tiny_model_dir)
    target = TargetModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    prompts = [Prompt("Repeat: a b c a b c a b c", "rw"), Prompt("Say hi", "chat")]
    settings = B.BenchSettings(max_new_tokens=6, repeats=3)
    report = B.run_bench(target, tokenizer, prompts, {"ngram": DrafterSpec.parse("ngram")}, settings)
    body = order[order.index("hf", 3):]  # after the warm-up (one call each)
    assert body == ["hf", "ar", "ngram"] * 6
    assert all(r.identical_to_baseline == 2 for r in report.runs)
    for bad, match in [({"repeats": 0}, "--repeats must be >= 1"),
                       ({"repeats": 2, "sampling": B.SamplingParams(0.8)}, "greedy runs only"),
                       ({"repeats": 2, "batch_size": 4}, "--batch-size 1")]:
        with pytest.raises(ValueError, match=match):
            B.BenchSettings(**bad)

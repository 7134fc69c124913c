"""The command line on a tiny random model saved with the SmolLM2 tokenizer (any HF path must work)."""

import json

import pytest
import torch

from specdec.app.cli import main

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from specdec.app.loaders import load_tokenizer

    tokenizer = load_tokenizer(None)  # the embedded model's tokenizer alone (no model load)
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(vocab=len(tokenizer), layers=2, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_generate_streams_text_to_stdout_and_one_stats_line_to_stderr(tiny_model_dir, capsys):
    assert main(["generate", "Repeat after me: a b c a b c a b c", "--model", tiny_model_dir,
                 "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "tau" not in captured.out and captured.out.endswith("\n")
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("[ngram] 12 tokens in") and "tau" in err[-1] and err[-1].endswith("stop: length")


@pytest.mark.slow
def test_generate_json_prints_one_object_with_text_tokens_and_stats(tiny_model_dir, capsys):
    assert main(["generate", "Say hi", "--model", tiny_model_dir, "--max-new-tokens", "5", "--json",
                 "--drafter", "none"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result["tokens"]) == 5 and result["stop_reason"] == "length" and result["drafter"] == "none"
    assert result["stats"]["new_tokens"] == 5 and result["stats"]["tau"] == 1.0
    assert isinstance(result["text"], str) and "tau" not in captured.err


@pytest.mark.slow
def test_bench_writes_the_documented_json(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Say hi"], "category": "chat"}\n{"prompt": "Copy: x y z x y z", "category": "rw"}\n')
    out = tmp_path / "r.json"
    assert main(["bench", "--prompts", str(prompts), "--model", tiny_model_dir, "--max-new-tokens", "8",
                 "--out", str(out), "--drafter", "ngram"]) == 0
    report = json.loads(out.read_text())
    assert report["baseline"]["name"] == "hf_greedy" and report["baseline"]["tokens_per_s"] > 0
    names = [r["name"] for r in report["runs"]]
    assert names == ["specdec_ar", "ngram"]
    for run in report["runs"]:
        assert {"tokens_per_s", "speedup", "tau", "acceptance_by_depth", "identical_to_baseline", "n_prompts",
                "per_category"} <= set(run)
        assert run["n_prompts"] == 2 and run["identical_to_baseline"] == 2  # greedy is lossless
        assert set(run["per_category"]) == {"chat", "rw"}
    table = capsys.readouterr().out
    assert "hf_greedy" in table and "same: greedy outputs token-identical to the baseline" in table
    assert report["batch_size"] == 1 and report["complete"] and [r["label"] for r in report["runs"]] == names
    assert not (tmp_path / "r.json.partial.jsonl").exists()  # the journal goes once the report is complete
    for png in ("r_speedup_by_category.png", "r_acceptance_by_depth.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", "hi", "--drafter", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("specdec: error: unknown drafter 'nope'")
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_compile_defaults_to_on_for_cuda_only_and_the_flags_override_it(tiny_model_dir):
    import argparse

    from specdec.app import loaders

    def args(**kw):
        return argparse.Namespace(model=tiny_model_dir, dtype="float32", device="cpu", attention=None, **kw)

    assert loaders.load_target(args(compile=None))[0].compiled is None  # CPU: GEMM-bound, compiling does not pay
    assert loaders.load_target(args(compile=True))[0].compiled is not None
    assert loaders.load_target(args(compile=False))[0].compiled is None
    assert loaders.compile_pays(torch.device("cuda", 0)) and not loaders.compile_pays(torch.device("cpu"))

"""Every bad input a new user can type is one ``specdec: error:`` line naming the problem, exit status 2, no
traceback, and (all of these) no model load: the checks run before the model is read."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.app import loaders
from specdec.app.cli import main
from specdec.checkpoint import save_checkpoint
from specdec.drafters.medusa import MedusaConfig

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the table refers to: checkpoints (good, corrupt, bad JSON), prompt files, folders, a tiny model."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = MedusaConfig(hidden_size=8, vocab_size=16, num_heads=2)
    for name in ("medusa", "corrupt", "bad_json"):
        save_checkpoint(torch.nn.Linear(2, 2), config, root / name, kind="medusa")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage")
    bad_json = root / "bad_json"
    (bad_json / "config.json").write_text("{'single': quotes}")
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    (root / "ok.jsonl").write_text(json.dumps({"prompt": "Say hi"}) + "\n")
    tiny = root / "tiny"
    tokenizer = loaders.load_tokenizer(None)
    tiny_llama(vocab=len(tokenizer), layers=1, dtype=torch.float32).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    paths = {name: str(root / name) for name in ("medusa", "corrupt", "bad_json", "empty", "tiny")}
    return {**paths, "bad_prompts": str(root / "bad.jsonl"), "ok_prompts": str(root / "ok.jsonl")}


CASES = [
    (["generate", "hi", "--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "hi", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "hi", "--packed", "--dtype", "bfloat16", "--device", "cpu"],
     "--packed needs --dtype float32 on the CPU (got --dtype bfloat16 on cpu)"),
    (["generate", "hi", "--packed", "--compile", "--device", "cpu"], "--packed and --compile exclude each other"),
    (["generate", "hi", "--num-blocks", "0"], "--num-blocks must be >= 1, got 0"),
    (["generate", "hi", "--block-size", "0"], "--block-size must be >= 1, got 0"),
    (["generate", "  "], "empty prompt: need at least one token"),
    (["generate", "hi", "--tree-budget", "1"], "--tree-budget must be >= 2, got 1"),
    (["generate", "hi", "--tree-depth", "0"], "--tree-depth must be >= 1, got 0"),
    (["generate", "hi", "--tree-topk", "0"], "--tree-topk must be >= 1, got 0"),
    (["generate", "hi", "--draft-layers", "0"], "--draft-layers must be >= 1, got 0"),
    (["generate", "hi", "--device", "tpu9"], "unknown --device 'tpu9': use cpu, cuda or cuda:N"),
    (["generate", "hi", "--attention", "triton", "--device", "cpu"],
     "--attention triton on CPU needs the Triton interpreter: use --attention torch, or export TRITON_INTERPRET=1"),
    (["generate", "hi", "--drafter", "nope"], "unknown drafter 'nope'"),
    (["generate", "hi", "--drafter", "ngram:depth=abc"], "option 'depth' of drafter 'ngram' expects an integer"),
    (["generate", "hi", "--drafter", "ngram:path=x"], "its options are ['depth', 'budget', 'min_ngram', 'max_ngram',"),
    (["generate", "hi", "--drafter", "ngram:store=/nonexistent"], "ngram:store=/nonexistent: store /nonexistent does "
                                                                  "not exist"),
    (["generate", "hi", "--drafter", "ngram:store={medusa}"], "is not a token store (needs tokens.safetensors"),
    (["generate", "hi", "--drafter", "medusa:path=/nonexistent"], "drafter checkpoint /nonexistent does not exist"),
    (["generate", "hi", "--drafter", "eagle:path={medusa}"], "is a medusa checkpoint, not a eagle one"),
    (["generate", "hi", "--drafter", "medusa:path={corrupt}"], "is not a readable safetensors file"),
    (["generate", "hi", "--drafter", "medusa:path={bad_json}"], "bad_json/config.json is not valid JSON"),
    (["generate", "hi", "--drafter-path", "{empty}", "--drafter", "eagle"], "needs config.json and model.safetensors"),
    (["generate", "hi", "--model", "{empty}"], "no config.json in"),
    (["generate", "hi", "--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
    (["generate", "hi", "--model", "{tiny}", "--num-blocks", "2"], "use --num-blocks "),
    (["bench", "--prompts", "/nonexistent.jsonl"], "prompt file not found: /nonexistent.jsonl"),
    (["bench", "--prompts", "{bad_prompts}"], "bad.jsonl:2: invalid JSON"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["bench", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["bench", "--batch-size", "4", "--multi-turn"], "--multi-turn runs one request at a time"),
    (["bench", "--per-category", "0"], "--per-category must be >= 1, got 0"),
    (["bench", "--drafter", "ngram", "medusa:path=/nonexistent"], "does not exist"),
    (["bench", "--prompts", "{ok_prompts}", "--model", "{tiny}", "--max-new-tokens", "500", "--num-blocks", "4"],
     "+ --max-new-tokens 500 + 64 draft-tree nodes need"),
]


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(loaders, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(loaders, "load_model", refuse)
    monkeypatch.setattr(loaders, "load_target", refuse)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SPECDEC_ATTENTION", raising=False)


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_no_model_load(argv, message, files, no_model_load, capsys):
    argv = [a.format(**files) if "{" in a else a for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_loading(no_model_load, capsys):
    assert main(["generate", "hi", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err


def test_an_uncached_hub_id_offline_fails_at_once_naming_the_fix(no_model_load, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "hi", "--model", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache and the hub cannot be reached (offline)" in err
    assert "--model PATH" in err


def test_every_flag_has_help_that_states_its_default():
    from specdec.app.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"generate", "bench"}
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text, f"specdec {name} {action.option_strings[0]}: {text!r}"


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"specdec {version('specdec')}"

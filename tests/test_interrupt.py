"""Ctrl-C (SIGINT) stops ``specdec generate`` and ``specdec bench`` cleanly: no traceback, exit status 130, the
statistics so far; the bench writes its partial report and the same command resumes from the finished prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import tiny_llama

PROMPTS = [{"prompt": f"Count from {i} to {i + 40}, one number per line.", "category": c}
           for i, c in enumerate(["math", "chat", "code"])]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from specdec.app.loaders import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_interrupt")
    tokenizer = load_tokenizer(None)
    tiny_llama(vocab=len(tokenizer), layers=2, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _default_sigint() -> None:
    """A suite launched as a background job of a non-interactive shell inherits SIGINT ignored, and Python then
    never raises KeyboardInterrupt: the child gets the default disposition back, as an interactive run has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "specdec.app.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, preexec_fn=_default_sigint)


def _wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the process"
        time.sleep(0.05)


def test_ctrl_c_during_generate_prints_the_statistics_so_far(tiny_dir):
    proc = _start("generate", "hello", "--model", tiny_dir, "--no-chat", "--max-new-tokens", "900")
    assert proc.stdout.read(1)  # the first token is on screen: generation is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    [stats] = [line for line in text.splitlines() if line.startswith("[ngram] interrupted: ")]
    tokens = int(stats.split("interrupted: ")[1].split(" tokens")[0])
    assert 1 <= tokens < 900 and "tok/s" in stats and stats.endswith("stop: interrupted")


def test_ctrl_c_during_bench_writes_a_partial_report_and_the_rerun_resumes(tiny_dir, tmp_path, monkeypatch,
                                                                          capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "bench.json"
    journal = tmp_path / "bench.json.partial.jsonl"
    argv = ["bench", "--prompts", str(prompts), "--model", tiny_dir, "--max-new-tokens", "24", "--no-chat",
            "--drafter", "ngram", "--out", str(out)]
    proc = _start(*argv)
    _wait_for(lambda: journal.is_file() and len(journal.read_text().splitlines()) >= 2)  # header + 1 prompt
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert "run the same command again to resume" in stderr.decode()
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and 1 <= partial["n_done"] < len(PROMPTS)
    assert partial["n_total"] == len(PROMPTS) and "PARTIAL" in stdout.decode()
    assert all(r["n_prompts"] == partial["n_done"] for r in partial["runs"])

    from specdec.app import bench
    from specdec.app.cli import main

    baseline_runs = []
    real = bench.hf_generate

    def counting(*args, **kwargs):
        baseline_runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "hf_generate", counting)
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and all(r["n_prompts"] == len(PROMPTS) for r in report["runs"])
    assert all(r["identical_to_baseline"] == len(PROMPTS) for r in report["runs"])
    assert len(baseline_runs) == 1 + len(PROMPTS) - partial["n_done"]  # warm-up + only the unfinished prompts
    assert not journal.exists()
    capsys.readouterr()


def test_a_journal_of_other_settings_is_refused_naming_them(tmp_path):
    from specdec.app.journal import Journal

    path = tmp_path / "j.jsonl"
    Journal(path, {"max_new_tokens": 8, "methods": ["ngram"]}).record(0, {"baseline": []})
    assert set(Journal(path, {"max_new_tokens": 8, "methods": ["ngram"]}).done) == {0}
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens\): rerun with the same settings"):
        Journal(path, {"max_new_tokens": 16, "methods": ["ngram"]})
    with Path(path).open("a") as f:
        f.write('{"prompt_index": 1, "baseli')  # a line cut by a crash: that prompt runs again
    assert set(Journal(path, {"max_new_tokens": 8, "methods": ["ngram"]}).done) == {0}

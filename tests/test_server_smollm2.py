"""The one slow server test: ``experiments/load_test.py --start-server`` starts a real ``specdec serve`` process
with the embedded SmolLM2 on a free loopback port, runs streamed requests with drafters none and n-gram at
concurrency 2, and stops the server by its pid with SIGTERM: no errors, no leaked blocks, a clean exit."""

from __future__ import annotations

import json
import signal

import pytest

from .test_server_load import load_test_module


@pytest.mark.slow
def test_load_test_starts_smollm2_serves_both_drafters_and_stops_it_cleanly(tmp_path):
    out = tmp_path / "load.json"
    argv = ["--start-server", "--server-args", "--num-blocks 128 --max-batch 4", "--requests", "4",
            "--concurrency", "2", "--drafter", "none", "ngram", "--max-tokens", "16", "--timeout", "240",
            "--run-timeout", "600", "--start-timeout", "300", "--out", str(out)]
    assert load_test_module().main(argv) == 0
    report = json.loads(out.read_text())
    assert report["server_exit_status"] in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutdown
    runs = {r["drafter"]: r for r in report["runs"]}
    assert set(runs) == {"none", "ngram"}
    for run in runs.values():
        assert run["errors"] == 0 and run["leaked_blocks"] == 0 and run["completion_tokens"] > 0
    assert runs["none"]["tau"] == 1.0 and runs["ngram"]["tau"] >= 1.0

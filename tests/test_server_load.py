"""``experiments/load_test.py`` against an in-process server (tiny model): every documented field, zero errors,
zero leaked blocks, tau 1 for ``none``; it refuses non-loopback URLs. The ``--start-server`` path (a real
``specdec serve`` process stopped by SIGTERM) runs in the slow SmolLM2 test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .test_server import start_server, tiny_parts  # noqa: F401 - fixtures

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "load_test.py"
FIELDS = {"concurrency", "drafter", "requests", "errors", "error_messages", "completion_tokens", "wall_s",
          "throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms",
          "tpot_p99_ms", "tau", "tree_nodes_per_step", "leaked_blocks"}


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_test_reports_throughput_latencies_and_tau_per_drafter(start_server, tmp_path, capsys):  # noqa: F811
    served = start_server()
    out = tmp_path / "load.json"
    argv = ["--url", served.url, "--requests", "6", "--concurrency", "1", "3", "--drafter", "none", "ngram",
            "--max-tokens", "12", "--timeout", "60", "--run-timeout", "120", "--out", str(out)]
    assert load_test_module().main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["concurrency"], r["drafter"]) for r in report["runs"]] == [(1, "none"), (1, "ngram"), (3, "none"),
                                                                          (3, "ngram")]
    for run in report["runs"]:
        assert set(run) == FIELDS
        assert run["errors"] == 0 and run["leaked_blocks"] == 0 and run["requests"] == 6
        assert run["completion_tokens"] == 6 * 12 and run["throughput_tok_s"] > 0
        assert 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"] and run["itl_p50_ms"] <= run["itl_p99_ms"]
        assert run["tau"] >= 1.0
    none = [r for r in report["runs"] if r["drafter"] == "none"]
    assert [r["tau"] for r in none] == [1.0, 1.0] and [r["tree_nodes_per_step"] for r in none] == [1.0, 1.0]
    assert "throughput_tok_s" in capsys.readouterr().out
    served.stop()


def test_load_test_refuses_a_non_loopback_url():
    with pytest.raises(SystemExit) as err:
        load_test_module().main(["--url", "http://10.1.2.3:8000"])
    assert err.value.code == 2


def test_percentiles_are_nearest_rank():
    percentile = load_test_module().percentile
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile([], 50) is None

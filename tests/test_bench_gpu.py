"""experiments/bench_gpu.py: the CPU smoke run covers every section, and the script never imports packages the
device image lacks (gguf, wandb, datasets, fastapi)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_gpu.py"
ABSENT_ON_DEVICE = ("gguf", "wandb", "datasets", "fastapi")

# Runs the script as __main__ as on the device: the absent packages blocked (importing one raises ImportError)
# and specdec NOT installed (the editable-install finder removed), so the script must find its source tree.
LAUNCHER = f"""
import runpy, sys
for name in {ABSENT_ON_DEVICE!r}:
    sys.modules[name] = None
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
try:
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
finally:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT_ON_DEVICE!r} and sys.modules[m] is not None)
    assert not leaked, f"imported {{leaked}}"
"""


def test_bench_gpu_smoke_runs_every_section_without_packages_absent_on_the_device(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, "--smoke", "--out", str(out),
                           "--profile", str(tmp_path / "profile.txt")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"kernels", "verify", "e2e", "drafters"} <= set(res)
    assert not res["errors"] and not res["skipped"], res["errors"]
    grid = res["kernels"]["grid"]
    assert res["kernels"]["correctness"] and all(c["ok"] for c in res["kernels"]["correctness"])
    assert {(r["n"], r["num_splits"]) for r in grid} == {(1, 2), (4, 2)}
    assert all(r["split_vs_unsplit_max_err"] < 1e-5 for r in grid)
    assert all(r["unsplit_ms"] > 0 and r["gbps"] > 0 and r["tflops"] > 0 for r in grid)
    assert [r["n"] for r in res["verify"]] == [1, 4] and all(r["hf_static_ms"] > 0 for r in res["verify"])
    e2e = {r["name"]: r for r in res["e2e"]}
    runs = {"specdec_ar", "oracle_chain4", "oracle_chain8"}
    assert set(e2e) == {"hf_static_compile"} | runs | {f"{r}_compiled" for r in runs}
    assert e2e["oracle_chain4"]["identical_to_ar"] and e2e["oracle_chain4"]["tau"] > 2, e2e["oracle_chain4"]
    assert all(e2e[f"{r}_compiled"]["identical_to_ar"] for r in runs)
    assert all(r["compiled_ms"] > 0 for r in res["verify"])  # smoke buckets 1 and 4 = its tree sizes
    stats = res["compile_stats"]
    assert stats["compiled_steps"] > 0 and stats["eager_steps"] > 0  # prefill chunks run eagerly
    assert stats["graph_mode"] == "manual" and stats["step_graphs"] > 0 and stats["capture_error"] is None
    assert all(r["blocks_freed"] for r in res["e2e"][1:])
    assert all(r["identical_to_hf"] for r in res["e2e"])  # the peaked model has no near-ties
    new = res["args"]["new"]  # the first token comes from the prefill; then every oracle token is accepted:
    for depth in (4, 8):
        assert e2e[f"oracle_chain{depth}"]["steps"] == e2e[f"oracle_chain{depth}_compiled"]["steps"] \
            == -(-(new - 1) // (depth + 1))
    assert "greedy_accept_batch" in (tmp_path / "profile.txt").read_text()
    drafters = res["drafters"]
    assert len(drafters) == 20 and {r["temperature"] for r in drafters} == {0.0, 0.8}
    bad = [r for r in drafters if not (r["ok"] and r["blocks_freed"] and r["identical_to_ar"] is not False)]
    assert not bad, bad


def test_oracle_chain_drafter_proposes_the_known_continuation():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_engine_bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from specdec.interfaces import DraftInput

    oracle = gpu_engine_bench.OracleChain(torch.tensor([5, 6, 7, 8, 9, 10]), depth=3)
    drafts = oracle.propose([DraftInput(0, torch.tensor([5, 6])), DraftInput(1, torch.tensor([5, 6, 7, 8, 9]))])
    assert drafts[0].tree.tokens.tolist() == [6, 7, 8, 9] and drafts[0].tree.parents.tolist() == [-1, 0, 1, 2]
    assert drafts[1].tree.tokens.tolist() == [9, 10]  # the continuation ends: a shorter chain


def test_the_scripts_source_tree_map_is_pyprojects_package_dir():
    import importlib.util

    import tomllib

    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with (ROOT / "pyproject.toml").open("rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    assert package_dir == {"specdec": "specdec", **module.PACKAGE_DIRS}

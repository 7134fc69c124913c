"""``--tree-budget auto [--cost-model PATH]`` in ``specdec generate`` / ``bench`` and ``specdec calibrate``: bad
input is one line before the model loads, and the drafters really run under the budget chooser (greedy output
unchanged)."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.app import loaders
from specdec.app.args import AUTO_MAX_BUDGET, spec_defaults
from specdec.app.cli import build_parser, main
from specdec.app.experiment import Grid
from specdec.research.cost_model import CostModel

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
MAKE = "make one: specdec calibrate --out cost.json, or pass --cost-model auto"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_budget")
    CostModel((1e-3, 0.0, 0.0, 0.0)).save(root / "free.json")  # nodes cost nothing: keep every drafted node
    CostModel((1e-3, 1.0, 0.0, 0.0)).save(root / "dear.json")  # a node costs 1000 forwards: the root alone
    (root / "notcost.json").write_text(json.dumps({"verify_coef": [1, 2]}))
    (root / "broken.json").write_text("{oops")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "Say hi", "category": "chat"}) + "\n")
    tiny = root / "tiny"
    tokenizer = loaders.load_tokenizer(None)
    tiny_llama(vocab=len(tokenizer), layers=1, dtype=torch.float32).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    names = ("free.json", "dear.json", "notcost.json", "broken.json", "prompts.jsonl", "tiny")
    return {name.partition(".")[0]: str(root / name) for name in names}


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    for name in ("load_model_and_tokenizer", "load_model", "load_target"):
        monkeypatch.setattr(loaders, name, refuse)


BAD = [
    (["generate", "hi", "--tree-budget", "auto", "--cost-model", "/nonexistent.json"],
     f"--cost-model /nonexistent.json: file not found ({MAKE})"),
    (["bench", "--tree-budget", "auto", "--cost-model", "{broken}"], "broken.json: not a readable JSON file"),
    (["generate", "hi", "--tree-budget", "auto", "--cost-model", "{notcost}"],
     "notcost.json: not a cost model (needs verify_coef: 4 numbers"),
    (["generate", "hi", "--cost-model", "{free}"], "--cost-model is only used with --tree-budget auto"),
    (["bench", "--cost-model", "auto"], "--cost-model is only used with --tree-budget auto"),
    (["calibrate", "--out", "x.json", "--sizes", "4"], "needs at least two --sizes and two --contexts"),
    (["calibrate", "--out", "x.json", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["calibrate", "--out", "x.json", "--prefill", "64"], r"--prefill needs at least two prompt lengths >= 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a)[:50] for a, _ in BAD])
def test_bad_auto_budget_input_is_one_line_naming_the_flag_before_the_model_loads(argv, message, files,
                                                                                 no_model_load, capsys):
    argv = [a.format(**files) if "{" in a else a for a in argv]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: ") and message in lines[0], lines


def test_a_non_integer_budget_other_than_auto_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--tree-budget", "big"])
    assert "expected an integer or 'auto', got 'big'" in capsys.readouterr().err


def test_auto_builds_drafters_at_the_largest_budget_and_the_bench_grid_names_them_auto(files):
    args = build_parser().parse_args(["bench", "--tree-budget", "auto", "--cost-model", files["free"]])
    assert spec_defaults(args)["budget"] == AUTO_MAX_BUDGET
    grid = Grid(drafters=("ngram", "ngram:budget=8", "none"), spec_defaults=spec_defaults(args),
                cost_model=files["free"])
    methods = grid.methods()
    assert list(methods) == ["ngram+auto", "ngram:budget=8+auto", "none"]  # a spec's own budget wins
    assert methods["ngram+auto"].options["budget"] == AUTO_MAX_BUDGET and methods["ngram:budget=8+auto"].options[
        "budget"] == 8
    assert grid.settings(0.0).cost_model == files["free"]
    assert "cost_model" not in Grid().settings(0.0).journal_key([], [])  # old journals still resume


def _generate(files, capsys, *extra):
    argv = ["generate", "Repeat: one two three one two three one two three", "--model", files["tiny"], "--json",
            "--max-new-tokens", "12", "--num-blocks", "64", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("cost", "sizes"), [("free", "kept"), ("dear", "root")])
def test_generate_with_auto_budget_sizes_trees_by_cost_and_keeps_the_greedy_output(files, capsys, cost, sizes):
    plain = _generate(files, capsys, "--drafter", "none")
    # the self drafter running all (one) layers of the tiny target drafts its greedy continuation
    auto = _generate(files, capsys, "--drafter", "self:layers=1,tree=chain,depth=4", "--tree-budget", "auto",
                     "--cost-model", files[cost])
    assert auto["tokens"] == plain["tokens"]
    chosen = auto["auto_tree_sizes"]
    assert len(chosen) == auto["stats"]["steps"]
    if sizes == "root":
        assert set(chosen) == {1} and auto["stats"]["tau"] == 1.0
    else:
        assert set(chosen) == {5} and auto["stats"]["tau"] > 3  # every drafted node kept, and accepted


def test_auto_budget_without_a_cost_file_times_this_machine_once_and_keeps_the_greedy_output(files, capsys,
                                                                                            tmp_path, monkeypatch):
    """No ``--cost-model`` (or ``auto``): the chooser uses this machine's step cost of the model, measured on first
    use into the model cache and read back after."""
    from specdec.research.machine_cost import FILE_NAME

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    plain = _generate(files, capsys, "--drafter", "none")
    spec = ["--drafter", "self:layers=1,tree=chain,depth=4", "--tree-budget", "auto"]
    first = _generate(files, capsys, *spec)
    kept = (tmp_path / FILE_NAME).read_text()
    assert len(json.loads(kept)) == 1  # one model on this machine
    again = _generate(files, capsys, *spec, "--cost-model", "auto")
    assert (tmp_path / FILE_NAME).read_text() == kept  # read back, not measured again
    assert first["tokens"] == plain["tokens"] == again["tokens"]
    assert len(first["auto_tree_sizes"]) == first["stats"]["steps"]


def test_bench_with_auto_budget_reports_auto_methods_identical_to_the_baseline(files, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--model", files["tiny"], "--prompts", files["prompts"], "--drafter", "ngram",
                 "--tree-budget", "auto", "--cost-model", files["free"], "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"specdec_ar", "ngram+auto"}
    assert runs["ngram+auto"]["identical_to_baseline"] == 1


def test_a_grid_cost_model_returns_the_measured_times_monotone_in_size_and_interpolates_between(tmp_path):
    """A cheap lone root (as on CPU) and a dear point at n = 8 (measured above n = 16): the grid model keeps the
    root's own time, lowers the n = 8 point to the n = 16 time (timings are minima: a busy machine only adds),
    interpolates between sizes and contexts, and extends past the grid with the fit's slopes; the fit alone would
    overestimate the root."""
    grid = [(1, 64, 0.05), (8, 64, 0.13), (16, 64, 0.12), (32, 64, 0.15),
            (1, 512, 0.07), (8, 512, 0.15), (16, 512, 0.16), (32, 512, 0.19)]
    from specdec.research.cost_model import fit_verify

    cost = CostModel(fit_verify(grid), grid=grid, from_grid=True)
    assert cost.verify_time(1, 64) == pytest.approx(0.05)
    assert cost.verify_time(8, 64) == pytest.approx(0.12)  # lowered to n = 16's time
    assert cost.verify_time(4, 64) == pytest.approx(0.05 + 3 / 7 * 0.07)
    assert cost.verify_time(1, 288) == pytest.approx(0.06)
    assert cost.verify_time(64, 64) > cost.verify_time(32, 64) and cost.verify_time(1, 1024) > 0.07
    fit = CostModel(fit_verify(grid), grid=grid)
    assert fit.verify_time(1, 64) > 0.06  # the linear fit's root is too dear
    cost.save(tmp_path / "g.json")
    assert CostModel.load(tmp_path / "g.json").verify_time(8, 64) == pytest.approx(0.12)

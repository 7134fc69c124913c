"""This machine's step cost, measured once per model and kept in the cache (``hybrid:steps=auto``)."""

from __future__ import annotations

import json

import pytest

from specdec.drafters import DrafterSpec, build_drafter
from specdec.research import cost_measure, machine_cost
from specdec.research.machine_cost import FILE_NAME, machine_cost_model, model_key
from specdec.target import TargetModel
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_step_grid_is_measured_once_kept_in_the_cache_and_read_back_without_measuring(tiny_target, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    calls = []
    measure = cost_measure.measure_step

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return measure(*args, **kwargs)

    monkeypatch.setattr(cost_measure, "measure_step", counted)
    first = machine_cost_model(tiny_target)
    assert len(calls) == 1 and calls[0][:2] == (machine_cost.SIZES, machine_cost.contexts(tiny_target))
    saved = json.loads((tmp_path / FILE_NAME).read_text())
    assert list(saved) == [model_key(tiny_target)]
    assert {(n, c) for n, c, _ in saved[model_key(tiny_target)]["grid"]} == {
        (n, c) for c in machine_cost.contexts(tiny_target) for n in machine_cost.SIZES}
    again = machine_cost_model(tiny_target)
    assert len(calls) == 1  # read back, not measured
    assert again.grid == first.grid and again.from_grid
    assert again.relative_step(1, 64) == pytest.approx(1.0)
    assert all(again.relative_step(n + 1, 64) >= again.relative_step(n, 64) for n in range(1, 16))


def test_another_model_shape_has_its_own_entry_and_an_unwritable_cache_is_skipped(tiny_target, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    machine_cost_model(tiny_target)
    other = TargetModel(tiny_llama(layers=3))
    assert model_key(other) != model_key(tiny_target)
    assert machine_cost_model(other, measure=False) is None  # nothing kept for it yet
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SPECDEC_CACHE", str(blocked))  # the cache folder cannot be made: measured, not kept
    assert machine_cost_model(other).grid and machine_cost_model(other, measure=False) is None


def test_the_hybrid_with_steps_auto_sizes_by_the_machines_measured_step_cost(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    hybrid = build_drafter(DrafterSpec.parse("hybrid:model=medusa,steps=auto"), tiny_target)
    cached = machine_cost_model(tiny_target, measure=False)
    assert cached is not None and hybrid.step_cost(6, 100) == pytest.approx(cached.relative_step(6, 100))

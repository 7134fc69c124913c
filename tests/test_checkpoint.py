"""Drafter checkpoints: the stored kind is checked, broken folders are one clear ValueError naming the file, and
shipped artifacts carry no build-machine paths."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from specdec.checkpoint import export_checkpoint, read_checkpoint, save_checkpoint
from specdec.drafters.medusa import MedusaConfig


def _medusa_checkpoint(path: Path) -> Path:
    config = MedusaConfig(hidden_size=8, vocab_size=16, num_heads=2)
    save_checkpoint(torch.nn.Linear(2, 2), config, path, kind="medusa")
    return path


def test_the_kind_is_stored_and_another_kind_is_refused(tmp_path):
    path = _medusa_checkpoint(tmp_path / "heads")
    assert json.loads((path / "config.json").read_text())["kind"] == "medusa"
    config, state = read_checkpoint(path, kind="medusa")
    assert "kind" not in config and config["num_heads"] == 2 and set(state) == {"weight", "bias"}
    with pytest.raises(ValueError, match=r"is a medusa checkpoint, not a eagle one: use medusa:path="):
        read_checkpoint(path, kind="eagle")


def test_a_checkpoint_without_a_stored_kind_still_loads(tmp_path):
    path = _medusa_checkpoint(tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["kind"]
    (path / "config.json").write_text(json.dumps(config))
    assert read_checkpoint(path, kind="eagle")[0]["num_heads"] == 2


def test_a_missing_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=r"drafter checkpoint .*nonexistent does not exist"):
        read_checkpoint(tmp_path / "nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs config.json and model.safetensors"):
        read_checkpoint(tmp_path / "empty")


def test_a_corrupt_weights_file_is_named(tmp_path):
    path = _medusa_checkpoint(tmp_path / "heads")
    (path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"corrupt drafter checkpoint: .*model\.safetensors is not a readable"):
        read_checkpoint(path)


def test_a_config_that_is_not_json_is_named(tmp_path):
    path = _medusa_checkpoint(tmp_path / "heads")
    (path / "config.json").write_text("{hidden_size: 8")
    with pytest.raises(ValueError, match=r"heads/config\.json is not valid JSON"):
        read_checkpoint(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        read_checkpoint(path)


def test_saved_and_exported_configs_drop_local_paths_and_keep_the_kind(tmp_path):
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class WithPath:
        layer_config: dict = field(default_factory=lambda: {"_name_or_path": "/home/me/model", "hidden_size": 4})

    save_checkpoint(torch.nn.Linear(2, 2), WithPath(), tmp_path / "a", kind="eagle")
    export_checkpoint(tmp_path / "a", tmp_path / "b")
    for folder in ("a", "b"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config == {"kind": "eagle", "layer_config": {"_name_or_path": "", "hidden_size": 4}}
    assert read_checkpoint(tmp_path / "b")[1]["weight"].dtype == torch.float16


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_shipped_configs_carry_no_local_paths_and_declare_their_kind():
    weights = Path(str(resources.files("specdec") / "weights"))
    configs = sorted(weights.glob("*/*/config.json"))
    assert len(configs) >= 2
    for path in configs:
        config = json.loads(path.read_text())
        assert config["kind"] == path.parent.name
        for text in _strings(config):
            assert not text.startswith(("/", "~")) and ":\\" not in text and "/work/" not in text, (path, text)

"""Draft-LM distillation: losses by hand, an independent truncated copy, forward-KL / TV / on-policy training
raises tau, checkpoints load as draft models, resume, tokenizer-mismatch error, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.drafters import DrafterSpec, build_drafter
from specdec.target import TargetModel
from specdec.train import data as D
from specdec.train.__main__ import main as train_main
from specdec.train.draft_lm import DraftTrainConfig, divergence, train_draft_lm, truncated_copy
from specdec.train.evaluation import EvalConfig
from specdec.train.loop import LoopConfig, read_metrics
from tests.conftest import tiny_llama
from tests.test_train_data import char_tokenizer
from tests.test_train_medusa import PROMPTS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), dtype=torch.float32)
    data = D.generate_distillation_data(model, tokenizer, PROMPTS, D.DataConfig(
        max_new_tokens=24, batch_size=10, store_hidden=True, out_dir=str(tmp_path_factory.mktemp("draft_data"))))
    return model, tokenizer, data


def cfg(data, out, steps=12, eval_every=12, save_every=0, resume=False, **kw) -> DraftTrainConfig:
    loop = LoopConfig(out_dir=str(out), steps=steps, lr=3e-3, eval_every=eval_every, save_every=save_every,
                      eval_max_new_tokens=16, wandb=False, resume=resume)
    base = {"layers": 1, "batch_size": 4, "evaluation": EvalConfig(tree="chain", depth=3, holdout=2),
            "on_policy_tokens": 8}
    return DraftTrainConfig(data_dir=str(data), loop=loop, **{**base, **kw})


def test_divergences_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0]]).log()
    q = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert divergence(q, p, "tv").item() == pytest.approx(0.5)
    assert divergence(q, p, "forward_kl").item() == pytest.approx(np.log(2))
    assert divergence(p, p, "forward_kl").item() == pytest.approx(0.0, abs=1e-7)


def test_truncated_copy_is_independent(setup):
    model = setup[0]
    draft = truncated_copy(model, 1)
    assert draft.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    assert len(draft.get_decoder().layers) == 1
    first = next(draft.get_decoder().layers[0].parameters())
    assert first.data_ptr() != next(model.get_decoder().layers[0].parameters()).data_ptr()
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(model.get_decoder().layers[0].parameters()))


@pytest.mark.parametrize("kw", [{"loss": "forward_kl"}, {"loss": "tv"},
                                {"on_policy": 1.0, "on_policy_tokens": 24, "steps": 24, "eval_every": 24}])
def test_training_raises_tau(setup, tmp_path, kw):
    model, tokenizer, data = setup
    final = train_draft_lm(model, tokenizer, cfg(data, tmp_path, **kw))
    records = read_metrics(tmp_path)
    assert records[-1]["eval/tau"] > records[0]["eval/tau"] + 0.3, (records[0]["eval/tau"], records[-1]["eval/tau"])
    assert records[-1]["train/tv"] < records[1]["train/tv"]
    assert all(r["train/on_policy"] == kw.get("on_policy", 0.0) for r in records[1:])
    target = TargetModel(model)  # the checkpoint is a plain HF folder: the draft-model drafter loads it
    drafter = build_drafter(DrafterSpec.parse(f"draft-model:path={final},depth=3"), target)
    assert drafter.model.model.config.num_hidden_layers == 1


def test_resume_and_errors(setup, tmp_path):
    model, tokenizer, data = setup
    common = {"steps": 4, "save_every": 2, "eval_every": 0}
    train_draft_lm(model, tokenizer, cfg(data, tmp_path / "full", **common))
    part = tmp_path / "part"
    train_draft_lm(model, tokenizer, cfg(data, part, **common))
    (part / "step_4" / "trainer_state.pt").unlink()  # as if the run had died after the step-2 checkpoint
    lines = (part / "metrics.jsonl").read_text().splitlines()[:2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train_draft_lm(model, tokenizer, cfg(data, part, **common, resume=True))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(part)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["train/loss"] for r in resumed[2:]], [r["train/loss"] for r in full[2:]],
                               rtol=1e-5)
    other = tiny_llama(vocab=50)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        train_draft_lm(model, tokenizer, cfg(data, tmp_path / "x", draft=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="unknown loss"):
        cfg(data, tmp_path, loss="reverse")


def test_cli_draft(setup, tmp_path):
    model, tokenizer, data = setup
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["draft", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "1", "--batch-size", "2",
            "--layers", "1", "--eval-every", "0", "--no-wandb", "--model", str(tmp_path / "model")]
    assert train_main(argv) == 0
    assert (tmp_path / "out" / "step_1" / "config.json").is_file()
    assert train_main([*argv[:-2], "--on-policy", "2", "--model", str(tmp_path / "model")]) == 2

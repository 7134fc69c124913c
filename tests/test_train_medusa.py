"""Medusa trainer: learns (loss down, real-verifier tau up), exact resume, offline W&B files, features, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specdec.app.tracking import read_offline_run
from specdec.drafters.medusa import MedusaDrafter
from specdec.target import TargetModel
from specdec.train import data as D
from specdec.train import medusa as M
from specdec.train.__main__ import main as train_main
from specdec.train.evaluation import EvalConfig
from specdec.train.loop import LoopConfig, batch_indices, example_features, latest_checkpoint, read_metrics
from specdec.train.medusa import MedusaTrainConfig, train_medusa
from tests.conftest import crash_on_call, tiny_llama
from tests.test_train_data import char_tokenizer

WORDS = ["sea", "sky", "cat", "dog", "tree", "sun", "moon", "star", "rain", "wind"]
PROMPTS = [f"prompt {i} about the {w}" for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, data dir with hidden states, data dir without): 10 greedy 24-token answers of a tiny
    random Llama (its greedy outputs fall into short loops, so future tokens are learnable)."""
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), dtype=torch.float32)
    root = tmp_path_factory.mktemp("medusa_data")
    dirs = [D.generate_distillation_data(model, tokenizer, PROMPTS, D.DataConfig(
        max_new_tokens=24, batch_size=10, store_hidden=hidden, out_dir=str(root / f"hidden{int(hidden)}")))
        for hidden in (True, False)]
    return model, tokenizer, *dirs


LOOP_KEYS = ("steps", "lr", "eval_every", "save_every", "wandb", "resume")


def cfg(data, out, **kw) -> MedusaTrainConfig:
    loop = {"lr": 3e-3, "eval_max_new_tokens": 16, "wandb": False, **{k: kw.pop(k) for k in LOOP_KEYS if k in kw}}
    base = {"data_dir": str(data), "batch_size": 4, "evaluation": EvalConfig(holdout=2)}
    return MedusaTrainConfig(loop=LoopConfig(out_dir=str(out), **loop), **{**base, **kw})


def test_training_lowers_loss_and_raises_tau(setup, tmp_path):
    model, tokenizer, data, _ = setup
    final = train_medusa(model, tokenizer, cfg(data, tmp_path, steps=16, eval_every=16))
    records = read_metrics(tmp_path)
    tau_before, tau_after = records[0]["eval/tau"], records[-1]["eval/tau"]
    loss_before, loss_after = records[1]["train/loss"], records[-1]["train/loss"]
    assert loss_after < 0.85 * loss_before
    assert tau_after > tau_before + 0.5, (tau_before, tau_after)
    assert records[-1]["train/acc_head1"] > records[1]["train/acc_head1"]
    assert final == tmp_path / "step_16" and latest_checkpoint(tmp_path) == final
    # the saved heads load into the inference drafter
    drafter = MedusaDrafter.from_pretrained(final, TargetModel(model))
    assert drafter.heads.config.num_heads == 3


def test_resume_continues_with_the_same_losses(setup, tmp_path, monkeypatch):
    model, tokenizer, _, data = setup  # no stored hidden states: target forward, with KD
    common = {"steps": 4, "save_every": 2, "eval_every": 0, "kd_weight": 0.5, "seq_len": 12, "batch_size": 2}
    train_medusa(model, tokenizer, cfg(data, tmp_path / "full", **common))
    full = read_metrics(tmp_path / "full")
    real_loss = M.medusa_loss
    monkeypatch.setattr(M, "medusa_loss", crash_on_call(real_loss, 3))  # dies after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_medusa(model, tokenizer, cfg(data, tmp_path / "part", **common))
    monkeypatch.setattr(M, "medusa_loss", real_loss)
    assert latest_checkpoint(tmp_path / "part") == tmp_path / "part" / "step_2"
    train_medusa(model, tokenizer, cfg(data, tmp_path / "part", **common, resume=True))
    part = read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    assert all("train/kl_head1" in r for r in part)
    for key in ("train/loss", "train/kl_head3", "train/acc_head2", "train/lr"):
        np.testing.assert_allclose([r[key] for r in part[2:]], [r[key] for r in full[2:]], rtol=1e-6)
    state = torch.load(tmp_path / "part" / "step_2" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"]


def test_wandb_offline_files_hold_tau(setup, tmp_path, monkeypatch):
    model, tokenizer, data, _ = setup
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_medusa(model, tokenizer, cfg(data, tmp_path, steps=1, eval_every=1, wandb=True))
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)  # offline runs keep everything in run-*.wandb (no wandb-summary.json)
    records = read_metrics(tmp_path)
    assert [h["eval/tau"] for h in logged["history"] if "eval/tau" in h] == pytest.approx(
        [r["eval/tau"] for r in records if "eval/tau" in r])
    summary = logged["summary"]
    assert summary["eval/tau"] == pytest.approx(records[-1]["eval/tau"]) == summary["final/tau"]
    assert summary["train/loss"] == pytest.approx(records[-1]["train/loss"])
    last = records[-1]
    depths = range(1, 1 + sum(k.startswith("eval/acceptance_depth") for k in last))
    assert summary["final/acceptance_by_depth/nrows"] == len(depths) >= 1
    [table] = (run_dir / "files" / "media" / "table").rglob("*.table.json")
    assert json.loads(table.read_text())["data"] == [[d, pytest.approx(last[f"eval/acceptance_depth{d}"])]
                                                     for d in depths]
    assert "git_sha" in logged["config"] and logged["config"]["loop"]["steps"] == 1


def test_stored_hidden_matches_target_forward(setup):
    model, _, with_hidden, without = setup
    a = D.load_distillation_data(with_hidden).with_format("numpy", dtype=None)[0]
    b = D.load_distillation_data(without).with_format("numpy", dtype=None)[0]
    ha, ra, la = example_features(model, a, 10, need_logits=True)
    hb, rb, lb = example_features(model, b, 10, need_logits=True)
    assert ha.shape == (10, 32) and la.shape == (10, model.config.vocab_size)
    assert torch.equal(ra, rb)
    torch.testing.assert_close(ha, hb, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(la, lb, atol=2e-2, rtol=2e-2)
    assert torch.equal(la.argmax(-1), ra)  # greedy data: the target's own top-1 is the response token


def test_batch_indices_cover_each_epoch():
    steps = [batch_indices(s, 3, 7, seed=1) for s in range(7)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert batch_indices(4, 3, 7, seed=1) == steps[4] and batch_indices(4, 3, 7, seed=2) != steps[4]


def test_cli_medusa(setup, tmp_path, capsys):
    model, tokenizer, data, _ = setup
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["medusa", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--heads", "2",
            "--batch-size", "2", "--eval-every", "0", "--no-wandb", "--model", str(tmp_path / "model")]
    assert train_main(argv) == 0
    assert (tmp_path / "out" / "step_2" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "wandb").exists()
    assert train_main(["medusa", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--no-wandb",
                       "--model", str(tmp_path / "model")]) == 2
    assert "no distillation data" in capsys.readouterr().err

"""EAGLE trainer: the unrolled passes compute exactly what the drafter computes at depth s, training raises tau,
checkpoints load into the drafter, exact resume, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.target import TargetModel
from specdec.train import data as D
from specdec.train import eagle as E
from specdec.train.__main__ import main as train_main
from specdec.train.eagle import (
    UNROLL_ATTENTION,
    EagleTrainConfig,
    PairBatch,
    UnrollKV,
    train_eagle,
    unroll_mask,
)
from specdec.train.evaluation import EvalConfig
from specdec.train.loop import LoopConfig, read_metrics
from tests.conftest import crash_on_call, tiny_llama
from tests.test_train_data import char_tokenizer
from tests.test_train_medusa import PROMPTS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), dtype=torch.float32)
    data = D.generate_distillation_data(model, tokenizer, PROMPTS, D.DataConfig(
        max_new_tokens=24, batch_size=10, store_hidden=True, out_dir=str(tmp_path_factory.mktemp("eagle_data"))))
    return model, tokenizer, data


def cfg(data, out, steps=16, eval_every=16, save_every=0, resume=False, **kw) -> EagleTrainConfig:
    loop = LoopConfig(out_dir=str(out), steps=steps, lr=3e-3, eval_every=eval_every, save_every=save_every,
                      eval_max_new_tokens=16, wandb=False, resume=resume)
    base = {"batch_size": 4, "evaluation": EvalConfig(depth=4, budget=8, topk=2, holdout=2)}
    return EagleTrainConfig(data_dir=str(data), loop=loop, **{**base, **kw})


def test_unroll_mask_by_hand():
    lengths = torch.tensor([4])
    assert unroll_mask(lengths, 4, 1)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                                               [1, 1, 1, 1]]
    two = unroll_mask(lengths, 4, 2)[0, 0].int()
    # pass 2, query i: real keys j <= i - 1, its own pass-2 key i
    assert two[:, :4].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert two[:, 4:].tolist() == torch.eye(4, dtype=torch.int).tolist()
    three = unroll_mask(torch.tensor([3]), 4, 3)[0, 0].int()
    assert three[3, :4].tolist() == [1, 1, 0, 0]  # padding beyond length 3 is never a real key anyway
    assert three[3, 4:8].tolist() == [0, 0, 1, 0] and three[3, 8:].tolist() == [0, 0, 0, 1]


def _reference(head: EagleHead, feats, tokens, positions, i: int, s: int, preds: list[torch.Tensor]) -> torch.Tensor:
    """What the drafter computes for the depth-``s`` node whose root is pair ``i - s + 1``: plain causal attention
    over the real pairs up to the root, then the draft nodes fed with their parent's predicted feature."""
    root = i - s + 1
    f = [feats[j] for j in range(root + 1)] + [preds[k - 1][root + k - 1] for k in range(1, s)]
    seq_f = torch.stack(f)[None]
    seq_t, seq_p = tokens[: i + 1][None], positions[: i + 1][None]
    return head.forward_with(seq_f, seq_t, seq_p, "sdpa")[0, -1]


def test_unrolled_passes_equal_the_inference_computation():
    target = TargetModel(tiny_llama(seed=4, dtype=torch.float64))
    head = EagleHead(EagleConfig.from_target(target), target)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 5])
    feats = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 7), generator=gen)
    positions = torch.arange(7)[None] + torch.tensor([[3], [9]])
    state, inputs, outs = UnrollKV(lengths), feats, []
    with torch.no_grad():
        for _ in range(3):
            out = head.forward_with(inputs, tokens, positions, UNROLL_ATTENTION, eagle_unroll=state)
            outs.append(out)
            inputs = torch.cat([out[:, :1] * 0, out[:, :-1]], dim=1)
        for b in range(2):
            preds = [o[b] for o in outs]
            for s in range(1, 4):
                for i in range(s - 1, int(lengths[b])):
                    ref = _reference(head, feats[b], tokens[b], positions[b], i, s, preds)
                    torch.testing.assert_close(outs[s - 1][b, i], ref, rtol=1e-9, atol=1e-9)


def test_training_raises_tau_and_checkpoints_load(setup, tmp_path):
    model, tokenizer, data = setup
    final = train_eagle(model, tokenizer, cfg(data, tmp_path, steps=30, eval_every=30, draft_vocab_size=40))
    records = read_metrics(tmp_path)
    tau_before, tau_after = records[0]["eval/tau"], records[-1]["eval/tau"]
    assert records[-1]["train/loss"] < 0.7 * records[1]["train/loss"]
    assert tau_after > tau_before + 0.5, (tau_before, tau_after)
    assert records[-1]["train/acc_step2"] > records[1]["train/acc_step2"]
    drafter = EagleDrafter.from_pretrained(final, TargetModel(model), tree="chain", depth=3)
    assert drafter.head.vocab_ids.numel() <= 40 + 1


def test_resume_continues_with_the_same_losses(setup, tmp_path, monkeypatch):
    model, tokenizer, data = setup
    common = {"steps": 4, "save_every": 2, "eval_every": 0, "unroll": 2}
    train_eagle(model, tokenizer, cfg(data, tmp_path / "full", **common))
    real_loss = E.eagle_loss
    monkeypatch.setattr(E, "eagle_loss", crash_on_call(real_loss, 3))  # dies after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_eagle(model, tokenizer, cfg(data, tmp_path / "part", **common))
    monkeypatch.setattr(E, "eagle_loss", real_loss)
    train_eagle(model, tokenizer, cfg(data, tmp_path / "part", **common, resume=True))
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    for key in ("train/loss", "train/reg_step2", "train/acc_step1"):  # noise too: the RNG state is restored
        np.testing.assert_allclose([r[key] for r in part[2:]], [r[key] for r in full[2:]], rtol=1e-6)


def test_pair_batch_shapes(setup):
    from specdec.train.eagle import pair_batch

    model, _, data = setup
    rows = D.load_distillation_data(data).with_format("numpy", dtype=None)
    batch: PairBatch = pair_batch(model, [rows[0], rows[1]], seq_len=10)
    assert batch.features.shape == (2, 10, 32) and batch.lengths.tolist() == [10, 10]
    torch.testing.assert_close(batch.features[0, 1:], batch.targets[0, :-1])
    assert torch.equal(batch.tokens[0, 1:], batch.next_tokens[0, :-1])
    assert batch.positions[0, 0] == len(rows[0]["prompt_ids"]) - 1


def test_cli_eagle(setup, tmp_path):
    model, tokenizer, data = setup
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["eagle", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
            "--eval-every", "0", "--no-wandb", "--draft-vocab", "30", "--model", str(tmp_path / "model")]
    assert train_main(argv) == 0
    assert (tmp_path / "out" / "step_2" / "model.safetensors").is_file()
    assert train_main(["eagle", "--data", str(data), "--out", str(tmp_path / "x"), "--unroll", "0", "--no-wandb",
                       "--model", str(tmp_path / "model")]) == 2

"""EAGLE-3 data and trainer: teacher-forced answers, features equal a direct forward and resume without duplicates,
training-time-test unrolling equals the drafter's own step-by-step drafting, a short run lowers the loss and its
checkpoint drafts losslessly through the registry."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from specdec.drafters import DrafterSpec, build_drafter
from specdec.drafters.eagle3 import Eagle3Drafter, Eagle3Head, fused_features, fused_layers, load_eagle3_head
from specdec.engine import SpeculativeEngine
from specdec.interfaces import DraftInput
from specdec.target import TargetModel
from specdec.train.data import load_distillation_data
from specdec.train.eagle3 import EVAL, Eagle3TrainConfig, export_eagle3, fused_batch, train_eagle3, ttt_passes
from specdec.train.features import compute_features
from specdec.train.loop import LoopConfig, read_metrics
from specdec.train.teacher import clean_gsm8k_answer, write_teacher_forced
from tests.conftest import tiny_llama
from tests.test_train_data import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
SUMS = [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1), (8, 3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    (root / "data" / "gsm8k").mkdir(parents=True)
    records = [{"question": f"What is {a} plus {b}?",
                "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"} for a, b in SUMS]
    (root / "data" / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = char_tokenizer()
    teacher = write_teacher_forced(tokenizer, ["gsm8k"], root / "data", root / "teacher", shard_size=3)
    return tokenizer, root, teacher


def test_teacher_forced_gsm8k_answers_become_the_assistant_turn_and_a_rerun_adds_nothing(setup):
    tokenizer, root, teacher = setup
    assert clean_gsm8k_answer("1 + 2 = <<1+2=3>>3.\n#### 3") == "1 + 2 = 3.\nThe answer is 3."
    data = load_distillation_data(teacher)
    assert sorted(data["index"]) == list(range(len(SUMS)))
    row = data[0]

    def text(ids):
        return "".join(tokenizer.convert_ids_to_tokens(list(ids)))

    assert text(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    a, b = (int(w.rstrip("?")) for w in row["prompt"].split()[2::2])
    assert text(row["response_ids"]).endswith(f"The answer is {a + b}.<|im_end|>")
    write_teacher_forced(tokenizer, ["gsm8k"], root / "data", teacher, shard_size=3)
    assert len(load_distillation_data(teacher)) == len(SUMS)


def test_features_equal_a_direct_forward_and_resume_shard_by_shard_without_duplicates(setup, tmp_path):
    tokenizer, _, teacher = setup
    model = tiny_llama(vocab=len(tokenizer), layers=7, dtype=torch.float64)
    out = compute_features(model, teacher, tmp_path / "feat", topk=4, batch_tokens=120, max_shards=1)
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 1  # "interrupted" after one shard
    compute_features(model, teacher, out, topk=4, batch_tokens=120)
    compute_features(model, teacher, out, topk=4, batch_tokens=120)  # nothing left: adds nothing
    data = load_distillation_data(out).with_format("numpy", dtype=None)
    assert sorted(int(i) for i in data["index"]) == list(range(len(SUMS)))
    assert data[0]["fused"].dtype == np.float16 and data[0]["fused"].shape[1] == 3 * model.config.hidden_size
    for row in data:
        prompt, response = row["prompt_ids"].tolist(), row["response_ids"].tolist()
        with torch.no_grad():
            direct = model(torch.tensor([prompt + response]), output_hidden_states=True)
        rows = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
        fused = fused_features(direct.hidden_states)[0, rows]
        torch.testing.assert_close(torch.as_tensor(row["fused"]).double(), fused, rtol=1e-3, atol=1e-3)
        values, indices = direct.logits[0, rows].topk(4, dim=-1)
        assert torch.equal(torch.as_tensor(row["topk_indices"]).long(), indices)
        torch.testing.assert_close(torch.as_tensor(row["topk_values"]).double(), values, rtol=1e-3, atol=1e-3)


def test_training_time_test_unrolling_equals_the_drafters_own_step_by_step_drafting(monkeypatch):
    target = TargetModel(tiny_llama(layers=7, seed=4))  # float64
    vocab, steps = target.vocab_size, 4
    vocab_ids = torch.arange(0, vocab, 2)
    head = Eagle3Head.untrained(target, vocab_ids)
    assert head.fc.weight.dtype == torch.float64 and fused_layers(7) == (2, 3, 4)
    seq = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = fused_features(target.model(seq[None], output_hidden_states=True).hidden_states)[0]
    n = seq.numel() - 1  # response = seq[1:]
    row = {"prompt_ids": seq[:1].numpy(), "response_ids": seq[1:].numpy(), "fused": fused[:n].numpy(),
           "topk_indices": np.zeros((n, 2), np.int32), "topk_values": np.zeros((n, 2), np.float32)}
    batch = fused_batch([row], 64, vocab_ids, vocab, dtype=torch.float64)
    with torch.no_grad():
        passes = [out[0] for out in ttt_passes(head, batch, steps)]
    compared = 0
    pairs = n - 1  # the last response token's pair has no label
    for root in range(pairs):  # root pair (fused[root], seq[root + 1]); the drafter's chain continues with seq
        drafter = Eagle3Drafter(head, tree="chain", depth=steps, backend=target.backend)
        history = seq[: root + 2]
        drafter.accept(0, history[-1:], fused[: root + 1])
        forced, seen = seq[root + 2:].tolist(), []

        def pick(out, forced=forced, seen=seen):  # record each node's output; steer the chain along seq
            seen.append(out.clone())
            logits = torch.full((vocab,), float("-inf"), dtype=out.dtype)
            logits[forced[len(seen) - 1] if len(seen) <= len(forced) else 0] = 0.0
            return logits

        monkeypatch.setattr(head, "full_logits", pick)
        drafter.propose([DraftInput(0, history)])
        monkeypatch.undo()
        for depth, out in enumerate(seen):  # depth-d node under root pair r == pass d + 1 at pair r + d
            if root + depth < pairs:
                torch.testing.assert_close(out, passes[depth][root + depth], rtol=1e-10, atol=1e-10)
                compared += 1
    assert compared > 20


def test_a_short_eagle3_run_lowers_the_loss_and_its_fp16_export_drafts_losslessly(setup, tmp_path):
    tokenizer, _, teacher = setup
    model = tiny_llama(vocab=len(tokenizer), layers=7, dtype=torch.float32)
    feats = compute_features(model, teacher, tmp_path / "feat", topk=4)
    loop = LoopConfig(out_dir=str(tmp_path / "run"), steps=40, lr=3e-3, eval_every=0, wandb=False)
    config = Eagle3TrainConfig(data_dir=str(feats), loop=loop, draft_vocab_size=30, steps_ttt=3, batch_size=4,
                               evaluation=replace(EVAL, holdout=1), vocab_data=(str(teacher),), follow=10)
    final = train_eagle3(model, tokenizer, config)
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    shipped = export_eagle3(final, tmp_path / "fp16")
    assert json.loads((shipped / "config.json").read_text())["torch_dtype"] == "float16"  # follows the cast
    target = TargetModel(model)
    head = load_eagle3_head(shipped, target)
    assert head.vocab_ids is not None and head.vocab_ids.numel() <= 31 < len(tokenizer)  # 30 + EOS at most
    drafter = build_drafter(DrafterSpec.parse(f"eagle3:path={shipped},tree=dynamic,budget=6"), target)
    assert drafter.feature_layers == fused_layers(7)
    prompt = tokenizer("What is 4 plus 4?")["input_ids"]
    plain = SpeculativeEngine(target, target.new_cache(num_blocks=16), None, []).generate(prompt, 24)
    spec = SpeculativeEngine(target, target.new_cache(num_blocks=16), drafter, []).generate(prompt, 24)
    assert spec.tokens == plain.tokens and spec.stats.tau >= 1.0


def test_humaneval_prompts_come_from_the_gzipped_stubs_and_need_a_data_dir(tmp_path):
    import gzip

    from specdec.train.data import DataConfig
    from specdec.train.prompt_sources import HUMANEVAL_ASK, load_instruction_prompts

    (tmp_path / "humaneval").mkdir()
    stubs = ["def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "def neg(x):\n    \"\"\"Minus x.\"\"\"\n"]
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"task_id": f"HumanEval/{i}", "prompt": s}) + "\n" for i, s in enumerate(stubs))
    prompts = load_instruction_prompts(DataConfig(sources=("humaneval",), data_dir=str(tmp_path)))
    assert sorted(prompts) == sorted(HUMANEVAL_ASK + "```python\n" + s.rstrip() + "\n```" for s in stubs)
    with pytest.raises(ValueError, match="humaneval source needs --data-dir"):
        load_instruction_prompts(DataConfig(sources=("humaneval",)))


def test_an_interrupted_eagle3_run_resumes_with_the_same_losses_and_pairs_count(setup, tmp_path, monkeypatch):
    from specdec.train import eagle3 as E3
    from tests.conftest import crash_on_call

    tokenizer, _, teacher = setup
    model = tiny_llama(vocab=len(tokenizer), layers=7, dtype=torch.float32)
    feats = compute_features(model, teacher, tmp_path / "feat", topk=4)

    def run(out, resume=False):
        loop = LoopConfig(out_dir=str(out), steps=6, lr=3e-3, eval_every=0, save_every=3, wandb=False,
                          resume=resume)
        config = Eagle3TrainConfig(data_dir=str(feats), loop=loop, draft_vocab_size=30, steps_ttt=2, batch_size=2,
                                   evaluation=replace(EVAL, holdout=1))
        train_eagle3(model, tokenizer, config)
        return read_metrics(out)

    whole = run(tmp_path / "whole")
    real = E3.eagle3_loss
    monkeypatch.setattr(E3, "eagle3_loss", crash_on_call(real, 5))  # dies after the step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(E3, "eagle3_loss", real)
    resumed = run(tmp_path / "cut", resume=True)
    losses = [m["train/loss"] for m in resumed]
    assert len(resumed) == 6 + 1 and losses[:3] + losses[4:] == pytest.approx([m["train/loss"] for m in whole],
                                                                              rel=1e-5)
    assert resumed[-1]["train/pairs_seen"] == whole[-1]["train/pairs_seen"]  # the count goes on from the checkpoint


def test_a_run_started_from_a_checkpoint_takes_its_weights_and_draft_vocabulary(setup, tmp_path):
    tokenizer, _, teacher = setup
    model = tiny_llama(vocab=len(tokenizer), layers=7, dtype=torch.float32)
    feats = compute_features(model, teacher, tmp_path / "feat", topk=4)

    def config(out, steps, **kw):
        loop = LoopConfig(out_dir=str(out), steps=steps, lr=3e-3, eval_every=0, wandb=False)
        return Eagle3TrainConfig(data_dir=str(feats), loop=loop, steps_ttt=2, batch_size=2,
                                 evaluation=replace(EVAL, holdout=1), **kw)

    first = export_eagle3(train_eagle3(model, tokenizer, config(tmp_path / "a", 20, draft_vocab_size=12)),
                          tmp_path / "fp16")
    target = TargetModel(model)
    start = load_eagle3_head(first, target)
    # a fine-tune on another vocabulary size keeps the checkpoint's vocabulary; 1 step at lr 1e-9 keeps its weights
    loop = replace(config(tmp_path / "b", 1).loop, lr=1e-9)
    tuned = train_eagle3(model, tokenizer, replace(config(tmp_path / "b", 1, draft_vocab_size=25, init=str(first)),
                                                   loop=loop))
    again = load_eagle3_head(tuned, target)
    assert torch.equal(again.vocab_ids, start.vocab_ids) and again.vocab_ids.numel() <= 13
    for (name, a), (_, b) in zip(start.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), msg=name, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"not a drafter checkpoint: .*config.json is missing"):
        train_eagle3(model, tokenizer, config(tmp_path / "c", 1, init=str(tmp_path)))

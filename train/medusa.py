"""Medusa-heads trainer on self-distillation data (see :mod:`specdec.train.data`).

For an example with prompt ``p`` (``P`` tokens) and response ``r`` (``R`` tokens), ``hidden[i]`` (``[R, H]``) is the
target's last hidden state at the position that predicts ``r[i]``. Head ``k`` (1-indexed) reads ``hidden[i]`` and is
trained to predict ``r[i + k]`` (``k + 1`` places after the position's own next token) with cross-entropy, plus
``kd_weight`` times ``KL(target || head)`` against the target's distribution at the position predicting ``r[i + k]``
(``lm_head(hidden[i + k])``). With a draft vocabulary (:mod:`specdec.draft_vocab`, the ``draft_vocab_size`` most
frequent response tokens of the training data) the heads score only those tokens: labels outside it are skipped
and the KD target is the target's distribution restricted (renormalised) to it. Hidden states come from the
dataset's ``hidden`` column when present, else from a no-grad target forward over ``p + r``. The target is frozen;
only the heads train (:func:`specdec.train.loop.train_loop`: accelerate, real-verifier tau, checkpoints, resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.draft_vocab import draft_index
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.train.evaluation import EvalConfig, eval_prompt_ids
from specdec.train.loop import (
    LoopConfig,
    Trainee,
    batch_indices,
    example_features,
    prepare_training,
    train_loop,
)


@dataclass(frozen=True)
class MedusaTrainConfig:
    """Settings of a Medusa training run.

    Attributes:
        data_dir: distillation data folder(s) (``train/data.py`` layout).
        loop: optimizer, evaluation, checkpoint and tracking settings (``out_dir`` among them).
        num_heads / num_layers / share_lm_head / draft_vocab_size: head shape (:class:`MedusaConfig`);
            ``draft_vocab_size`` 0 = the full vocabulary.
        batch_size: examples per step; seq_len: at most this many response tokens per example are used.
        kd_weight: weight of the KL term (0 skips KD and, with stored hidden states, any target forward).
        evaluation: the verifier evaluation's prompts and held-out rows (:class:`EvalConfig`; the heads' own
            default tree).
    """

    data_dir: str | tuple[str, ...]
    loop: LoopConfig
    num_heads: int = 3
    num_layers: int = 1
    share_lm_head: bool = False
    draft_vocab_size: int = 0
    batch_size: int = 8
    seq_len: int = 512
    kd_weight: float = 0.0
    evaluation: EvalConfig = EvalConfig()

    def __post_init__(self) -> None:
        for name in ("num_heads", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kd_weight < 0 or self.draft_vocab_size < 0:
            raise ValueError("kd_weight and draft_vocab_size must be >= 0")


def medusa_loss(head_logits: torch.Tensor, labels: torch.Tensor, lengths: Sequence[int],
                teacher: torch.Tensor | None, kd_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss averaged over heads, and per-head metrics.

    Parameters
    ----------
    head_logits : ``[N, K, N_v]``, the heads on ``N = sum(lengths)`` concatenated examples' hidden rows, over the
        (draft) vocabulary.
    labels : ``[N]`` int64, the (draft-vocabulary index of the) response token each row predicts; ``-1`` = not in
        the draft vocabulary (skipped by CE, counted wrong by accuracy).
    lengths : response length of each example.
    teacher : ``[N, N_v]`` target logits per row over the same vocabulary, or ``None`` (no KD).
    kd_weight : weight of ``KL(target || head)`` at the future position.
    """
    starts = np.cumsum([0, *lengths[:-1]])
    total, metrics, num_heads = head_logits.new_zeros(()), {}, head_logits.shape[1]
    for k in range(1, num_heads + 1):
        src = torch.cat([torch.arange(s, s + n - k) for s, n in zip(starts, lengths, strict=True) if n > k]
                        or [torch.zeros(0, dtype=torch.long)]).to(labels.device)
        if src.numel() == 0:
            continue
        logits = head_logits[src, k - 1].float()  # [N_k, N_v]
        target = labels[src + k]
        ce = F.cross_entropy(logits, target, ignore_index=-1) if bool((target >= 0).any()) else logits.sum() * 0
        loss = ce
        if teacher is not None and kd_weight > 0:
            kl = F.kl_div(logits.log_softmax(-1), teacher[src + k].log_softmax(-1), log_target=True,
                          reduction="batchmean")
            loss = ce + kd_weight * kl
            metrics[f"train/kl_head{k}"] = kl.item()
        total = total + loss / num_heads
        metrics[f"train/ce_head{k}"] = ce.item()
        metrics[f"train/acc_head{k}"] = (logits.argmax(-1) == target).float().mean().item()
    metrics["train/loss"] = total.item()
    return total, metrics


def train_medusa(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MedusaTrainConfig) -> Path:
    """Train Medusa heads for ``target_model`` on ``config.data_dir``; returns the final checkpoint folder
    (``out_dir/step_{steps}``, loadable with ``MedusaDrafter.from_pretrained(path, TargetModel(target_model))``)."""
    data = prepare_training(target_model, tokenizer, config.data_dir, config.evaluation.holdout, config.loop.seed,
                            config.draft_vocab_size)
    train_rows, vocab_ids = data.train, data.vocab_ids
    lm_head = target_model.get_output_embeddings()
    vocab = target_model.config.get_text_config().vocab_size
    head_config = MedusaConfig(lm_head.weight.shape[1], vocab, config.num_heads, config.num_layers,
                               config.share_lm_head, 0 if vocab_ids is None else vocab_ids.numel())
    heads = MedusaHeads(head_config, lm_head, vocab_ids).to(lm_head.weight.device, torch.float32)
    need_logits = config.kd_weight > 0

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        feats = [example_features(target_model, train_rows[i], config.seq_len, need_logits)
                 for i in batch_indices(step, config.batch_size, len(train_rows), config.loop.seed)]
        hidden = torch.cat([f[0] for f in feats])  # [N, H]
        labels = torch.cat([f[1] for f in feats])  # [N]
        teacher = torch.cat([f[2] for f in feats]) if need_logits else None  # [N, V]
        if vocab_ids is not None:
            labels = draft_index(labels, vocab_ids, vocab)
            teacher = None if teacher is None else teacher[:, vocab_ids.to(teacher.device)]
        return medusa_loss(heads(hidden), labels, [f[1].numel() for f in feats], teacher, config.kd_weight)

    trainee = Trainee(heads, loss, lambda module: MedusaDrafter(module))
    prompts = eval_prompt_ids(tokenizer, config.evaluation.prompts, data.held_out)
    return train_loop(trainee, target_model, prompts, data.eos_ids, config.loop, asdict(config))

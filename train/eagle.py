"""EAGLE-style head trainer: feature regression (SmoothL1) + KD through the LM head, unrolled over draft depth.

Data (:mod:`specdec.train.data`, ``hidden`` column or a target forward): for a response ``r`` (``R`` tokens),
``f_i = hidden[i]`` is the target feature that predicted ``r[i]``. The head's input pair ``i`` is ``(f_i, r[i])``
at RoPE position ``P - 1 + i`` (as in :class:`~specdec.drafters.eagle.EagleDrafter`), and its output should be
``f_{i+1}``. Loss per pair: ``SmoothL1(out, f_{i+1}) + kd_weight * CE(softmax(W f_{i+1}), softmax(W out))`` with
``W`` the target's LM-head rows of the draft vocabulary (all rows without one), so the KD target is the target's
own distribution (renormalised to the draft vocabulary).

**Unrolling** (``unroll = S`` passes; EAGLE-3's "training-time test"): at inference a depth-``d`` node reads its
parent's *predicted* feature and attends to the real history up to the root plus its own draft ancestors. Pass
``s`` reproduces exactly that: its input at ``i`` is pass ``s - 1``'s output at ``i - 1`` (detached), and its query
``i`` attends to pass-1 keys ``j <= i - s + 1`` (the real history up to the root ``i - s + 1``) and to pass-``k`` key
``i - s + k`` for ``k = 2..s`` (the node's ancestors and itself). Pairs ``i < s - 1`` (no root) are not scored.
Passes are averaged. ``unroll = 1`` is EAGLE-1's teacher forcing. Uniform noise ``U(-noise/2, noise/2)`` is added to
the real input features (EAGLE's augmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase

from specdec.draft_vocab import draft_index
from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.target import TargetModel
from specdec.train.evaluation import EvalConfig, eval_prompt_ids
from specdec.train.loop import (
    LoopConfig,
    Trainee,
    batch_indices,
    example_features,
    prepare_training,
    train_loop,
)

UNROLL_ATTENTION = "specdec_eagle_unroll"
EVAL = EvalConfig(tree="dynamic", depth=6, budget=16, topk=4)  # the verifier evaluation's drafter by default


@dataclass(frozen=True)
class EagleTrainConfig:
    """Settings of an EAGLE-head training run.

    Attributes:
        data_dir: distillation data folder(s) (``train/data.py`` layout).
        loop: optimizer, evaluation, checkpoint and tracking settings (``out_dir`` among them).
        draft_vocab_size: the head scores the ``N`` most frequent response tokens of the training data (0 = all).
        unroll: passes of the training-time test (1 = teacher forcing only).
        batch_size / seq_len: examples per step, at most ``seq_len`` pairs per example.
        kd_weight / noise: weight of the distillation term, feature-noise width.
        evaluation: the verifier evaluation (:class:`EvalConfig`; default :data:`EVAL`).
    """

    data_dir: str | tuple[str, ...]
    loop: LoopConfig
    draft_vocab_size: int = 0
    unroll: int = 3
    batch_size: int = 8
    seq_len: int = 256
    kd_weight: float = 0.1
    noise: float = 0.2
    evaluation: EvalConfig = EVAL

    def __post_init__(self) -> None:
        for name in ("unroll", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.kd_weight, self.noise, self.draft_vocab_size) < 0:
            raise ValueError("kd_weight, noise and draft_vocab_size must be >= 0")


@dataclass
class UnrollKV:
    """Keys/values of the passes so far (mutable, one per training step), read by the unroll attention.

    ``lengths [B]`` int64: pairs per example (padding beyond is never attended to)."""

    lengths: torch.Tensor
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


def unroll_mask(lengths: torch.Tensor, width: int, passes: int) -> torch.Tensor:
    """``[B, 1, T, passes*T]`` bool: pass ``s = passes``'s query ``i`` sees pass-1 key ``j <= i - s + 1`` (``j``
    inside the example) and pass-``k`` key ``i - s + k`` for ``k = 2..s`` (see the module docstring)."""
    s = passes
    i = torch.arange(width, device=lengths.device)[:, None]
    j = torch.arange(width, device=lengths.device)[None, :]
    blocks = [(j <= i - s + 1)[None] & (j[None] < lengths[:, None, None])]
    blocks += [(j == i - s + k)[None].expand(lengths.numel(), -1, -1) for k in range(2, s + 1)]
    return torch.cat(blocks, dim=-1)[:, None]


def _unroll_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, eagle_unroll=None,
                      **kwargs):
    """``AttentionInterface`` function of the unrolled passes: ``query [B, Hq, T, D]``, ``key``/``value``
    ``[B, Hkv, T, D]`` of this pass; attends over every pass's keys under :func:`unroll_mask`."""
    if eagle_unroll is None:
        raise ValueError(f"the {UNROLL_ATTENTION!r} attention needs eagle_unroll=UnrollKV(...)")
    eagle_unroll.keys.append(key)
    eagle_unroll.values.append(value)
    groups = query.shape[1] // key.shape[1]
    k = torch.cat(eagle_unroll.keys, dim=2).repeat_interleave(groups, dim=1)
    v = torch.cat(eagle_unroll.values, dim=2).repeat_interleave(groups, dim=1)
    mask = unroll_mask(eagle_unroll.lengths, query.shape[2], len(eagle_unroll.keys))
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(UNROLL_ATTENTION, _unroll_attention)


@dataclass(frozen=True)
class PairBatch:
    """Padded training pairs of one step (``B`` examples, ``T`` pairs at most).

    Attributes:
        features: ``[B, T, H]`` float32, ``f_i``; targets: ``[B, T, H]`` float32, ``f_{i+1}``.
        tokens / positions: ``[B, T]`` int64, ``r[i]`` and its RoPE position.
        next_tokens: ``[B, T]`` int64, ``r[i+1]`` (the target's token after the pair's).
        lengths: ``[B]`` int64 pairs per example.
    """

    features: torch.Tensor
    targets: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    next_tokens: torch.Tensor
    lengths: torch.Tensor


def pair_batch(model: PreTrainedModel, rows: Sequence[dict], seq_len: int) -> PairBatch:
    """The pairs of ``rows`` (examples with fewer than 2 response tokens give none)."""
    items = []
    for row in rows:
        hidden, response, _ = example_features(model, row, seq_len + 1, need_logits=False)
        start = len(row["prompt_ids"]) - 1
        items.append((hidden, response, start))
    width = max(1, max(h.shape[0] - 1 for h, _, _ in items))
    size, dev = items[0][0].shape[1], items[0][0].device
    feats, targets = torch.zeros(len(items), width, size, device=dev), torch.zeros(len(items), width, size, device=dev)
    tokens, nxt, pos = (torch.zeros(len(items), width, dtype=torch.long, device=dev) for _ in range(3))
    lengths = torch.zeros(len(items), dtype=torch.long, device=dev)
    for b, (h, r, start) in enumerate(items):
        n = max(0, h.shape[0] - 1)
        feats[b, :n], targets[b, :n] = h[:n], h[1: n + 1]
        tokens[b, :n], nxt[b, :n] = r[:n], r[1: n + 1]
        pos[b] = start + torch.arange(width, device=dev)
        lengths[b] = n
    return PairBatch(feats, targets, tokens, pos, nxt, lengths)


def eagle_loss(head: EagleHead, batch: PairBatch, unroll: int, kd_weight: float, noise: float,
               labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the ``unroll`` passes of SmoothL1 + ``kd_weight`` * KD (module docstring); per-pass metrics.

    ``labels [B, T]`` int64: draft-vocabulary index of ``next_tokens`` (``-1`` outside it)."""
    width = batch.tokens.shape[1]
    idx = torch.arange(width, device=batch.tokens.device)
    real = idx[None] < batch.lengths[:, None]  # [B, T]
    with torch.no_grad():
        teacher = head.logits(batch.targets).float().softmax(-1)  # [B, T, N]
    state = UnrollKV(batch.lengths)
    inputs = batch.features + noise * (torch.rand_like(batch.features) - 0.5) if noise else batch.features
    total, metrics = batch.features.new_zeros(()), {}
    for s in range(1, unroll + 1):
        out = head.forward_with(inputs, batch.tokens, batch.positions, UNROLL_ATTENTION, eagle_unroll=state).float()
        scored = real & (idx[None] >= s - 1)
        if not bool(scored.any()):
            break
        pred = out[scored]
        logits = head.logits(pred).float()
        reg = F.smooth_l1_loss(pred, batch.targets[scored])
        kd = -(teacher[scored] * logits.log_softmax(-1)).sum(-1).mean()
        total = total + (reg + kd_weight * kd) / unroll
        metrics[f"train/reg_step{s}"] = reg.item()
        metrics[f"train/kd_step{s}"] = kd.item()
        metrics[f"train/acc_step{s}"] = (logits.argmax(-1) == labels[scored]).float().mean().item()
        inputs = torch.cat([out[:, :1].detach() * 0, out[:, :-1].detach()], dim=1)  # pass s+1 reads out[i - 1]
    metrics["train/loss"] = total.item()
    return total, metrics


def train_eagle(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EagleTrainConfig) -> Path:
    """Train an EAGLE head for ``target_model`` on ``config.data_dir``; returns the final checkpoint folder
    (``out_dir/step_{steps}``, loadable with ``EagleDrafter.from_pretrained(path, TargetModel(target_model))``)."""
    data = prepare_training(target_model, tokenizer, config.data_dir, config.evaluation.holdout, config.loop.seed,
                            config.draft_vocab_size)
    train_rows, vocab_ids = data.train, data.vocab_ids
    target = TargetModel(target_model)
    vocab = target.vocab_size
    head_config = EagleConfig.from_target(target)
    head_config = EagleConfig(head_config.hidden_size, vocab, head_config.layer_config,
                              0 if vocab_ids is None else vocab_ids.numel())
    head = EagleHead(head_config, target, vocab_ids).float()

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [train_rows[i] for i in batch_indices(step, config.batch_size, len(train_rows), config.loop.seed)]
        batch = pair_batch(target_model, rows, config.seq_len)
        labels = batch.next_tokens if vocab_ids is None else draft_index(batch.next_tokens, vocab_ids, vocab)
        return eagle_loss(head, batch, config.unroll, config.kd_weight, config.noise, labels)

    def drafter(module: EagleHead) -> EagleDrafter:
        ev = config.evaluation
        return EagleDrafter(module, tree=ev.tree, depth=ev.depth, budget=ev.budget, topk=ev.topk,
                            backend=target.backend)

    prompts = eval_prompt_ids(tokenizer, config.evaluation.prompts, data.held_out)
    return train_loop(Trainee(head, loss, drafter), target_model, prompts, data.eos_ids, config.loop,
                      asdict(config))

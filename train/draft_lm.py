"""Draft-LM distillation: a small causal LM learns the target's next-token distribution (DistillSpec-style).

The draft model is any HF causal LM sharing the target's tokenizer, or (default) a copy of the target's first
``layers`` decoder layers with its embeddings, final norm and LM head (trainable, independent of the target).
Per response position with target distribution ``p`` and draft distribution ``q`` (full vocabulary):

* ``forward_kl``: ``KL(p || q)``, the classic distillation loss;
* ``tv``: total variation ``0.5 * sum |p - q|``; speculative decoding accepts a draft token with probability
  ``1 - TV(p, q)`` at that position, so this is the acceptance rate itself (Zhou et al., 2024, "DistillSpec").

**On-policy** data (DistillSpec): with probability ``on_policy`` a step trains on the draft's *own* samples
(``model.generate`` at ``temperature`` from the batch's prompts, ``on_policy_tokens`` long) scored by a target
forward, instead of the stored self-distillation responses; the drafter is then trained where it will draft.
Off-policy steps take the target's distribution from the stored hidden states (``lm_head(hidden)``) or a target
forward. Checkpoints are HF ``save_pretrained`` folders, loadable with ``draft-model:path=...``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.self_spec import truncated_view
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

LOSSES = ("forward_kl", "tv")
EVAL = EvalConfig(tree="chain", depth=4)  # the verifier evaluation's drafter by default


@dataclass(frozen=True)
class DraftTrainConfig:
    """Settings of a draft-LM distillation run.

    Attributes:
        data_dir: distillation data folder(s) (``train/data.py`` layout; prompts always, responses off-policy).
        loop: optimizer, evaluation, checkpoint and tracking settings (``out_dir`` among them).
        draft: HF id or folder of the draft model; ``None`` = the target's first ``layers`` layers (a copy).
        loss: ``"forward_kl"`` or ``"tv"``.
        on_policy: probability that a step trains on the draft's own samples; temperature / on_policy_tokens:
            how they are sampled.
        batch_size / seq_len: examples per step, response tokens per example.
        evaluation: the verifier evaluation (:class:`EvalConfig`; its ``depth`` is the drafter's chain depth).
    """

    data_dir: str | tuple[str, ...]
    loop: LoopConfig
    draft: str | None = None
    layers: int = 4
    loss: str = "forward_kl"
    on_policy: float = 0.0
    temperature: float = 1.0
    on_policy_tokens: int = 64
    batch_size: int = 8
    seq_len: int = 256
    evaluation: EvalConfig = EVAL

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if not 0.0 <= self.on_policy <= 1.0 or self.temperature <= 0:
            raise ValueError(f"need 0 <= on_policy <= 1 and temperature > 0, got {self.on_policy}, {self.temperature}")
        for name in ("layers", "on_policy_tokens", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def truncated_copy(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """An independent causal LM made of ``model``'s first ``num_layers`` layers, embeddings, norm and LM head."""
    draft = copy.deepcopy(truncated_view(model, num_layers))  # one copied config, shared by all its modules
    draft.config.num_hidden_layers = num_layers
    if draft.get_decoder().config is not draft.config:
        raise ValueError(f"{type(model).__name__}: cannot build a truncated copy (its decoder has its own config)")
    return draft


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over rows of ``KL(p || q)`` or ``TV(p, q)``; ``[N, V]`` logits each (teacher = ``p``)."""
    log_q = student_logits.float().log_softmax(-1)
    log_p = teacher_logits.float().log_softmax(-1)
    p = log_p.exp()
    if loss == "forward_kl":  # 0 * log 0 = 0: teachers may put no mass on some tokens
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1).mean()
    return 0.5 * (p - log_q.exp()).abs().sum(-1).mean()


@torch.no_grad()
def on_policy_sample(draft: PreTrainedModel, prompt: Sequence[int], tokens: int, temperature: float,
                     eos_ids: Sequence[int]) -> list[int]:
    """The draft's own continuation of ``prompt`` (sampled at ``temperature``, cut after EOS)."""
    ids = torch.as_tensor([list(prompt)], device=draft.device)
    out = draft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=True,
                         temperature=temperature, top_k=None, top_p=None, eos_token_id=list(eos_ids),
                         pad_token_id=eos_ids[0])
    response = out[0, ids.shape[1]:].tolist()
    for i, tok in enumerate(response):
        if tok in eos_ids:
            return response[: i + 1]
    return response


def draft_logits(draft: PreTrainedModel, prompt: Sequence[int], response: Sequence[int]) -> torch.Tensor:
    """``[R, V]`` draft logits at the positions predicting each response token."""
    ids = torch.as_tensor([list(prompt) + list(response)], device=draft.device)
    logits = draft(input_ids=ids, use_cache=False).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(response)]


def build_draft(target_model: PreTrainedModel, config: DraftTrainConfig) -> PreTrainedModel:
    """The trainable draft model of ``config`` (float32, train mode)."""
    if config.draft is None:
        return truncated_copy(target_model, config.layers).float().train().requires_grad_(True)
    try:
        draft = AutoModelForCausalLM.from_pretrained(config.draft, dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"unknown draft model {config.draft!r}: {err}") from None
    draft_vocab = draft.get_output_embeddings().weight.shape[0]
    target_vocab = target_model.get_output_embeddings().weight.shape[0]
    if draft_vocab != target_vocab:
        raise ValueError(f"tokenizer mismatch: the draft model has {draft_vocab} output tokens, the target "
                         f"{target_vocab}")
    return draft.to(target_model.device).train()


def train_draft_lm(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DraftTrainConfig) -> Path:
    """Distill a draft LM from ``target_model`` on ``config.data_dir``; returns the final checkpoint folder."""
    data = prepare_training(target_model, tokenizer, config.data_dir, config.evaluation.holdout, config.loop.seed)
    train_rows, eos_ids = data.train, data.eos_ids
    target = TargetModel(target_model)
    draft = build_draft(target_model, config)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [train_rows[i] for i in batch_indices(step, config.batch_size, len(train_rows), config.loop.seed)]
        on_policy = random.Random(config.loop.seed * 7919 + step).random() < config.on_policy
        student, teacher = [], []
        for row in rows:
            prompt = [int(t) for t in row["prompt_ids"]]
            if on_policy:
                draft.eval()
                response = on_policy_sample(draft, prompt, config.on_policy_tokens, config.temperature, eos_ids)
                draft.train()
                row = {"prompt_ids": prompt, "response_ids": response}  # scored by a target forward
            _, response_t, target_logits = example_features(target_model, row, config.seq_len, need_logits=True)
            student.append(draft_logits(draft, prompt, response_t.tolist()))
            teacher.append(target_logits)
        student_t, teacher_t = torch.cat(student), torch.cat(teacher)
        value = divergence(student_t, teacher_t, config.loss)
        with torch.no_grad():
            agree = (student_t.argmax(-1) == teacher_t.argmax(-1)).float().mean().item()
            tv = divergence(student_t, teacher_t, "tv").item()
        return value, {"train/loss": value.item(), "train/tv": tv, "train/top1_agreement": agree,
                       "train/on_policy": float(on_policy)}

    def drafter(module: PreTrainedModel) -> DraftModelDrafter:
        return DraftModelDrafter(module, tree="chain", depth=config.evaluation.depth, backend=target.backend)

    def load(module: PreTrainedModel, path: Path) -> None:
        saved = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        module.load_state_dict(saved.state_dict(), strict=True)

    prompts = eval_prompt_ids(tokenizer, config.evaluation.prompts, data.held_out)
    trainee = Trainee(draft, loss, drafter, load)
    return train_loop(trainee, target_model, prompts, eos_ids, config.loop, asdict(config))

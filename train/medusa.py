"""Medusa-heads trainer on self-distillation data (see :mod:`specdec.train.data`).

For an example with prompt ``p`` (``P`` tokens) and response ``r`` (``R`` tokens), ``hidden[i]`` (``[R, H]``) is the
target's last hidden state at the position that predicts ``r[i]``. Head ``k`` (1-indexed) reads ``hidden[i]`` and is
trained to predict ``r[i + k]`` (``k + 1`` places after the position's own next token) with cross-entropy, plus
``kd_weight`` times ``KL(target || head)`` against the target's distribution at the position predicting ``r[i + k]``
(``lm_head(hidden[i + k])``). Hidden states come from the dataset's ``hidden`` column when present, else from a
no-grad target forward over ``p + r``. The target is frozen; only the heads train (``accelerate`` loop).

Every ``eval_every`` steps the heads are measured with the real verifier (:class:`SpeculativeEngine`, greedy) on the
held-out prompts: tau and acceptance by depth as defined in :mod:`specdec.stats`. Checkpoints are
``out_dir/step_N`` (``MedusaHeads.save_pretrained`` + ``trainer_state.pt``); ``resume`` continues from the latest
one at the same step with the same batches and loss. Per-step metrics also go to ``out_dir/metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.engine import SpeculativeEngine
from specdec.prompts import encode_prompt
from specdec.stats import RequestStats
from specdec.target import TargetModel, eos_token_ids
from specdec.train import tracking
from specdec.train.data import load_distillation_data


@dataclass(frozen=True)
class MedusaTrainConfig:
    """Settings of a Medusa training run.

    Attributes:
        data_dir / out_dir: distillation data (``train/data.py`` layout) and where checkpoints + logs go.
        num_heads / num_layers / share_lm_head: head shape (:class:`MedusaConfig`).
        lr / steps / batch_size: AdamW learning rate (constant), optimizer steps, examples per step.
        seq_len: at most this many response tokens per example are used.
        kd_weight: weight of the KL term (0 skips KD and, with stored hidden states, the target forward).
        eval_every / save_every: steps between verifier evaluations / checkpoints (0 = only at the end).
        eval_prompts: held-out prompts (strings, chat-templated, or token-id sequences).
        eval_holdout: the last ``eval_holdout`` dataset rows are not trained on; their prompts join the eval set.
        eval_max_new_tokens: tokens generated per eval prompt.
        seed / wandb / wandb_project / resume: seeding, tracking, continue from the latest checkpoint.
    """

    data_dir: str
    out_dir: str
    num_heads: int = 3
    num_layers: int = 1
    share_lm_head: bool = False
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    kd_weight: float = 0.0
    eval_every: int = 200
    save_every: int = 0
    eval_prompts: tuple[str | tuple[int, ...], ...] = field(default_factory=tuple)
    eval_holdout: int = 0
    eval_max_new_tokens: int = 64
    seed: int = 0
    wandb: bool = True
    wandb_project: str = "specdec-medusa"
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("num_heads", "steps", "batch_size", "seq_len", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.kd_weight < 0 or min(self.eval_every, self.save_every, self.eval_holdout) < 0:
            raise ValueError("need lr > 0 and kd_weight, eval_every, save_every, eval_holdout >= 0")


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example ids of (0-indexed) ``step``: epoch-wise permutations seeded by ``(seed, epoch)``, so any step's
    batch is reproducible without replaying the ones before it (resume)."""
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[pos]))
    return out


@torch.no_grad()
def example_features(model: PreTrainedModel, row: dict, seq_len: int, need_logits: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One example's training inputs: ``hidden`` ``[R, H]`` float32, ``response`` ``[R]`` int64 and, if
    ``need_logits``, the target's logits ``[R, V]`` float32 (row ``i`` predicts ``response[i]``); ``R <= seq_len``."""
    response = torch.as_tensor(np.asarray(row["response_ids"][:seq_len]), dtype=torch.long)
    num = response.numel()
    device = next(model.parameters()).device
    if row.get("hidden") is not None:
        hidden = torch.as_tensor(np.asarray(row["hidden"][:num])).to(device, torch.float32)
        logits = None
        if need_logits:
            lm_head = model.get_output_embeddings()
            logits = lm_head(hidden.to(lm_head.weight.dtype)).float()
        return hidden, response.to(device), logits
    prompt = torch.as_tensor(np.asarray(row["prompt_ids"]), dtype=torch.long)
    ids = torch.cat([prompt, response]).unsqueeze(0).to(device)  # [1, P + R]
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    rows = slice(prompt.numel() - 1, prompt.numel() - 1 + num)
    logits = out.logits[0, rows].float() if need_logits else None
    return out.hidden_states[-1][0, rows].float(), response.to(device), logits


def medusa_loss(head_logits: torch.Tensor, responses: torch.Tensor, lengths: Sequence[int],
                teacher: torch.Tensor | None, kd_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss averaged over heads, and per-head metrics.

    Parameters
    ----------
    head_logits : ``[N, K, V]``, the heads on ``N = sum(lengths)`` concatenated examples' hidden rows.
    responses : ``[N]`` int64, the response token each row predicts (examples concatenated).
    lengths : response length of each example.
    teacher : ``[N, V]`` target logits per row, or ``None`` (no KD).
    kd_weight : weight of ``KL(target || head)`` at the future position.
    """
    starts = np.cumsum([0, *lengths[:-1]])
    total, metrics, num_heads = head_logits.new_zeros(()), {}, head_logits.shape[1]
    for k in range(1, num_heads + 1):
        src = torch.cat([torch.arange(s, s + n - k) for s, n in zip(starts, lengths, strict=True) if n > k]
                        or [torch.zeros(0, dtype=torch.long)]).to(responses.device)
        if src.numel() == 0:
            continue
        logits = head_logits[src, k - 1].float()  # [N_k, V]
        labels = responses[src + k]
        ce = F.cross_entropy(logits, labels)
        loss = ce
        if teacher is not None and kd_weight > 0:
            kl = F.kl_div(logits.log_softmax(-1), teacher[src + k].log_softmax(-1), log_target=True,
                          reduction="batchmean")
            loss = ce + kd_weight * kl
            metrics[f"train/kl_head{k}"] = kl.item()
        total = total + loss / num_heads
        metrics[f"train/ce_head{k}"] = ce.item()
        metrics[f"train/acc_head{k}"] = (logits.argmax(-1) == labels).float().mean().item()
    metrics["train/loss"] = total.item()
    return total, metrics


@torch.no_grad()
def evaluate_tau(model: PreTrainedModel, heads: MedusaHeads, prompts: Sequence[Sequence[int]],
                 eos_ids: Sequence[int], max_new_tokens: int) -> RequestStats:
    """Greedy speculative decoding of every prompt with the real engine; the requests' combined stats."""
    target = TargetModel(model)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 64
    cache = target.new_cache(num_blocks=math.ceil(max_len / 16) + 1, block_size=16)
    was_training = heads.training
    engine = SpeculativeEngine(target, cache, MedusaDrafter(heads), eos_token_ids=eos_ids, max_tree_nodes=64)
    try:
        return RequestStats.combine([engine.generate(list(p), max_new_tokens).stats for p in prompts])
    finally:
        heads.train(was_training)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The ``step_N`` folder with a ``trainer_state.pt`` and the largest ``N``, or ``None``."""
    done = [p for p in Path(out_dir).glob("step_*") if (p / "trainer_state.pt").is_file() and p.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def _save(path: Path, heads: MedusaHeads, optimizer: torch.optim.Optimizer, step: int) -> None:
    heads.save_pretrained(path)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng}, path / "trainer_state.pt")


def _restore(path: Path, heads: MedusaHeads, optimizer: torch.optim.Optimizer) -> int:
    saved = MedusaHeads.from_pretrained(path, heads.shared_lm_head)
    if saved.config != heads.config:
        raise ValueError(f"checkpoint {path} has heads {saved.config}, this run wants {heads.config}")
    heads.load_state_dict(saved.state_dict())
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _eval_prompts(config: MedusaTrainConfig, tokenizer: PreTrainedTokenizerBase, held_out: list) -> list[list[int]]:
    prompts = [encode_prompt(tokenizer, p).tolist() if isinstance(p, str) else [int(t) for t in p]
               for p in config.eval_prompts]
    return prompts + [[int(t) for t in row["prompt_ids"]] for row in held_out]


def train_medusa(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MedusaTrainConfig) -> Path:
    """Train Medusa heads for ``target_model`` on ``config.data_dir``; returns the final checkpoint folder
    (``out_dir/step_{steps}``, loadable with ``MedusaDrafter.from_pretrained(path, TargetModel(target_model))``)."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    accelerator = Accelerator()
    data = load_distillation_data(config.data_dir).with_format("numpy", dtype=None)
    rows = [data[i] for i in range(len(data))]
    train_rows, held_out = rows[: len(rows) - config.eval_holdout], rows[len(rows) - config.eval_holdout:]
    if not train_rows:
        raise ValueError(f"no training examples left in {config.data_dir} after holding out {config.eval_holdout}")
    eval_prompts = _eval_prompts(config, tokenizer, held_out)
    eos_ids = eos_token_ids(target_model, tokenizer)

    target_model.eval().requires_grad_(False)
    lm_head = target_model.get_output_embeddings()
    head_config = MedusaConfig(lm_head.weight.shape[1], target_model.config.get_text_config().vocab_size,
                               config.num_heads, config.num_layers, config.share_lm_head)
    heads = MedusaHeads(head_config, lm_head).to(lm_head.weight.device, torch.float32)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=0.0)
    start = 0
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if checkpoint is not None:
        start = _restore(checkpoint, heads, optimizer)
    heads, optimizer = accelerator.prepare(heads, optimizer)
    plain = accelerator.unwrap_model(heads)

    run = tracking.start_run(config.wandb_project, {**asdict(config), "resumed_from": start}, config.wandb, out_dir)
    need_logits = config.kd_weight > 0
    metrics_file = (out_dir / "metrics.jsonl").open("a")
    stats = None
    try:
        if start == 0 and eval_prompts and config.eval_every:
            stats = evaluate_tau(target_model, plain, eval_prompts, eos_ids, config.eval_max_new_tokens)
            tracking.log(run, _eval_metrics(stats), step=0)
            metrics_file.write(json.dumps({"step": 0, **_eval_metrics(stats)}) + "\n")
        for step in range(start, config.steps):
            heads.train()
            feats = [example_features(target_model, train_rows[i], config.seq_len, need_logits)
                     for i in batch_indices(step, config.batch_size, len(train_rows), config.seed)]
            hidden = torch.cat([f[0] for f in feats])  # [N, H]
            responses = torch.cat([f[1] for f in feats])  # [N]
            teacher = torch.cat([f[2] for f in feats]) if need_logits else None  # [N, V]
            loss, metrics = medusa_loss(heads(hidden), responses, [f[1].numel() for f in feats], teacher,
                                        config.kd_weight)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            done = step + 1
            if eval_prompts and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                stats = evaluate_tau(target_model, plain, eval_prompts, eos_ids, config.eval_max_new_tokens)
                metrics.update(_eval_metrics(stats))
            tracking.log(run, metrics, step=done)
            metrics_file.write(json.dumps({"step": done, **metrics}) + "\n")
            metrics_file.flush()
            if (config.save_every and done % config.save_every == 0) or done == config.steps:
                _save(out_dir / f"step_{done}", plain, optimizer, done)
        if stats is not None:
            tracking.log_acceptance_table(run, stats.acceptance_by_depth, stats.tau, step=config.steps)
    finally:
        metrics_file.close()
        tracking.finish(run)
    return out_dir / f"step_{config.steps}"


def _eval_metrics(stats: RequestStats) -> dict[str, float]:
    out = {"eval/tau": stats.tau}
    out.update({f"eval/acceptance_depth{d + 1}": a for d, a in enumerate(stats.acceptance_by_depth)})
    return out


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The per-step records of ``out_dir/metrics.jsonl`` (a resumed run appends to it)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""The training loop every drafter trainer shares: seeded batches, AdamW under ``accelerate``, evaluation with the
real verifier, W&B + ``metrics.jsonl`` logging, checkpoints and exact resume.

A trainer supplies a :class:`Trainee`: the module to train, a ``loss(step)`` giving ``(loss, metrics)`` for one
optimizer step, and ``drafter()`` building the inference drafter around the module for evaluation. Everything else
(what a checkpoint holds, when to evaluate, how tau is measured) is here, once.

Checkpoints: ``out_dir/step_N`` = the module's ``save_pretrained`` (what the drafters load) + ``trainer_state.pt``
(step, optimizer, RNG states). ``resume`` restores the latest one; since each step's batch depends only on
``(seed, step)`` (:func:`batch_indices`), a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.app import tracking
from specdec.checkpoint import read_checkpoint
from specdec.draft_vocab import frequent_tokens
from specdec.interfaces import Drafter
from specdec.stats import RequestStats
from specdec.target import eos_token_ids
from specdec.train.data import load_distillation_data
from specdec.train.evaluation import eval_metrics, evaluate_tau


@dataclass(frozen=True)
class LoopConfig:
    """Loop settings shared by the trainers.

    Attributes:
        out_dir: checkpoints (``step_N``), ``metrics.jsonl`` and the W&B run folder.
        steps / lr / weight_decay / grad_clip / warmup: AdamW optimizer steps, peak learning rate (linear warmup
            over ``warmup`` steps, then cosine decay to 10 %), decay, max gradient norm (0 = no clipping).
        eval_every / save_every: steps between verifier evaluations / checkpoints (0 = only at the end).
        eval_max_new_tokens: tokens generated per held-out prompt during evaluation.
        seed / wandb / wandb_project / resume: seeding, tracking, continue from the latest checkpoint.
    """

    out_dir: str
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 0
    eval_every: int = 200
    save_every: int = 0
    eval_max_new_tokens: int = 64
    seed: int = 0
    wandb: bool = True
    wandb_project: str = "specdec"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_max_new_tokens < 1:
            raise ValueError(f"steps and eval_max_new_tokens must be >= 1, got {self.steps}, "
                             f"{self.eval_max_new_tokens}")
        if self.lr <= 0 or min(self.weight_decay, self.grad_clip, self.warmup, self.eval_every,
                               self.save_every) < 0:
            raise ValueError("need lr > 0 and weight_decay, grad_clip, warmup, eval_every, save_every >= 0")


def load_module_state(module: torch.nn.Module, path: Path) -> None:
    """Load the weights of a :mod:`specdec.checkpoint` folder into ``module`` after checking its config (a drafter
    head with a dataclass ``config``)."""
    config, state = read_checkpoint(path)
    if config != json.loads(json.dumps(asdict(module.config))):
        raise ValueError(f"checkpoint {path} was made with {config}, this run wants {asdict(module.config)}")
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class Trainee:
    """What one trainer plugs into :func:`train_loop`.

    Attributes:
        module: the trainable drafter part (has ``save_pretrained``).
        loss: ``loss(step) -> (scalar loss tensor, metrics)`` for 0-indexed optimizer step ``step``.
        drafter: ``drafter(module) -> Drafter`` for the verifier evaluation (``module`` unwrapped, in eval mode).
        load: ``load(module, path)`` restores the module's weights from a ``save_pretrained`` folder.
        state: counters the trainer keeps across steps (e.g. training pairs seen); saved with every checkpoint and
            restored on resume, so a resumed run counts on from its checkpoint.
    """

    module: torch.nn.Module
    loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
    drafter: Callable[[torch.nn.Module], Drafter]
    load: Callable[[torch.nn.Module, Path], None] = load_module_state
    state: dict[str, float] = field(default_factory=dict)


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example ids of (0-indexed) ``step``: epoch-wise permutations seeded by ``(seed, epoch)``, so any step's
    batch is reproducible without replaying the ones before it (resume)."""
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[pos]))
    return out


@dataclass(frozen=True)
class TrainingData:
    """What every trainer starts from: training rows, held-out rows (their prompts join the evaluation), the
    target's EOS ids and, when asked for, the draft vocabulary (``[N]`` int64, :mod:`specdec.draft_vocab`)."""

    train: list[dict]
    held_out: list[dict]
    eos_ids: list[int]
    vocab_ids: torch.Tensor | None


def prepare_training(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     data_dir: str | Sequence[str], holdout: int, seed: int, draft_vocab_size: int = 0
                     ) -> TrainingData:
    """Seed everything, freeze the target, load ``data_dir`` and split off ``holdout`` rows; with
    ``draft_vocab_size`` the ``N`` most frequent training-response tokens (plus EOS) form the draft vocabulary."""
    set_seed(seed)
    target_model.eval().requires_grad_(False)
    data = load_distillation_data(data_dir).with_format("numpy", dtype=None)
    train, held_out = split_rows([data[i] for i in range(len(data))], holdout, data_dir)
    eos_ids = eos_token_ids(target_model, tokenizer)
    vocab_ids = None
    if draft_vocab_size:
        vocab = target_model.config.get_text_config().vocab_size
        vocab_ids = frequent_tokens((r["response_ids"] for r in train), draft_vocab_size, vocab, eos_ids)
    return TrainingData(train, held_out, eos_ids, vocab_ids)


def split_rows(rows: Sequence[Any], holdout: int, data_dir: str | Sequence[str]) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: the last ``holdout`` rows are held out for evaluation."""
    if holdout < 0:
        raise ValueError(f"eval_holdout must be >= 0, got {holdout}")
    train, held = list(rows[: len(rows) - holdout]), list(rows[len(rows) - holdout:]) if holdout else []
    if not train:
        raise ValueError(f"no training examples left in {data_dir} after holding out {holdout}")
    return train, held


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


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The ``step_N`` folder with a ``trainer_state.pt`` and the largest ``N``, or ``None``."""
    done = [p for p in Path(out_dir).glob("step_*") if (p / "trainer_state.pt").is_file() and p.name[5:].isdigit()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def save_state(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               counters: dict[str, float] | None = None) -> None:
    """``module.save_pretrained(path)`` + ``trainer_state.pt`` (step, optimizer, RNG states, the trainee's
    counters)."""
    module.save_pretrained(path)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "counters": dict(counters or {})},
               path / "trainer_state.pt")


def restore_state(path: Path, trainee: Trainee, optimizer: torch.optim.Optimizer) -> int:
    """Load a :func:`save_state` checkpoint into the trainee's module and counters, ``optimizer`` and the RNGs;
    returns its step."""
    trainee.load(trainee.module, path)
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    trainee.state.update(saved.get("counters", {}))
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return int(saved["step"])


def lr_factor(step: int, config: LoopConfig) -> float:
    """Learning-rate multiplier at 0-indexed ``step``: linear warmup, then cosine down to 0.1."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup) / span)))


def train_loop(trainee: Trainee, model: PreTrainedModel, eval_prompts: Sequence[Sequence[int]], eos_ids: Sequence[int],
               config: LoopConfig, run_config: dict[str, Any]) -> Path:
    """Run ``config.steps`` optimizer steps of ``trainee``; returns the final checkpoint ``out_dir/step_{steps}``.

    ``model`` is the frozen target (for evaluation); ``run_config`` (the trainer's resolved config) goes to W&B.
    """
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    module = trainee.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    start = 0
    checkpoint = latest_checkpoint(out_dir) if config.resume else None
    if checkpoint is not None:
        start = restore_state(checkpoint, trainee, optimizer)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    plain = accelerator.unwrap_model(wrapped)

    def evaluate() -> RequestStats:
        plain.eval()
        try:
            return evaluate_tau(model, trainee.drafter(plain), eval_prompts, eos_ids, config.eval_max_new_tokens)
        finally:
            plain.train()

    run = tracking.start_run(config.wandb_project, {**run_config, "resumed_from": start}, config.wandb, out_dir)
    stats = None
    with (out_dir / "metrics.jsonl").open("a") as metrics_file:
        try:
            if start == 0 and eval_prompts and config.eval_every:
                stats = evaluate()
                tracking.log(run, eval_metrics(stats), step=0)
                metrics_file.write(json.dumps({"step": 0, **eval_metrics(stats)}) + "\n")
            bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", unit="step")
            for step in bar:
                plain.train()
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, config)
                loss, metrics = trainee.loss(step)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if config.grad_clip:
                    metrics["train/grad_norm"] = float(accelerator.clip_grad_norm_(params, config.grad_clip))
                optimizer.step()
                metrics["train/lr"] = config.lr * lr_factor(step, config)
                done = step + 1
                if eval_prompts and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    stats = evaluate()
                    metrics.update(eval_metrics(stats))
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                **({"tau": f"{stats.tau:.2f}"} if stats is not None else {}))
                tracking.log(run, metrics, step=done)
                metrics_file.write(json.dumps({"step": done, **metrics}) + "\n")
                metrics_file.flush()
                if (config.save_every and done % config.save_every == 0) or done == config.steps:
                    save_state(out_dir / f"step_{done}", plain, optimizer, done, trainee.state)
            if stats is not None:
                tracking.log_acceptance_table(run, stats.acceptance_by_depth, stats.tau, step=config.steps)
        finally:
            tracking.finish(run)
    return out_dir / f"step_{config.steps}"


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The per-step records of ``out_dir/metrics.jsonl`` (a resumed run appends to it)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


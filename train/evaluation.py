"""What a trainer evaluates: the drafter shape and prompts of the verifier (tau) evaluation, run on the real engine.

Every trainer config carries an :class:`EvalConfig` (``evaluation``) with the trainer's own defaults; the training
loop (:func:`specdec.train.loop.train_loop`) calls :func:`evaluate_tau` every ``eval_every`` steps and logs
:func:`eval_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.app.prompts import encode_prompt
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Drafter
from specdec.stats import RequestStats
from specdec.target import TargetModel


@dataclass(frozen=True)
class EvalConfig:
    """The verifier evaluation of a training run.

    Attributes:
        tree / depth / budget / topk: the drafter's tree in the evaluation (trainers whose drafter has a fixed
            shape use only what applies: Medusa none, the draft LM ``depth``).
        prompts: extra evaluation prompts (strings, chat-templated, or token-id sequences).
        holdout: the last ``holdout`` dataset rows are not trained on; their prompts join the evaluation.
    """

    tree: str = "dynamic"
    depth: int = 5
    budget: int = 8
    topk: int = 4
    prompts: tuple[str | tuple[int, ...], ...] = ()
    holdout: int = 0

    def __post_init__(self) -> None:
        for name in ("depth", "budget", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation {name} must be >= 1, got {getattr(self, name)}")
        if self.holdout < 0:
            raise ValueError(f"eval_holdout must be >= 0, got {self.holdout}")


def eval_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | Sequence[int]],
                    held_out: Sequence[dict]) -> list[list[int]]:
    """Token ids of the evaluation prompts: ``prompts`` (strings are chat-templated) + the held-out rows'."""
    ids = [encode_prompt(tokenizer, p).tolist() if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return ids + [[int(t) for t in row["prompt_ids"]] for row in held_out]


@torch.no_grad()
def evaluate_tau(model: PreTrainedModel, drafter: Drafter, prompts: Sequence[Sequence[int]], eos_ids: Sequence[int],
                 max_new_tokens: int) -> RequestStats:
    """Greedy speculative decoding of every prompt with the real engine; the requests' combined stats (the same
    tau and acceptance by depth as inference, :mod:`specdec.stats`)."""
    target = TargetModel(model)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 80
    cache = target.new_cache(num_blocks=math.ceil(max_len / 16) + 2, block_size=16)
    engine = SpeculativeEngine(target, cache, drafter, eos_token_ids=eos_ids, max_tree_nodes=80)
    return RequestStats.combine([engine.generate(list(p), max_new_tokens).stats for p in prompts])


def eval_metrics(stats: RequestStats) -> dict[str, float]:
    """``eval/tau`` and ``eval/acceptance_depth{d}``."""
    out = {"eval/tau": stats.tau}
    out.update({f"eval/acceptance_depth{d + 1}": a for d, a in enumerate(stats.acceptance_by_depth)})
    return out

"""Target traces: what the acceptance simulator (:mod:`specdec.research.simulate`) replays instead of running the
target.

A :class:`Trace` holds, per prompt, the target's greedy trajectory and, at every position, the target's last hidden
state and top-K logits, from ONE recording per target and prompt set:

* the trajectory comes from the engine itself (``SpeculativeEngine`` with no drafter, greedy), run for
  ``max_new_tokens + lookahead`` tokens with EOS NOT stopping it: the ``lookahead`` tokens past the stop point (EOS
  or ``max_new_tokens``) are what verification would see when a draft runs past the end (the engine counts those
  accepted tokens in tau before it clips the output);
* hidden states and logits come from one teacher-forced forward of the unmodified HF model over prompt + trajectory.

Per prompt (``P`` prompt tokens, ``G = max_new_tokens + lookahead`` generated tokens, ``S = P + G`` in all):

==============  ===============  ===========================================================================
field           shape / dtype    meaning
==============  ===============  ===========================================================================
``tokens``      ``[S]`` int64    prompt then the greedy trajectory
``prompt_len``  int              ``P``
``stop``        int              generated tokens the engine emits (through the first EOS, at most ``max_new_tokens``)
``hidden``      ``[S-1, H]``     row ``j``: last hidden state (after the final norm) at position ``j``, the state that
                                 predicted ``tokens[j + 1]``; ``hidden_dtype`` (float16 by default)
``features``    ``[S-1, F*H]``   optional (``feature_layers``): HF ``hidden_states[i]`` of each of the ``F`` layers,
                                 concatenated, row ``j`` at position ``j`` (what EAGLE-3 reads); ``hidden_dtype``
``topk_values`` ``[G, K]`` fp32  the ``K`` largest logits at the positions predicting each generated token
``topk_ids``    ``[G, K]`` int64 their token ids (``topk_ids[i, 0] == tokens[P + i]`` unless a near-tie flipped)
``category``    str              the prompt's category (per-category figures)
==============  ===============  ===========================================================================

Size for SmolLM2-135M (``H = 576``) in float16 with ``K = 32``: about 1.4 kB per position (+ 3.4 kB with EAGLE-3's
three fused layers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.engine import SpeculativeEngine
from specdec.target import TargetModel

TRACE_VERSION = 1


@dataclass
class PromptTrace:
    """One prompt's recording (see the module docstring for the fields)."""

    tokens: torch.Tensor
    prompt_len: int
    stop: int
    hidden: torch.Tensor
    topk_values: torch.Tensor
    topk_ids: torch.Tensor
    category: str = "default"
    argmax_mismatches: int = 0  # teacher-forced argmax != recorded token (floating-point near-ties)
    features: torch.Tensor | None = None

    @property
    def generated(self) -> int:
        """``G``: recorded generated tokens, lookahead included."""
        return self.tokens.numel() - self.prompt_len


@dataclass
class Trace:
    """A recorded prompt set: ``prompts`` and the settings they were recorded with (``meta``)."""

    prompts: list[PromptTrace]
    meta: dict = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        return int(self.meta["max_new_tokens"])

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.meta["eos_token_ids"])

    def save(self, path: str | Path) -> None:
        """One ``torch.save`` file (plain tensors, lists and dicts: loads with ``weights_only=True``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": TRACE_VERSION, "meta": self.meta,
                "prompts": [dict(vars(p)) for p in self.prompts]}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(data, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"trace file not found: {path}")
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("version") != TRACE_VERSION:
            raise ValueError(f"{path} is not a specdec trace of version {TRACE_VERSION}")
        return cls([PromptTrace(**p) for p in data["prompts"]], data["meta"])


def drafter_rows(trace: Trace, p: PromptTrace, drafter, hidden_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The rows ``drafter`` is told at ``accept`` (as the engine passes them), ``None`` if it needs none: the fused
    ``features`` for a drafter with ``feature_layers`` (EAGLE-3), else the last hidden states. ``ValueError``
    naming the fix when the trace lacks the layers the drafter reads."""
    if drafter is None or not drafter.needs_hidden:
        return None
    layers = getattr(drafter, "feature_layers", None)
    rows = p.hidden
    if layers is not None:
        recorded = trace.meta.get("feature_layers")
        if recorded != [int(i) for i in layers] or p.features is None:
            raise ValueError(f"the drafter reads target layers {list(layers)} fused, the trace recorded "
                             f"{recorded or 'none'}: record with --feature-layers {','.join(map(str, layers))}")
        rows = p.features
    return (rows if hidden_dtype is None else rows.to(hidden_dtype)).to(device)


@torch.inference_mode()
def record_trace(target: TargetModel, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
                 eos_token_ids: Sequence[int] = (), categories: Sequence[str] | None = None, lookahead: int = 16,
                 topk: int = 32, hidden_dtype: torch.dtype = torch.float16, model_name: str | None = None,
                 num_blocks: int | None = None, feature_layers: Sequence[int] | None = None) -> Trace:
    """Record a :class:`Trace` of ``target`` on ``prompts`` (each ``[P]`` int64 token ids).

    ``lookahead`` bounds the deepest tree the trace can replay without a target forward: a step that would accept
    past ``max_new_tokens + lookahead`` recorded tokens is an error at replay time. ``hidden_dtype`` float16 halves
    the size; the exact-equality tests record in the target's own dtype. ``feature_layers`` (indices into HF
    ``hidden_states``, e.g. :func:`specdec.drafters.eagle3.fused_layers`) also records those layers' rows, for
    drafters that read fused features.
    """
    if max_new_tokens < 1 or lookahead < 0 or topk < 1:
        raise ValueError(f"need max_new_tokens >= 1, lookahead >= 0, topk >= 1; got {max_new_tokens}, "
                         f"{lookahead}, {topk}")
    categories = list(categories) if categories is not None else ["default"] * len(prompts)
    if len(categories) != len(prompts):
        raise ValueError(f"{len(categories)} categories for {len(prompts)} prompts")
    eos = frozenset(int(t) for t in eos_token_ids)
    total = max_new_tokens + lookahead
    longest = max(torch.as_tensor(p).numel() for p in prompts) + total
    blocks = num_blocks or -(-(longest + 1) // 16) + 1
    # no EOS: the trajectory runs on past the stop point (the lookahead)
    engine = SpeculativeEngine(target, target.new_cache(blocks, 16), None, eos_token_ids=(), max_tree_nodes=1)
    out: list[PromptTrace] = []
    t0 = time.perf_counter()
    for prompt, category in zip(prompts, categories, strict=True):
        ids = torch.as_tensor(prompt, dtype=torch.long).flatten().cpu()
        gen = engine.generate(ids, total).tokens
        stop = next((i + 1 for i, t in enumerate(gen[:max_new_tokens]) if t in eos), max_new_tokens)
        tokens = torch.cat([ids, torch.tensor(gen, dtype=torch.long)])
        res = target.model(tokens[None, :-1].to(target.device), output_hidden_states=True)
        hidden = res.hidden_states[-1][0]  # [S-1, H]
        features = None if feature_layers is None else torch.cat(
            [res.hidden_states[i][0] for i in feature_layers], dim=-1).to(hidden_dtype).cpu()
        logits = res.logits[0, ids.numel() - 1 :].float()  # [G, V]
        values, indices = logits.topk(min(topk, logits.shape[-1]), dim=-1)
        mismatches = int((logits.argmax(-1).cpu() != tokens[ids.numel() :]).sum())
        out.append(PromptTrace(tokens, ids.numel(), stop, hidden.to(hidden_dtype).cpu(), values.cpu(),
                               indices.cpu(), str(category), mismatches, features))
    meta = {"max_new_tokens": max_new_tokens, "lookahead": lookahead, "topk": topk,
            "eos_token_ids": sorted(eos), "hidden_dtype": str(hidden_dtype).removeprefix("torch."),
            "target_dtype": str(target.dtype).removeprefix("torch."), "vocab_size": target.vocab_size,
            "model": model_name, "record_s": time.perf_counter() - t0,
            "feature_layers": None if feature_layers is None else [int(i) for i in feature_layers]}
    return Trace(out, meta)

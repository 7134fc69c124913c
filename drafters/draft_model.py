"""Draft-model drafter: a small Hugging Face causal LM that shares the target's tokenizer proposes the tree.

The draft model runs through the same paged-KV tree forward as the target (:class:`specdec.target.TargetModel`),
with its own cache. Only real history tokens are ever committed to that cache: draft nodes are written at the tree
slots of the current step and overwritten by the next one, so a rejection leaves no stale draft KV (vLLM #14649).
Tokens the draft has not seen yet (the accepted drafts it did not expand, the bonus token, and the root) are caught
up in one chain forward at the start of the next ``propose``.

Tree shapes:

* ``"chain"``: ``depth`` tokens, the draft's argmax at temperature 0, sampled from its processed distribution at
  temperature > 0 and reported in ``Draft.probs`` (lossless speculative sampling);
* ``"dynamic"``: EAGLE-2-style best-first tree (:func:`specdec.tree_builders.best_first_tree`);
* a choices list: static shape, each node's children are its top-ranked tokens (:func:`choices_tree`).

Trees are deterministic top-k picks and verified as one-hot proposals (exact at any temperature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from specdec.attention import AttentionBackend
from specdec.drafters.common import PerSequence
from specdec.drafters.registry import Option, register
from specdec.interfaces import Draft, DraftInput
from specdec.sampling import SamplingParams, process_logits, sample
from specdec.target import TargetModel
from specdec.tree import TokenTree
from specdec.tree_builders import best_first_tree, choices_tree, union_tree


class DraftModelDrafter:
    """Drafts with any causal LM sharing the target's vocabulary (the engine checks ``vocab_size``).

    Args:
        model: the draft model (eval mode, same tokenizer as the target).
        tree: ``"chain"``, ``"dynamic"`` or a Medusa-style choices list.
        depth: draft depth (chain length; dynamic tree depth limit).
        budget: dynamic tree size, root included.
        topk: children per expanded node in the dynamic tree.
        num_blocks, block_size: the draft model's own KV cache.
        backend: attention backend (default as for the target).
    """

    needs_hidden = False

    def __init__(
        self,
        model: PreTrainedModel,
        tree: str | Sequence[Sequence[int]] = "chain",
        depth: int = 4,
        budget: int = 16,
        topk: int = 4,
        num_blocks: int = 512,
        block_size: int = 16,
        backend: AttentionBackend | None = None,
    ) -> None:
        if isinstance(tree, str) and tree not in ("chain", "dynamic"):
            raise ValueError(f"unknown tree shape {tree!r}; use 'chain', 'dynamic' or a choices list")
        if depth < 1 or budget < 1 or topk < 1:
            raise ValueError(f"depth, budget and topk must be positive, got {depth}, {budget}, {topk}")
        self.model = TargetModel(model, backend)
        self.cache = self.model.new_cache(num_blocks, block_size)
        self.vocab_size: int | None = self.model.vocab_size
        self.tree, self.depth, self.budget, self.topk = tree, depth, budget, topk
        # engine sequence id -> the draft cache's sequence id (its blocks are freed on release)
        self._seqs: PerSequence[int] = PerSequence(self.cache.add_sequence, self.cache.release)

    @property
    def max_nodes(self) -> int:
        if self.tree == "chain":
            return self.depth + 1
        if self.tree == "dynamic":
            return self.budget
        return len({tuple(c) for c in self.tree}) + 1

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        return [self._propose_one(item) for item in batch]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Nothing to do: accepted tokens are caught up at the next ``propose`` (no speculative commits)."""

    def release(self, seq_id: int) -> None:
        self._seqs.release(seq_id)

    # ------------------------------------------------------------------ drafting
    def _propose_one(self, item: DraftInput) -> Draft:
        dseq, history = self._seqs[item.seq_id], item.history
        root_logits = self._catch_up(dseq, history)
        root = int(history[-1])
        if self.tree == "chain":
            return self._chain(dseq, root, root_logits, item.sampling, item.generator)
        expand = self._expander(dseq, root, root_logits)
        if self.tree == "dynamic":
            tree, _ = best_first_tree(root, expand, self.budget, self.depth, self.topk)
            return Draft(tree)
        return Draft(choices_tree(root, self.tree, expand))

    def _catch_up(self, dseq: int, history: torch.Tensor) -> torch.Tensor:
        """Forward the history tokens the draft cache lacks; commit all but the root. Returns logits ``[V]``
        after the root."""
        cached = self.cache.num_tokens(dseq)
        pending = history[cached:]
        self.cache.reserve(dseq, pending.numel() + self.max_nodes)
        out = self.model.forward(self.cache, [dseq], [TokenTree.chain(pending)], last_only=True)
        self.cache.commit(dseq, range(pending.numel() - 1), keep_reserved=self.max_nodes)
        return out.logits[-1]

    def _forward_last(self, dseq: int, tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        """Logits ``[len(nodes), V]`` after the given nodes of ``tree`` (rooted at the uncommitted root)."""
        self.cache.reserve(dseq, tree.num_nodes)
        return self.model.forward(self.cache, [dseq], [tree]).logits[nodes]

    def _chain(
        self, dseq: int, root: int, logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator | None
    ) -> Draft:
        tokens, rows = [root], [torch.zeros_like(logits)]
        for d in range(self.depth):
            q = process_logits(logits, sampling)
            tokens.append(int(logits.argmax()) if sampling.greedy else int(sample(q, gen)))
            rows.append(q)
            if d + 1 < self.depth:
                logits = self._forward_last(dseq, TokenTree.chain(tokens), [-1])[0]
        tree = TokenTree.chain(tokens)
        return Draft(tree, None if sampling.greedy else torch.stack(rows))

    def _expander(self, dseq: int, root: int, root_logits: torch.Tensor):
        def expand(paths: list[tuple[int, ...]]) -> torch.Tensor:
            if paths == [()]:
                return root_logits.log_softmax(-1)[None]
            tree, index = union_tree(root, paths)
            return self._forward_last(dseq, tree, [index[p] for p in paths]).log_softmax(-1)

        return expand


def tree_shape(tree: str, depth: int | None, budget: int | None, topk: int | None) -> dict:
    """Constructor keywords of a tree-shaped drafter from its spec options (``None`` keeps the default)."""
    from specdec.tree_builders import default_choices

    sizes = {"depth": depth, "budget": budget, "topk": topk}
    shape = {"tree": default_choices() if tree == "static" else tree}
    return shape | {k: v for k, v in sizes.items() if v is not None}


@register("draft-model", help="a small causal LM sharing the target's tokenizer", options=(
    Option("path", str, None, "the draft model: a local folder or HF id"),
    Option("tree", str, "chain", "draft tree shape", ("chain", "dynamic", "static")),
    Option("depth", int, None, "draft depth"),
    Option("budget", int, None, "dynamic tree nodes, root included"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, tree="chain", depth=None, budget=None, topk=None) -> DraftModelDrafter:
    from transformers import AutoModelForCausalLM

    if path is None:
        raise ValueError("the draft-model drafter needs a model: --draft-model PATH (or draft-model:path=...)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=target.dtype).to(target.device).eval()
    except OSError as err:
        raise ValueError(f"unknown draft model {path!r}: {err}") from None
    return DraftModelDrafter(model, backend=target.backend, **tree_shape(tree, depth, budget, topk))

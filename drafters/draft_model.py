"""Draft-model drafter: a small Hugging Face causal LM that shares the target's tokenizer proposes the tree.

The draft model runs through the same paged-KV tree forward as the target (:class:`specdec.target.TargetModel`),
with its own cache. Only real history tokens are ever committed to that cache: draft nodes are written at the tree
slots of the current step and overwritten by the next one, so a rejection leaves no stale draft KV (vLLM #14649).
Tokens the draft has not seen yet (the accepted drafts it did not expand, the bonus token, and the root) are caught
up in one chain forward at the start of the next ``propose``.

Tree shapes:

* ``"chain"``: ``depth`` tokens, the draft's argmax at temperature 0, sampled from its processed distribution at
  temperature > 0 and reported in ``Draft.probs`` (lossless speculative sampling);
* ``"dynamic"``: EAGLE-2-style best-first tree, built for the whole batch by tensor ops
  (:class:`specdec.tree_builders.BestFirstBatch`, the same trees as :func:`specdec.tree_builders.best_first_tree`);
* a choices list: static shape, each node's children are its top-ranked tokens (:func:`choices_tree`).

Trees are deterministic top-k picks and verified as one-hot proposals (exact at any temperature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from specdec.attention import AttentionBackend, build_tree_batch
from specdec.drafters.common import GrowingTree, LevelTrees, PerSequence, best_first_drafts, level_batch, row_budgets
from specdec.drafters.registry import Option, register
from specdec.interfaces import Draft, DraftInput
from specdec.sampling import process_logits, sample
from specdec.target import TargetModel
from specdec.tree import TokenTree
from specdec.tree_builders import choices_steps, drive_batch


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

    @torch.inference_mode()
    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One catch-up forward for the whole batch, then one forward per tree level for the whole batch, each
        forwarding only that level's new nodes (they attend to the earlier levels' K/V in the draft cache)."""
        if not batch:
            return []
        dseqs = [self._seqs[item.seq_id] for item in batch]
        roots = [int(item.history[-1]) for item in batch]
        root_logits = self._catch_up(dseqs, [item.history for item in batch])  # [B, V]
        if self.tree == "chain":
            return self._chains(dseqs, roots, root_logits, batch)
        if self.tree == "dynamic":
            return self._dynamic(dseqs, roots, root_logits, row_budgets(batch, self.budget))
        grown = [GrowingTree(r) for r in roots]
        scores: list[dict[tuple[int, ...], torch.Tensor]] = [{(): row.log_softmax(-1)} for row in root_logits]

        def expand_batch(requests):
            need = [i for i, r in enumerate(requests) if r is not None and any(p not in scores[i] for p in r)]
            for i in need:
                grown[i].add(requests[i])
            if need:
                logits = self._forward_new([dseqs[i] for i in need], [grown[i] for i in need])
                for i, rows in zip(need, logits, strict=True):
                    new_paths = sorted(grown[i].index, key=grown[i].index.__getitem__)[-rows.shape[0]:]
                    scores[i].update(zip(new_paths, rows.log_softmax(-1), strict=True))
            return [None if r is None else torch.stack([scores[i][p] for p in r]) for i, r in enumerate(requests)]

        return [Draft(t) for t in drive_batch([choices_steps(r, self.tree) for r in roots], expand_batch)]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Nothing to do: accepted tokens are caught up at the next ``propose`` (no speculative commits)."""

    def release(self, seq_id: int) -> None:
        self._seqs.release(seq_id)

    # ------------------------------------------------------------------ drafting
    def _catch_up(self, dseqs: list[int], histories: list[torch.Tensor]) -> torch.Tensor:
        """Forward the history tokens each draft sequence lacks (one ragged forward); commit all but the roots.
        Returns the logits after each root ``[B, V]``."""
        pending = [h[self.cache.num_tokens(d) :] for d, h in zip(dseqs, histories, strict=True)]
        for d, p in zip(dseqs, pending, strict=True):
            self.cache.reserve(d, p.numel() + self.max_nodes)
        out = self.model.forward(self.cache, dseqs, [TokenTree.chain(p) for p in pending], last_only=True)
        for d, p in zip(dseqs, pending, strict=True):
            self.cache.advance(d, p.numel() - 1, keep_reserved=self.max_nodes)
        return out.logits

    def _dynamic(self, dseqs: list[int], roots: list[int], root_logits: torch.Tensor,
                 budgets: list[int]) -> list[Draft]:
        """EAGLE-2 best-first trees (:func:`best_first_drafts`): each level's new frontier is one forward of the
        draft model."""
        def forward_level(grown: LevelTrees, builder) -> torch.Tensor:
            batch = level_batch(self.cache, dseqs, grown, builder.frontier_tokens, builder.frontier_parent)
            logits = self.model.run(self.cache, batch).logits
            return logits.reshape(*builder.frontier_tokens.shape, -1).log_softmax(-1)

        return best_first_drafts(roots, budgets, self.depth, self.topk, root_logits[:, None].log_softmax(-1),
                                 forward_level)

    def _forward_new(self, dseqs: list[int], grown: list[GrowingTree]) -> list[torch.Tensor]:
        """Logits after each tree's new nodes (``[pending_b, V]`` per tree), one forward with tree offsets."""
        trees = [g.tree() for g in grown]
        for d, t in zip(dseqs, trees, strict=True):
            self.cache.reserve(d, t.num_nodes)
        batch = build_tree_batch(self.cache, dseqs, trees, offsets=[g.written for g in grown])
        logits = self.model.run(self.cache, batch).logits
        out, at = [], 0
        for g in grown:
            n = g.pending()
            out.append(logits[at : at + n])
            at += n
            g.written = len(g.tokens)
        return out

    def _chains(self, dseqs: list[int], roots: list[int], logits: torch.Tensor,
                batch: Sequence[DraftInput]) -> list[Draft]:
        """``depth``-token chains for every sequence: argmax at temperature 0, else sampled from the processed
        draft distribution with the request's own generator (reported in ``Draft.probs``)."""
        grown = [GrowingTree(r) for r in roots]
        rows: list[list[torch.Tensor]] = [[torch.zeros_like(logits[0])] for _ in roots]
        for d in range(self.depth):
            for i, item in enumerate(batch):
                q = process_logits(logits[i], item.sampling)
                tok = int(logits[i].argmax()) if item.sampling.greedy else int(sample(q, item.generator))
                grown[i].add([tuple(grown[i].tokens[1:]) + (tok,)])
                rows[i].append(q)
            if d + 1 < self.depth:
                logits = torch.cat(self._forward_new(dseqs, grown))  # one new node per sequence
        return [Draft(TokenTree.chain(g.tokens), None if item.sampling.greedy else torch.stack(r))
                for g, r, item in zip(grown, rows, batch, strict=True)]


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

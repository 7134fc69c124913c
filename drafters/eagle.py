"""EAGLE-style feature drafter: a one-layer head predicts the target's next last-hidden-state ("feature").

The head's input at history position ``t`` is the pair (target feature ``h_t``, token ``x_{t+1}``):
``fc(cat(embed(x_{t+1}), h_t))`` goes through ONE decoder layer of the target's own architecture (the library class,
e.g. ``LlamaDecoderLayer``, RoPE'd by the library's rotary embedding), whose output is the predicted feature
``h_{t+1}``; the target's LM head turns it into next-token logits (Li et al., 2024, "EAGLE"). The embedding and the
LM head are the target's (shared, never saved).

The layer attends through the paged tree attention (:mod:`specdec.attention`) with its own one-layer cache. As in
:mod:`specdec.drafters.draft_model`, only real history pairs are committed: pairs the head has not seen yet are
caught up in one chain forward at ``propose``; the last one (feature of the token before the root, root) is the
tree's root node, whose predicted feature gives the depth-1 children. Deeper draft nodes take their parent's
PREDICTED feature with their own token; each tree level re-forwards the union tree without committing.

Tree shapes: ``"chain"`` (``depth`` tokens; argmax at temperature 0, sampled from the processed head distribution
above and reported in ``Draft.probs``) and ``"dynamic"`` (EAGLE-2 best-first, deterministic, ``probs=None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specdec.attention import AttentionBackend, ForwardContext, build_tree_batch, select_backend
from specdec.drafters.common import GrowingTree, LevelTrees, PerSequence, best_first_drafts, level_batch, row_budgets
from specdec.drafters.eagle_head import EagleConfig, EagleHead
from specdec.drafters.registry import SHIPPED, Option, register, resolve_path
from specdec.interfaces import Draft, DraftInput
from specdec.kv_cache import PagedKVCache
from specdec.packed_linear import pack_linears
from specdec.sampling import process_logits, sample
from specdec.tree import TokenTree

if TYPE_CHECKING:
    from specdec.target import TargetModel

__all__ = ["EagleConfig", "EagleDrafter", "EagleHead"]  # the head lives in eagle_head.py; imported from here too

Path_ = tuple[int, ...]


class EagleDrafter:
    """Drafts with an :class:`EagleHead` on the target's features (``needs_hidden = True``).

    Args:
        head: the head (on the target's device).
        tree: ``"chain"`` or ``"dynamic"``.
        depth: chain length / dynamic depth limit.
        budget, topk: dynamic tree size (root included) and children per expanded node.
        num_blocks, block_size: the head's own one-layer KV cache.
        backend: attention backend (default: the target's, via :meth:`untrained` / :meth:`from_pretrained`).
    """

    needs_hidden = True

    def __init__(self, head: EagleHead, tree: str = "chain", depth: int = 4, budget: int = 16, topk: int = 4,
                 num_blocks: int = 512, block_size: int = 16, backend: AttentionBackend | None = None) -> None:
        if tree not in ("chain", "dynamic"):
            raise ValueError(f"unknown tree shape {tree!r}; use 'chain' or 'dynamic'")
        if depth < 1 or budget < 1 or topk < 1:
            raise ValueError(f"depth, budget and topk must be positive, got {depth}, {budget}, {topk}")
        self.head = head.eval()
        # float32 CPU: the head's linears run this machine's fastest kernel, bfloat16 where it pays (a draft's
        # precision never touches what is accepted; SPECDEC_DRAFT_PRECISION=float32 keeps it exact); same Parameters
        pack_linears(head, approximate=True)
        w = head.fc.weight
        self.backend = backend or select_backend(device=w.device)
        cfg = head.layer_config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = PagedKVCache(1, kv_heads, head_dim, num_blocks, block_size, dtype=w.dtype, device=w.device,
                                  move_kv=self.backend.move_kv)
        self.vocab_size: int | None = head.config.vocab_size
        self.tree, self.depth, self.budget, self.topk = tree, depth, budget, topk
        # engine sequence id -> the head cache's sequence id (its blocks are freed on release)
        self._seqs: PerSequence[int] = PerSequence(self.cache.add_sequence, self.cache.release)
        self._feats: dict[int, torch.Tensor] = {}  # [P, H] target features of the pairs not yet committed

    @classmethod
    def untrained(cls, target: TargetModel, **kwargs) -> EagleDrafter:
        """A randomly initialised head sized from ``target``; ``kwargs`` go to the constructor."""
        kwargs.setdefault("backend", target.backend)
        return cls(EagleHead(EagleConfig.from_target(target), target), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, target: TargetModel, **kwargs) -> EagleDrafter:
        """A head saved with :meth:`EagleHead.save_pretrained`; ``kwargs`` go to the constructor."""
        kwargs.setdefault("backend", target.backend)
        return cls(EagleHead.from_pretrained(path, target), **kwargs)

    @property
    def max_nodes(self) -> int:
        return self.depth + 1 if self.tree == "chain" else self.budget

    # ------------------------------------------------------------------ protocol
    @torch.inference_mode()
    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One draft per sequence; ``history [L]`` int64, last token = root (see the module docstring). One
        catch-up forward for the batch, then one head forward per tree level for the batch, each forwarding only
        that level's new nodes."""
        if not batch:
            return []
        missing = [item.seq_id for item in batch if item.seq_id not in self._feats]
        if missing:
            raise ValueError(f"EagleDrafter has no features for sequence {missing[0]}: call accept(seq_id, tokens, "
                             "hidden) with the target's hidden states after prefill first")
        dseqs = [self._seqs[item.seq_id] for item in batch]
        roots = [int(item.history[-1]) for item in batch]
        root_out = self._catch_up(batch, dseqs)  # [B, H]
        if self.tree == "dynamic":
            return self._dynamic(dseqs, roots, root_out, row_budgets(batch, self.budget))
        grown = [GrowingTree(r) for r in roots]
        pred: list[dict[Path_, torch.Tensor]] = [{(): row} for row in root_out]
        return self._chains(batch, dseqs, grown, pred)

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Queue the target's features ``hidden [S, H]`` (row ``j`` predicted the token after span token ``j``);
        with the history's tokens they form the pairs caught up at the next ``propose``."""
        if hidden is None or hidden.ndim != 2 or hidden.shape[0] == 0:
            raise ValueError("EagleDrafter.accept needs the target's hidden states [S, H] (needs_hidden is True)")
        rows = hidden.detach().to(self.head.fc.weight.dtype)
        old = self._feats.get(seq_id)
        self._feats[seq_id] = rows.clone() if old is None else torch.cat([old, rows])

    def release(self, seq_id: int) -> None:
        self._seqs.release(seq_id)
        self._feats.pop(seq_id, None)

    # ------------------------------------------------------------------ drafting
    def _catch_up(self, batch: Sequence[DraftInput], dseqs: list[int]) -> torch.Tensor:
        """Feed each sequence's pending pairs ``(h_t, x_{t+1})`` (one ragged forward for the batch); commit all
        but the last (the root pair, the tree's node 0). Returns each root's predicted feature ``[B, H]``."""
        dev = self.cache.device
        chains, feats = [], []
        for item, dseq in zip(batch, dseqs, strict=True):
            pending = self._feats[item.seq_id]  # pairs committed .. committed + P - 1
            tokens = item.history[self.cache.num_tokens(dseq) + 1 :].to(dev)
            if pending.shape[0] != tokens.numel() or tokens.numel() == 0:
                raise ValueError(f"sequence {item.seq_id}: {pending.shape[0]} pending features for {tokens.numel()} "
                                 "pending history tokens; every history token after the first needs the target's "
                                 "feature")
            self.cache.reserve(dseq, tokens.numel() + self.max_nodes)
            chains.append(TokenTree.chain(tokens))
            feats.append(pending)
        out = self._run(build_tree_batch(self.cache, dseqs, chains), torch.cat(feats))
        ends = torch.tensor([c.num_nodes for c in chains]).cumsum(0) - 1
        for item, dseq, chain, f in zip(batch, dseqs, chains, feats, strict=True):
            self.cache.advance(dseq, chain.num_nodes - 1, keep_reserved=self.max_nodes)
            self._feats[item.seq_id] = f[-1:]  # the root pair's input feature stays pending
        return out[ends.to(out.device)]

    def _run(self, batch, features: torch.Tensor) -> torch.Tensor:
        """Head outputs ``[T, H]`` for a prepared batch with input ``features [T, H]``; writes K/V, commits nothing."""
        ctx = ForwardContext(self.cache, batch, self.backend, self.backend.plan(batch, self.cache.block_size))
        return self.head(features, batch.input_ids, batch.positions, ctx)

    def _forward_new(self, dseqs: list[int], grown: list[GrowingTree], pred: list[dict[Path_, torch.Tensor]]) -> None:
        """Forward each tree's new nodes (input: the parent's predicted feature) with tree offsets; store their
        predicted features in ``pred``."""
        if not dseqs:
            return
        trees = [g.tree() for g in grown]
        feats, new_paths = [], []
        for dseq, g, t, p in zip(dseqs, grown, trees, pred, strict=True):
            self.cache.reserve(dseq, t.num_nodes)
            paths = sorted(g.index, key=g.index.__getitem__)[g.written :]
            new_paths.append(paths)
            feats += [p[q[:-1]] for q in paths]
        out = self._run(build_tree_batch(self.cache, dseqs, trees, offsets=[g.written for g in grown]),
                        torch.stack(feats))
        at = 0
        for g, p, paths in zip(grown, pred, new_paths, strict=True):
            p.update(zip(paths, out[at : at + len(paths)], strict=True))
            at += len(paths)
            g.written = len(g.tokens)

    def _dynamic(self, dseqs: list[int], roots: list[int], root_out: torch.Tensor, budgets: list[int]) -> list[Draft]:
        """EAGLE-2 best-first trees (:func:`best_first_drafts`): each level's new frontier is one head forward
        whose inputs are the parents' predicted features."""
        feats = root_out[:, None]  # [B, F, H]: the frontier's predicted features (F = 1: the root)

        def forward_level(grown: LevelTrees, builder) -> torch.Tensor:
            nonlocal feats
            parent = builder.frontier_parent.to(feats.device)
            inputs = feats.gather(1, parent[..., None].expand(-1, -1, feats.shape[-1]))
            batch = level_batch(self.cache, dseqs, grown, builder.frontier_tokens, builder.frontier_parent)
            feats = self._run(batch, inputs.reshape(-1, inputs.shape[-1])).reshape(inputs.shape)
            return self.head.logits(feats).log_softmax(-1)

        return best_first_drafts(roots, budgets, self.depth, self.topk, self.head.logits(feats).log_softmax(-1),
                                 forward_level, getattr(self.head, "vocab_ids", None))

    def _chains(self, batch: Sequence[DraftInput], dseqs: list[int], grown: list[GrowingTree],
                pred: list[dict[Path_, torch.Tensor]]) -> list[Draft]:
        """``depth``-token chains: argmax at temperature 0, else sampled from the processed head distribution with
        the request's own generator (reported in ``Draft.probs``)."""
        v = self.head.config.vocab_size
        rows = [[torch.zeros(v, dtype=self.head.fc.weight.dtype, device=self.cache.device)] for _ in batch]
        for d in range(self.depth):
            for i, item in enumerate(batch):
                path = tuple(grown[i].tokens[1:])
                logits = self.head.full_logits(pred[i][path])  # [V] (one row per call: trainers' tests hook it)
                if item.sampling.greedy:  # no processed distribution needed: it is never reported
                    tok = int(logits.argmax())
                else:
                    q = process_logits(logits, item.sampling)
                    tok = int(sample(q, item.generator))
                    rows[i].append(q.to(rows[i][0].dtype))
                grown[i].add([path + (tok,)])
            if d + 1 < self.depth:
                self._forward_new(dseqs, grown, pred)
        return [Draft(TokenTree.chain(g.tokens), None if item.sampling.greedy else torch.stack(r))
                for g, r, item in zip(grown, rows, batch, strict=True)]


# The shipped heads' fastest dynamic tree on the 2-core CPU, measured on tuning prompts (docs/results/session12):
# ``eagle:path=shipped,tree=dynamic`` and ``eagle3:path=shipped`` take it where no size is given.
SHIPPED_TREE = {"budget": 6, "depth": 3}


def tree_shape(path: str | None, tree: str, depth: int | None, budget: int | None, topk: int | None) -> dict:
    """Constructor keywords of a registry spec: the sizes given (0 too: it reaches the constructor's check), and for
    a shipped head's dynamic tree ``SHIPPED_TREE`` where a size is not given."""
    given = {k: v for k, v in {"depth": depth, "budget": budget, "topk": topk}.items() if v is not None}
    return {"tree": tree, **(SHIPPED_TREE if path == SHIPPED and tree == "dynamic" else {}), **given}


@register("eagle", help="EAGLE-style feature head (one decoder layer over the target's features)", options=(
    Option("path", str, None, "a trained head (a folder; 'shipped' = trained for the embedded SmolLM2)"),
    Option("tree", str, "chain", "draft tree shape", ("chain", "dynamic")),
    Option("depth", int, None, "draft depth (default 4; a dynamic tree with path=shipped: 3)"),
    Option("budget", int, None, "dynamic tree nodes, root included (default 16; 6 with path=shipped)"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, tree="chain", depth=None, budget=None, topk=None) -> EagleDrafter:
    shape = tree_shape(path, tree, depth, budget, topk)
    path = resolve_path("eagle", path)
    if path is not None:
        return EagleDrafter.from_pretrained(path, target, backend=target.backend, **shape)
    return EagleDrafter.untrained(target, backend=target.backend, **shape)

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

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig

from specdec.attention import ATTENTION_NAME, AttentionBackend, ForwardContext, build_tree_batch, select_backend
from specdec.checkpoint import read_checkpoint, save_checkpoint
from specdec.draft_vocab import check_vocab_ids, expand_logits
from specdec.drafters.common import GrowingTree, PerSequence
from specdec.drafters.registry import Option, register, resolve_path
from specdec.interfaces import Draft, DraftInput
from specdec.kv_cache import PagedKVCache
from specdec.sampling import process_logits, sample
from specdec.tree import TokenTree
from specdec.tree_builders import best_first_steps, drive_batch

if TYPE_CHECKING:
    from specdec.target import TargetModel


Path_ = tuple[int, ...]


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE head.

    Attributes:
        hidden_size: ``H``, the target's hidden size.
        vocab_size: ``V``, the target's vocabulary size.
        layer_config: the target's text config as a JSON dict (``model_type`` included): rebuilds the decoder layer.
        draft_vocab_size: ``N``, the head scores only ``N`` target tokens (:mod:`specdec.draft_vocab`, rows
            ``vocab_ids`` of the target's LM head; the ids are saved as the ``vocab_ids`` buffer); 0 = all.
    """

    hidden_size: int
    vocab_size: int
    layer_config: dict[str, Any] = field(default_factory=dict)
    draft_vocab_size: int = 0

    @classmethod
    def from_target(cls, target: TargetModel) -> EagleConfig:
        cfg = target.model.config.get_text_config()
        return cls(cfg.hidden_size, cfg.vocab_size, json.loads(cfg.to_json_string(use_diff=False)))

    def text_config(self):
        """A fresh transformers config object for the layer (its own object: the head switches its attention)."""
        d = dict(self.layer_config)
        d.pop("transformers_version", None)
        return AutoConfig.for_model(d.pop("model_type"), **d)


class EagleHead(nn.Module):
    """``fc = Linear(2H, H)`` then one decoder layer; predicts the next feature.

    Args:
        config: sizes and the layer's config.
        target: supplies the input embeddings and LM head (used, never registered or saved) and the decoder-layer
            and rotary-embedding classes; the head is built on the target's device and dtype.
        vocab_ids: ``[N]`` int64, the draft vocabulary; required iff ``config.draft_vocab_size`` (``N``).
    """

    def __init__(self, config: EagleConfig, target: TargetModel, vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        embed, lm_head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
        if tuple(lm_head.weight.shape) != (config.vocab_size, config.hidden_size):
            raise ValueError(f"EAGLE head needs an LM head of shape {(config.vocab_size, config.hidden_size)}, "
                             f"the target's is {tuple(lm_head.weight.shape)}")
        if (vocab_ids is None) != (config.draft_vocab_size == 0) or (
                vocab_ids is not None and vocab_ids.numel() != config.draft_vocab_size):
            raise ValueError(f"draft_vocab_size={config.draft_vocab_size} needs exactly that many vocab_ids")
        decoder = target.model.get_decoder()
        layer_cls, rotary_cls = type(decoder.layers[0]), type(decoder.rotary_emb)
        self.config = config
        self.layer_config = config.text_config()
        factory = {"dtype": lm_head.weight.dtype, "device": lm_head.weight.device}
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, **factory)
        self.layer = layer_cls(self.layer_config, layer_idx=0).to(**factory)
        self.rotary = rotary_cls(config=self.layer_config).to(lm_head.weight.device)  # inv_freq keeps float32
        if vocab_ids is not None:
            vocab_ids = check_vocab_ids(vocab_ids.to(lm_head.weight.device), config.vocab_size)
        self.register_buffer("vocab_ids", vocab_ids)
        # Shared with the target, so not submodules: the embedding and the LM head's (draft-vocabulary) rows.
        object.__setattr__(self, "embed_tokens", embed)
        weight = lm_head.weight.detach()
        object.__setattr__(self, "proj_weight", weight if vocab_ids is None else weight[vocab_ids])

    @contextlib.contextmanager
    def _attention(self, name: str) -> Iterator[None]:
        cfg = self.layer.self_attn.config  # the attention module reads its own config object
        previous = cfg._attn_implementation
        cfg._attn_implementation = name
        try:
            yield
        finally:
            cfg._attn_implementation = previous

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                specdec: ForwardContext) -> torch.Tensor:
        """Predicted features ``[T, H]`` (head dtype) for pairs ``features [T, H]`` float, ``tokens [T]`` int64
        (the token after each feature's), at RoPE ``positions [T]`` int64; K/V go to ``specdec``'s cache."""
        return self.forward_with(features[None], tokens[None], positions[None], ATTENTION_NAME, specdec=specdec)[0]

    def forward_with(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, attention: str,
                     **attention_kwargs: Any) -> torch.Tensor:
        """Batched form of :meth:`forward` through any function registered with transformers'
        ``AttentionInterface`` (the trainer's multi-step mask, for one): ``features [B, T, H]``, ``tokens`` and
        ``positions [B, T]`` int64 -> ``[B, T, H]``; ``attention_kwargs`` reach the attention function."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.embed_tokens(tokens).to(dtype), features.to(dtype)], dim=-1))
        with self._attention(attention):
            out = self.layer(x, attention_mask=None, position_ids=positions,
                             position_embeddings=self.rotary(x, positions), use_cache=False, **attention_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` next-token logits over the draft vocabulary (``N = V`` without one) from ``features
        [..., H]`` via the target's LM head rows. Target features give the target's own logits on those rows."""
        return nn.functional.linear(features.to(self.proj_weight.dtype), self.proj_weight)

    def full_logits(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` over the whole vocabulary ``[..., V]`` (``-inf`` outside the draft vocabulary)."""
        return expand_logits(self.logits(features), self.vocab_ids, self.config.vocab_size)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fc + layer; no embedding, no LM head) to ``path``."""
        save_checkpoint(self, self.config, path, kind="eagle")

    @classmethod
    def from_pretrained(cls, path: str | Path, target: TargetModel) -> EagleHead:
        """Load a head saved by :meth:`save_pretrained` onto ``target`` (cast to its dtype; strict key check)."""
        config, state = read_checkpoint(path, kind="eagle")
        head = cls(EagleConfig(**config), target, state.get("vocab_ids"))
        head.load_state_dict(state, strict=True)
        return head.eval()


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
        grown = [GrowingTree(r) for r in roots]
        pred: list[dict[Path_, torch.Tensor]] = [{(): row} for row in root_out]
        if self.tree == "chain":
            return self._chains(batch, dseqs, grown, pred)

        def expand_batch(requests):
            need = [i for i, r in enumerate(requests) if r is not None and any(p not in pred[i] for p in r)]
            for i in need:
                grown[i].add(requests[i])
            self._forward_new([dseqs[i] for i in need], [grown[i] for i in need], [pred[i] for i in need])
            return [None if r is None else self.head.full_logits(torch.stack([pred[i][p] for p in r])).log_softmax(-1)
                    for i, r in enumerate(requests)]

        builders = [best_first_steps(r, self.budget, self.depth, self.topk) for r in roots]
        return [Draft(tree) for tree, _ in drive_batch(builders, expand_batch)]

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

    def _chains(self, batch: Sequence[DraftInput], dseqs: list[int], grown: list[GrowingTree],
                pred: list[dict[Path_, torch.Tensor]]) -> list[Draft]:
        """``depth``-token chains: argmax at temperature 0, else sampled from the processed head distribution with
        the request's own generator (reported in ``Draft.probs``)."""
        v = self.head.config.vocab_size
        rows = [[torch.zeros(v, dtype=self.head.fc.weight.dtype, device=self.cache.device)] for _ in batch]
        for d in range(self.depth):
            for i, item in enumerate(batch):
                path = tuple(grown[i].tokens[1:])
                logits = self.head.full_logits(pred[i][path])
                q = process_logits(logits, item.sampling)
                tok = int(logits.argmax()) if item.sampling.greedy else int(sample(q, item.generator))
                grown[i].add([path + (tok,)])
                rows[i].append(q.to(rows[i][0].dtype))
            if d + 1 < self.depth:
                self._forward_new(dseqs, grown, pred)
        return [Draft(TokenTree.chain(g.tokens), None if item.sampling.greedy else torch.stack(r))
                for g, r, item in zip(grown, rows, batch, strict=True)]


@register("eagle", help="EAGLE-style feature head (one decoder layer over the target's features)", options=(
    Option("path", str, None, "a trained head (a folder; 'shipped' = trained for the embedded SmolLM2)"),
    Option("tree", str, "chain", "draft tree shape", ("chain", "dynamic")),
    Option("depth", int, None, "draft depth"),
    Option("budget", int, None, "dynamic tree nodes, root included"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, tree="chain", depth=None, budget=None, topk=None) -> EagleDrafter:
    sizes = {"depth": depth, "budget": budget, "topk": topk}
    shape = {"tree": tree, **{k: v for k, v in sizes.items() if v is not None}}
    path = resolve_path("eagle", path)
    if path is not None:
        return EagleDrafter.from_pretrained(path, target, backend=target.backend, **shape)
    return EagleDrafter.untrained(target, backend=target.backend, **shape)

"""The verifier as a library call, for servers that own their scheduler and their paged KV cache.

A server hands over a batch of token trees on top of its own cache; specdec runs ONE target forward over them
(writing the trees' K/V into the server's cache at ``context_len + node``), accepts, and returns fixed-shape
results plus the KV moves that compact each accepted path. The server applies the moves (:func:`apply_kv_moves`)
and advances its own context lengths by ``accept_len + 1``; the bonus token is the next root (not in the cache).

Cache layout: per layer ``k, v [num_blocks, block_size, kv_heads, head_dim]``, any strides with a unit last
stride and K and V strided alike (so ``kv[0], kv[1]`` of vLLM's ``[2, NB, BS, H, D]`` and ``kv[:, 0], kv[:, 1]``
of FlashInfer's ``[NB, 2, BS, H, D]`` both work). Flat slot ``s`` is block ``s // block_size``, row
``s % block_size``. The server must have blocks in ``block_tables`` for positions ``[0, context_len + n_b)``.

Example (see ``tests/test_verify_api.py`` for a whole scheduler loop)::

    verifier = Verifier(TargetModel(model))
    out = verifier.verify(ServerCache(layers, block_size=16), block_tables, context_lens,
                          tokens, parents, cu_q, sampling=[SamplingParams()] * B)
    apply_kv_moves(layers, out.moves)
    context_lens += out.accept_len + 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.acceptance import tree_rejection_sample
from specdec.acceptance_batch import PaddedTrees, greedy_accept_batch
from specdec.attention import tree_batch
from specdec.sampling import GREEDY, SamplingParams, process_logits
from specdec.target import TargetModel
from specdec.tree import TokenTree

LayerKV = tuple[torch.Tensor, torch.Tensor]


class ServerCache:
    """A server's per-layer K/V tensors seen through the interface :meth:`TargetModel.run` writes and reads.

    ``layers[l] = (k, v)``, each ``[num_blocks, block_size, kv_heads, head_dim]`` (strided views allowed)."""

    def __init__(self, layers: Sequence[LayerKV], block_size: int) -> None:
        if not layers:
            raise ValueError("need the K/V tensors of at least one layer")
        for i, (k, v) in enumerate(layers):
            if k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride() or k.stride(-1) != 1:
                raise ValueError(f"layer {i}: K and V must be [num_blocks, block_size, kv_heads, head_dim] with "
                                 f"equal strides and a unit last stride, got {tuple(k.shape)} strides {k.stride()} "
                                 f"and {tuple(v.shape)} strides {v.stride()}")
            if k.shape[1] != block_size:
                raise ValueError(f"layer {i}: block size {k.shape[1]} differs from block_size={block_size}")
        self.layers, self.block_size = list(layers), block_size

    def layer_kv(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [T, Hkv, D]`` at flat slots ``slot_mapping [T]`` (in place, any strides)."""
        kc, vc = self.layers[layer]
        block, row = slot_mapping // self.block_size, slot_mapping % self.block_size
        kc[block, row] = k.to(kc.dtype)
        vc[block, row] = v.to(vc.dtype)


@dataclass(frozen=True)
class KVMoves:
    """Copy flat slot ``src[m]`` to ``dst[m]`` in every layer (``[M]`` int64 each; gather all, then scatter)."""

    src: torch.Tensor
    dst: torch.Tensor


@dataclass(frozen=True)
class VerifyOutput:
    """``accept_len [B]`` int64; ``tokens [B, D + 1]`` accepted draft tokens then the bonus token, -1 padded;
    ``path [B, D + 1]`` accepted node indices (``path[:, 0] == 0``), -1 padded; ``moves``: KV compaction."""

    accept_len: torch.Tensor
    tokens: torch.Tensor
    path: torch.Tensor
    moves: KVMoves


def apply_kv_moves(layers: Sequence[LayerKV], moves: KVMoves) -> None:
    """Apply :class:`KVMoves` to a server's per-layer caches (alias-safe: every source is read first)."""
    if moves.src.numel() == 0:
        return
    for k, v in layers:
        bs = k.shape[1]
        sb, sr, db, dr = moves.src // bs, moves.src % bs, moves.dst // bs, moves.dst % bs
        for c in (k, v):
            c[db, dr] = c[sb, sr].clone()


class Verifier:
    """Tree verification over a server's cache with one target forward per call."""

    def __init__(self, target: TargetModel) -> None:
        self.target = target

    @torch.inference_mode()
    def prefill(self, cache: ServerCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                tokens: torch.Tensor, cu_q: torch.Tensor) -> torch.Tensor:
        """Write the K/V of prompt chunks ``tokens [T]`` (chunk ``b`` = ``tokens[cu_q[b]:cu_q[b+1]]`` on top of
        ``context_lens[b]`` committed tokens) and return the next-token logits after each chunk ``[B, V]``. The
        server then advances its context lengths by the chunk sizes."""
        cu = [int(x) for x in cu_q.tolist()]
        trees = [TokenTree.chain(tokens[cu[i] : cu[i + 1]].cpu()) for i in range(len(cu) - 1)]
        batch = tree_batch(block_tables.to(torch.int32), [int(c) for c in context_lens.tolist()], trees,
                           cache.block_size)
        keep = torch.tensor(cu[1:], device=block_tables.device) - 1
        return self.target.run(cache, batch, keep).logits

    @torch.inference_mode()
    def verify(self, cache: ServerCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
               tokens: torch.Tensor, parents: torch.Tensor, cu_q: torch.Tensor,
               draft_probs: torch.Tensor | None = None,
               sampling: Sequence[SamplingParams] | None = None,
               generators: Sequence[torch.Generator | None] | None = None) -> VerifyOutput:
        """Verify ``B`` trees.

        Args:
            cache: the server's K/V (:class:`ServerCache`).
            block_tables: ``[B, max_blocks]`` int32, on the cache's device.
            context_lens: ``[B]`` int, committed tokens per sequence.
            tokens: ``[T]`` int64, all trees' tokens concatenated; each tree's node 0 is its root (the last
                sampled token, not yet in the cache).
            parents: ``[T]`` int64, parent index of each node within its own tree (-1 for the root; parents come
                before children).
            cu_q: ``[B + 1]`` int, cumulative tree sizes.
            draft_probs: ``[T, V]`` or ``None``: the distribution each node was drawn from (see
                :class:`specdec.interfaces.Draft`); ``None`` verifies deterministic drafts (one-hot).
            sampling: per-sequence settings (default greedy); greedy sequences are accepted with tensor ops.
            generators: per-sequence generators for sampled sequences (on the model's device).
        """
        cu = [int(x) for x in cu_q.tolist()]
        b = len(cu) - 1
        sampling = list(sampling) if sampling is not None else [GREEDY] * b
        if len(sampling) != b or block_tables.shape[0] != b or context_lens.numel() != b:
            raise ValueError(f"got {b} trees but {len(sampling)} sampling settings, {block_tables.shape[0]} block "
                             f"table rows and {context_lens.numel()} context lengths")
        trees = [TokenTree(tokens[cu[i] : cu[i + 1]].cpu(), parents[cu[i] : cu[i + 1]].cpu()) for i in range(b)]
        ctx = [int(c) for c in context_lens.tolist()]
        for i, (c, t) in enumerate(zip(ctx, trees, strict=True)):
            if -(-(c + t.num_nodes) // cache.block_size) > block_tables.shape[1]:
                raise ValueError(f"sequence {i}: context {c} + {t.num_nodes} tree nodes need "
                                 f"{-(-(c + t.num_nodes) // cache.block_size)} blocks; its block table has "
                                 f"{block_tables.shape[1]}")
        batch = tree_batch(block_tables.to(torch.int32), ctx, trees, cache.block_size)
        logits = self.target.run(cache, batch).logits  # [T, V]
        dev, depth = logits.device, max(t.max_depth for t in trees)
        width = depth + 1
        accept_len = torch.zeros(b, dtype=torch.long, device=dev)
        out_tokens = torch.full((b, width), -1, dtype=torch.long, device=dev)
        out_path = torch.full((b, width), -1, dtype=torch.long, device=dev)
        greedy = [i for i in range(b) if sampling[i].greedy]
        if greedy:
            padded = PaddedTrees.stack([trees[i] for i in greedy], dev)
            n = padded.tokens.shape[1]
            rows = torch.tensor([cu[i] for i in greedy], device=dev)[:, None] + torch.arange(n, device=dev)
            rows = torch.where(padded.valid, rows, rows[:, :1])
            verdict = greedy_accept_batch(padded, logits.argmax(-1)[rows], depth)
            idx = torch.tensor(greedy, device=dev)
            accept_len[idx], out_tokens[idx], out_path[idx] = verdict.accept_len, verdict.tokens, verdict.path
        for i in (i for i in range(b) if not sampling[i].greedy):
            probs = process_logits(logits[cu[i] : cu[i + 1]], sampling[i])
            q = None if draft_probs is None else draft_probs[cu[i] : cu[i + 1]]
            gen = None if generators is None else generators[i]
            v = tree_rejection_sample(trees[i], probs, q, gen)
            a = len(v.path) - 1
            accept_len[i] = a
            out_tokens[i, : a + 1] = v.tokens.to(dev)
            out_path[i, : a + 1] = torch.tensor(v.path, device=dev)
        return VerifyOutput(accept_len, out_tokens, out_path, _moves(batch, cu, out_path))


def _moves(batch, cu: list[int], path: torch.Tensor) -> KVMoves:
    """Accepted node ``path[b, d]`` moves from slot of node ``path[b, d]`` to the slot of node ``d``."""
    b, width = path.shape
    dev = path.device
    start = torch.tensor(cu[:-1], device=dev)[:, None]
    d = torch.arange(width, device=dev).expand(b, width)
    keep = (path >= 0) & (path != d)
    src = batch.slot_mapping[(start + path.clamp(min=0))[keep]]
    dst = batch.slot_mapping[(start + d)[keep]]
    return KVMoves(src, dst)

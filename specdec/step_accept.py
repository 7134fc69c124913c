"""Acceptance for one engine step: every request of the batch, one host sync, one list of KV moves.

Greedy requests are accepted together with tensor ops (:func:`specdec.acceptance_batch.greedy_accept_batch`),
sampled (T > 0) ones together by :func:`specdec.acceptance_batch.rejection_sample_batch` (each request's noise drawn
from its own generator, so the batch does not change its stream); the first tokens of finished prefills are
argmax'd or sampled on the device; all of it is read back with ONE ``tolist``. Only the opt-in lossy rule
(``typical_lossy``) runs per request with its own reads. The K/V rows of all accepted paths become one
``(src, dst)`` slot list for a single ``move`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specdec.acceptance_batch import PaddedTrees, greedy_accept_batch, rejection_sample_batch
from specdec.attention import TreeBatch
from specdec.sampling import process_logits, sample

if TYPE_CHECKING:
    from specdec.engine import SpeculativeEngine, _Slot


@dataclass
class StepAcceptance:
    """Host results per slot index (``paths``/``tokens`` for decode slots, ``first_tokens`` for final prefill
    chunks) and the step's KV moves ``src_slots``/``dst_slots`` ``[M]`` int64 on the cache's device."""

    paths: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    first_tokens: dict[int, int] = field(default_factory=dict)
    src_slots: torch.Tensor | None = None
    dst_slots: torch.Tensor | None = None


def accept_step(engine: SpeculativeEngine, slots: list[_Slot], batch: TreeBatch, logits: torch.Tensor,
                keep_rows: list[list[int]]) -> StepAcceptance:
    """``logits [K, V]``: the kept rows, in slot order (``keep_rows`` lists each kept slot's batch rows)."""
    dev = logits.device
    kept = [i for i, s in enumerate(slots) if s.draft is not None or s.final_chunk]
    start = dict(zip(kept, _starts(keep_rows), strict=True))  # slot -> first logits row
    greedy = [i for i, s in enumerate(slots) if s.draft is not None and s.req.params.greedy]
    sampled = [i for i, s in enumerate(slots) if s.draft is not None and not s.req.params.greedy]
    lossy = sampled if engine.acceptance == "typical_lossy" else []
    exact = [] if lossy else sampled
    firsts = [i for i, s in enumerate(slots) if s.draft is None and s.final_chunk]
    result = StepAcceptance()
    reads: list[torch.Tensor] = []
    if greedy:
        trees = PaddedTrees.stack([slots[i].tree for i in greedy], dev)
        n = trees.tokens.shape[1]  # each tree's logits rows; padding nodes read the tree's first row
        first = torch.tensor([start[i] for i in greedy])[:, None]
        sizes = torch.tensor([slots[i].tree.num_nodes for i in greedy])[:, None]
        col = torch.arange(n)
        rows = torch.where(col < sizes, first + col, first).to(dev)  # host ops, one copy
        depth = max(slots[i].depth for i in greedy)
        verdict = greedy_accept_batch(trees, logits.argmax(-1)[rows], depth)
        reads += [verdict.accept_len, verdict.tokens.flatten(), verdict.path.flatten()]
    if exact:
        s_depth = max(slots[i].depth for i in exact)
        verdict = _sample_batch([slots[i] for i in exact], [start[i] for i in exact], logits, s_depth)
        reads += [verdict.accept_len, verdict.tokens.flatten(), verdict.path.flatten()]
    if firsts:
        reads.append(torch.stack([_first_token(slots[i], logits[start[i]]) for i in firsts]))
    host = torch.cat([r.to(torch.long).flatten() for r in reads]).tolist() if reads else []  # THE sync
    if greedy:
        host = _unpack(result, greedy, host, depth + 1)
    if exact:
        host = _unpack(result, exact, host, s_depth + 1)
    for j, i in enumerate(firsts):
        result.first_tokens[i] = host[j]
    for i in lossy:
        slot = slots[i]
        n = slot.tree.num_nodes
        verdict = engine._accept_lossy(slot, process_logits(logits[start[i] : start[i] + n], slot.req.params))
        result.paths[i], result.tokens[i] = list(verdict.path), verdict.tokens.tolist()
    _moves(result, batch, dev)
    return result


def _unpack(result: StepAcceptance, group: list[int], host: list[int], width: int) -> list[int]:
    """Read one group's ``accept_len``, ``tokens`` and ``path`` off the flat host list; return the rest."""
    g = len(group)
    lens, toks, paths = host[:g], host[g : g + g * width], host[g + g * width : g + 2 * g * width]
    for j, i in enumerate(group):
        a = lens[j]
        result.paths[i] = paths[j * width : j * width + a + 1]
        result.tokens[i] = toks[j * width : j * width + a + 1]
    return host[g + 2 * g * width :]


def _sample_batch(slots: list[_Slot], starts: list[int], logits: torch.Tensor, depth: int):
    """Exact rejection sampling for the sampled requests, all at once; noise from each request's generator."""
    dev, v = logits.device, logits.shape[-1]
    trees = PaddedTrees.stack([s.tree for s in slots], dev)
    n = trees.tokens.shape[1]

    def pad(x: torch.Tensor) -> torch.Tensor:  # [n_i, ...] -> [N, ...]
        return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[0])) if x.dim() == 2 else \
            torch.nn.functional.pad(x, (0, n - x.shape[0]), value=0.5)

    p = torch.stack([pad(process_logits(logits[a : a + s.tree.num_nodes], s.req.params))
                     for s, a in zip(slots, starts, strict=True)])
    q = None
    if any(s.draft.probs is not None for s in slots):
        q = torch.stack([pad((s.draft.probs if s.draft.probs is not None else
                              torch.nn.functional.one_hot(s.tree.tokens, v)).to(dev, p.dtype)) for s in slots])
    tiny = torch.finfo(p.dtype).tiny
    uniforms = torch.stack([pad(torch.rand(s.tree.num_nodes, generator=s.req.generator, dtype=p.dtype, device=dev))
                            for s in slots])
    race = torch.stack([torch.empty(v, dtype=p.dtype, device=dev).exponential_(generator=s.req.generator)
                        for s in slots]).clamp_(min=tiny)
    wr = torch.tensor([s.draft.without_replacement for s in slots], device=dev)
    return rejection_sample_batch(trees, p, q, uniforms, race, wr, depth, max(s.max_children for s in slots))


def _starts(keep_rows: list[list[int]]) -> list[int]:
    out, at = [], 0
    for rows in keep_rows:
        out.append(at)
        at += len(rows)
    return out


def _first_token(slot: _Slot, row: torch.Tensor) -> torch.Tensor:
    params = slot.req.params
    if params.greedy:
        return row.argmax()
    return sample(process_logits(row, params), slot.req.generator)


def _moves(result: StepAcceptance, batch: TreeBatch, dev: torch.device) -> None:
    """Node ``path[d]`` of slot ``i`` (at batch row ``cu[i] + path[d]``) moves to the slot of node ``d``;
    nodes already in place are skipped (the list is built from host values: no sync)."""
    cu = batch.cu_q_host
    src = [cu[i] + p for i, path in result.paths.items() for d, p in enumerate(path) if p != d]
    dst = [cu[i] + d for i, path in result.paths.items() for d, p in enumerate(path) if p != d]
    if not src:  # every accepted node already sits where it belongs (chains, roots): nothing to launch
        result.src_slots = result.dst_slots = torch.empty(0, dtype=torch.long, device=dev)
        return
    index = torch.tensor(src + dst, dtype=torch.long).to(dev)
    slots = batch.slot_mapping[index]
    result.src_slots, result.dst_slots = slots[: len(src)], slots[len(src) :]

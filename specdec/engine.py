"""The step engine: many requests, one verification forward per step, continuous batching.

Each :meth:`SpeculativeEngine.step`:

1. admits waiting requests (:class:`specdec.scheduler.Scheduler`: ``max_batch``, free blocks);
2. drafts for every decoding request in one :meth:`Drafter.propose` call;
3. reserves KV for the trees (preempting the youngest request when the cache runs out), then fills the rest of
   ``max_step_tokens`` with prefill chunks (chunked prefill shares the step with the trees);
4. runs ONE target forward over all trees and chunks (a ragged :class:`specdec.attention.TreeBatch`);
5. accepts: greedy requests with whole-batch tensor ops (:func:`specdec.acceptance.greedy_accept_batch`),
   sampled ones with the exact tree rejection sampler; moves every accepted K/V row of the step in one call;
6. appends tokens, tells the drafter, finishes requests (EOS, stop ids, ``max_new_tokens``) and returns one
   :class:`specdec.request.StepOutput` per request that produced tokens or ended.

Host syncs per step: ONE for greedy requests and prefills (a single ``tolist`` of the fixed-shape acceptance output
and first tokens); a sampled (T > 0) request adds the rejection sampler's reads (one per tree level it walks).
The engine is not thread-safe: drive it from one thread (the server runs it in its own loop thread).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import count

import torch

from specdec.acceptance import typical_accept_lossy
from specdec.attention import build_tree_batch
from specdec.interfaces import Draft, Drafter
from specdec.kv_cache import OutOfBlocks, PagedKVCache
from specdec.request import Request, Status, StepOutput
from specdec.sampling import GREEDY, SamplingParams
from specdec.scheduler import Scheduler
from specdec.stats import RequestStats
from specdec.step_accept import accept_step
from specdec.step_draft import draft_all
from specdec.target import TargetModel
from specdec.tree import TokenTree

TokenCallback = Callable[[list[int]], None]


@dataclass(frozen=True)
class GenerationResult:
    """Output of one request: ``tokens`` (an EOS or stop token that ended it is included), ``stop_reason``
    (``"eos"``, ``"stop"`` or ``"length"``) and ``stats`` (see :mod:`specdec.stats` for tau)."""

    tokens: list[int]
    stop_reason: str
    stats: RequestStats


@dataclass
class _Slot:
    """One request's part of the step's forward: a tree (decode) or a chain (prefill chunk)."""

    req: Request
    tree: TokenTree
    draft: Draft | None = None  # decode only
    final_chunk: bool = False  # prefill: the chunk that ends the prefill
    inner: frozenset[int] = frozenset()  # decode: nodes with children (host, read while drafting)
    depth: int = 0  # decode: tree depth (host)
    max_children: int = 0  # decode: most children of one node (host)


class SpeculativeEngine:
    """Speculative decoding of many requests over one paged KV cache.

    Args:
        target: the verifier.
        cache: paged KV cache built by ``target.new_cache``.
        drafter: proposes trees; ``None`` decodes autoregressively (every tree is the root alone).
        eos_token_ids: a request stops after any of these.
        max_tree_nodes: per-step tree size limit (root included); larger drafts fail their request.
        acceptance: ``"exact"`` (greedy at temperature 0, tree rejection sampling above: the output follows the
            target's distribution) or ``"typical_lossy"`` (Medusa's typical acceptance; NOT distribution-preserving).
        max_batch: most requests running at once.
        max_step_tokens: token budget of one forward (trees first, then prefill chunks).
    """

    def __init__(self, target: TargetModel, cache: PagedKVCache, drafter: Drafter | None = None,
                 eos_token_ids: Sequence[int] = (), max_tree_nodes: int = 64, acceptance: str = "exact",
                 max_batch: int = 8, max_step_tokens: int = 2048) -> None:
        if acceptance not in ("exact", "typical_lossy"):
            raise ValueError(f"unknown acceptance rule {acceptance!r}; choose 'exact' or 'typical_lossy'")
        if drafter is not None and drafter.vocab_size is not None and drafter.vocab_size != target.vocab_size:
            raise ValueError(f"tokenizer mismatch: the drafter's vocabulary has {drafter.vocab_size} tokens, "
                             f"the target's {target.vocab_size}")
        self.target, self.cache, self.drafter = target, cache, drafter
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.max_tree_nodes, self.acceptance = max_tree_nodes, acceptance
        self.scheduler = Scheduler(cache, max_batch, max_step_tokens, max_tree_nodes, self._release_drafter)
        self._requests: dict[int, Request] = {}
        self._ids = count()
        self._pending: list[StepOutput] = []  # outputs of requests ended between steps (cancel)
        self.steps = 0

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams = GREEDY) -> int:
        """Queue a request and return its id; raises ``ValueError`` naming the limit if it could never run."""
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().cpu()
        if prompt.numel() == 0:
            raise ValueError("empty prompt: need at least one token")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.target.vocab_size:
            bad = int(prompt.max()) if int(prompt.max()) >= self.target.vocab_size else int(prompt.min())
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.target.vocab_size})")
        self.scheduler.check_fits(prompt.numel(), params.max_new_tokens, self.target.max_positions)
        rid = next(self._ids)
        sampled = not params.greedy
        dev = self.target.device
        req = Request(rid, prompt, params, params.generator(dev) if sampled else None,
                      params.draft_generator(dev) if sampled else None, arrival=rid)
        self._requests[rid] = req
        self.scheduler.waiting.append(req)
        return rid

    def cancel(self, request_id: int) -> None:
        """End a request now: its blocks are freed at once; the next :meth:`step` reports it as ``cancelled``.
        Cancelling a finished request does nothing; an unknown id raises ``ValueError``."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"unknown request id {request_id} (never added, or finished and already reported)")
        if req.status is not Status.FINISHED:
            self._finish(req, "cancelled", pending=True)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    def request(self, request_id: int) -> Request:
        return self._requests[request_id]

    def step(self) -> list[StepOutput]:
        """Run one step (see the module docstring) and return what it produced."""
        outputs, self._pending = self._pending, []
        self.scheduler.admit()
        if not self.scheduler.running and self.scheduler.waiting:
            # nothing of ours holds blocks, yet the oldest request does not fit: others hold the cache
            req = self.scheduler.waiting[0]
            need = self.scheduler.blocks_for(req.prefill_target + self.max_tree_nodes)
            free, total = self.cache.allocator.num_free, self.cache.allocator.num_blocks
            outputs.append(self._finish(req, "error", error=OutOfBlocks(
                f"out of KV blocks: request {req.request_id} needs {need}, {free} free of {total} (other "
                f"sequences of this cache hold the rest; raise --num-blocks or shorten the request)")))
        if not self.scheduler.running:
            self._forget_finished(outputs)
            return outputs
        slots, draft_s = self._schedule(outputs)
        if slots:
            t0 = time.perf_counter()
            try:
                outputs += self._verify(slots, draft_s, t0)
            except Exception as err:  # a fault in the forward fails this step's requests, never the engine
                for slot in slots:
                    if slot.req.status is Status.RUNNING:
                        outputs.append(self._finish(slot.req, "error", error=err))
            self.steps += 1
        self._forget_finished(outputs)
        return outputs

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 on_tokens: TokenCallback | None = None, sampling: SamplingParams = GREEDY) -> GenerationResult:
        """Run one request to its end on an idle engine (a thin loop over :meth:`step`); every block is freed on
        return or error (``KeyboardInterrupt`` included). Errors of the request are raised."""
        [result] = self._run([prompt_ids], max_new_tokens, [sampling], on_tokens)
        return result

    def generate_batch(self, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
                       sampling: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[GenerationResult]:
        """Run all ``prompts`` concurrently (continuous batching) and return their results in order."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling settings for {len(prompts)} prompts")
        return self._run(prompts, max_new_tokens, params, None)

    # ------------------------------------------------------------------ scheduling and drafting
    def _schedule(self, outputs: list[StepOutput]) -> tuple[list[_Slot], float]:
        decoding = sorted((r for r in self.scheduler.running if r.decoding), key=lambda r: r.arrival)
        t0 = time.perf_counter()
        drafts = draft_all(self.drafter, decoding, self.max_tree_nodes, self.target.vocab_size,
                           lambda req, err: self._finish(req, "error", error=err), outputs)
        draft_s = time.perf_counter() - t0
        slots: list[_Slot] = []
        for req in decoding:
            draft = drafts.get(req.request_id)
            if draft is None or req.status is not Status.RUNNING:
                continue  # failed, or preempted by an older request's tree
            if self.scheduler.reserve_tree(req, draft.tree.num_nodes):
                parents = draft.tree.parents.tolist()
                kids = max(Counter(parents[1:]).values(), default=0)
                slots.append(_Slot(req, draft.tree, draft, inner=frozenset(parents[1:]), depth=draft.tree.max_depth,
                                   max_children=kids))
        budget = self.scheduler.max_step_tokens - sum(s.tree.num_nodes for s in slots)
        prefilling = sorted((r for r in self.scheduler.running if not r.decoding), key=lambda r: r.arrival)
        for req in prefilling:
            if budget <= 0:
                break
            n = self.scheduler.reserve_chunk(req, min(budget, req.prefill_target - req.prefilled))
            if n == 0:
                break
            chunk = req.history[req.prefilled : req.prefilled + n]
            slots.append(_Slot(req, TokenTree.chain(chunk), final_chunk=req.prefilled + n == req.prefill_target))
            budget -= n
        return slots, draft_s

    # ------------------------------------------------------------------ verification
    def _verify(self, slots: list[_Slot], draft_s: float, t0: float) -> list[StepOutput]:
        seq_ids = [s.req.seq_id for s in slots]
        batch = build_tree_batch(self.cache, seq_ids, [s.tree for s in slots])
        cu = batch.cu_q_host
        keep_rows = [list(range(cu[i], cu[i + 1])) if s.draft is not None else [cu[i + 1] - 1]
                     for i, s in enumerate(slots) if s.draft is not None or s.final_chunk]
        keep = torch.tensor([r for rows in keep_rows for r in rows], dtype=torch.long, device=self.cache.device)
        out = self.target.run(self.cache, batch, keep, *self._hidden_request())
        logits = out.logits  # [K, V], rows in keep order
        result = accept_step(self, slots, batch, logits, keep_rows)
        verify_s = time.perf_counter() - t0
        return self._commit(slots, result, out.hidden, batch, draft_s, verify_s)

    def _hidden_request(self) -> tuple[bool, Sequence[int] | None]:
        """``(return_hidden, hidden_layers)`` of every verification: what the drafter reads (e.g. EAGLE-3's fused
        low/mid/high layers)."""
        return self.drafter is not None and self.drafter.needs_hidden, getattr(self.drafter, "feature_layers", None)

    def warmup(self, log=None) -> list[tuple[int, int]]:
        """Compile the target's step buckets for this engine's steps before the first request (a no-op
        without ``compile``); see :meth:`TargetModel.warmup`."""
        return self.target.warmup(self.cache, self.scheduler.max_batch, self.scheduler.max_step_tokens,
                                  *self._hidden_request(), log=log)

    def _accept_lossy(self, slot: _Slot, probs: torch.Tensor):
        return typical_accept_lossy(slot.draft.tree, probs, slot.req.generator)

    def _commit(self, slots, result, hidden, batch, draft_s: float, verify_s: float) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self.cache.move(result.src_slots, result.dst_slots)  # every accepted K/V row of the step, one call
        cu = batch.cu_q_host
        for i, slot in enumerate(slots):
            req, n = slot.req, slot.tree.num_nodes
            try:
                if slot.draft is None:
                    outputs += self._after_prefill(slot, result.first_tokens.get(i), hidden, cu[i], verify_s)
                else:
                    path, tokens = result.paths[i], result.tokens[i]
                    self.cache.advance(req.seq_id, len(path))
                    if self.drafter is not None:
                        rows = None if hidden is None else hidden[torch.tensor(path, device=hidden.device) + cu[i]]
                        self.drafter.accept(req.seq_id, torch.tensor(tokens), rows)
                    req.stats.record_step(len(path) - 1, path[-1] in slot.inner, n)
                    req.stats.draft_s += draft_s
                    req.stats.verify_s += verify_s
                    kept = req.append(tokens, self.eos)
                    outputs.append(self._emit(req, kept, accepted=len(path) - 1))
            except Exception as err:  # e.g. a drafter's accept raising: only this request fails
                outputs.append(self._finish(req, "error", error=err))
        return outputs

    def _after_prefill(self, slot: _Slot, first: int | None, hidden, start: int, verify_s: float):
        req, n = slot.req, slot.tree.num_nodes
        self.cache.advance(req.seq_id, n)
        req.prefilled += n
        req.stats.prefill_s += verify_s
        if hidden is not None:
            req.pending_hidden.append(hidden[start : start + n])
        if not slot.final_chunk:
            return []
        resumed = bool(req.output)
        root = req.output[-1] if resumed else first
        if self.drafter is not None:
            rows = torch.cat(req.pending_hidden) if req.pending_hidden else None
            self.drafter.accept(req.seq_id, torch.tensor([root]), rows)
        req.pending_hidden = []
        if resumed:
            return []
        return [self._emit(req, req.append([first], self.eos), accepted=None)]

    # ------------------------------------------------------------------ bookkeeping
    def _emit(self, req: Request, tokens: list[int], accepted: int | None) -> StepOutput:
        if req.stop_reason is not None:
            return self._finish(req, req.stop_reason, tokens=tokens, accepted=accepted)
        return StepOutput(req.request_id, tokens, accepted=accepted)

    def _finish(self, req: Request, reason: str, tokens: list[int] | None = None, error: Exception | None = None,
                accepted: int | None = None, pending: bool = False) -> StepOutput:
        if req.seq_id is not None and req.status is Status.RUNNING:
            self._release_drafter(req)
        self.scheduler.finish(req)
        req.stop_reason, req.exception = reason, error
        req.error = None if error is None else f"{type(error).__name__}: {error}"
        req.stats.new_tokens = len(req.output)
        req.stats.total_s = time.perf_counter() - req.start_time if req.start_time else 0.0
        out = StepOutput(req.request_id, tokens or [], True, reason, req.error, accepted, req.stats)
        if pending:
            self._pending.append(out)
        return out

    def _release_drafter(self, req: Request) -> None:
        if self.drafter is not None and req.seq_id is not None:
            with contextlib.suppress(Exception):  # a drafter failing to forget state must not stop the engine
                self.drafter.release(req.seq_id)

    def _forget_finished(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)

    def _run(self, prompts, max_new_tokens: int, params: list[SamplingParams],
             on_tokens: TokenCallback | None) -> list[GenerationResult]:
        if self.has_work():
            raise RuntimeError("generate() needs an idle engine; use add_request()/step() to share one")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, replace(p, max_new_tokens=max_new_tokens)))
            reqs = {rid: self._requests[rid] for rid in ids}
            while self.has_work():
                for out in self.step():
                    if on_tokens is not None and out.new_tokens:
                        on_tokens(out.new_tokens)
            for req in reqs.values():
                if req.stop_reason in ("error", "cancelled") and req.exception is not None:
                    raise req.exception
            return [GenerationResult(r.output, r.stop_reason, r.stats) for r in reqs.values()]
        finally:
            for rid in ids:
                if rid in self._requests and self._requests[rid].status is not Status.FINISHED:
                    self.cancel(rid)
            self._pending = []
            self._requests.clear()

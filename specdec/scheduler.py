"""Which requests run in a step, and where their KV blocks come from.

Policy (first come, first served, as vLLM's and SGLang's default schedulers):

* **Admission**: waiting requests enter in arrival order while fewer than ``max_batch`` run and the free blocks
  hold the request's whole prefill plus one tree (so an admitted request is not preempted at once).
* **Prefill** runs in chunks inside the same step as the decoding trees (chunked prefill): the trees take their
  tokens first, then prefill chunks of the oldest prefilling requests fill the rest of ``max_step_tokens``.
  A chunk only takes free blocks; it never preempts.
* **Preemption**: when a decoding request's tree does not fit, the youngest running request (the last admitted)
  is preempted: its blocks are freed at once, its drafter state released, and it goes back to the front of the
  queue with its tokens; it is prefilled again from its history later. The oldest request can always run,
  because :meth:`Scheduler.check_fits` refuses any request that could not fit the cache alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from specdec.kv_cache import OutOfBlocks, PagedKVCache
from specdec.request import Request, Status


class Scheduler:
    """Request queues and block reservation for :class:`specdec.engine.SpeculativeEngine`.

    Args:
        cache: the target's paged KV cache.
        max_batch: most requests running at once (sequences per step).
        max_step_tokens: token budget of one forward (tree nodes + prefill chunk tokens).
        max_tree_nodes: largest tree a step may verify (root included).
        on_preempt: called with a request right after it was preempted (the engine releases drafter state).
    """

    def __init__(self, cache: PagedKVCache, max_batch: int, max_step_tokens: int, max_tree_nodes: int,
                 on_preempt: Callable[[Request], None]) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_tree_nodes < 1:
            raise ValueError(f"max_tree_nodes must be at least 1, got {max_tree_nodes}")
        if max_step_tokens < max_tree_nodes:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be at least max_tree_nodes "
                             f"({max_tree_nodes}): one tree has to fit a step")
        self.cache = cache
        self.max_batch, self.max_step_tokens, self.max_tree_nodes = max_batch, max_step_tokens, max_tree_nodes
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self._on_preempt = on_preempt

    # ------------------------------------------------------------------ limits
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cache.block_size)

    def check_fits(self, prompt_len: int, max_new_tokens: int, max_positions: int) -> None:
        """Raise ``ValueError`` naming the limit if a request could never run, even alone."""
        need = prompt_len + max_new_tokens + self.max_tree_nodes
        if need > max_positions:
            raise ValueError(
                f"prompt too long: {prompt_len} prompt tokens + {max_new_tokens} new + {self.max_tree_nodes} tree "
                f"nodes exceed the model's context of {max_positions} tokens"
            )
        if need > self.cache.capacity_tokens:
            raise ValueError(
                f"prompt too long for the cache: {prompt_len} prompt tokens + {max_new_tokens} new + "
                f"{self.max_tree_nodes} tree nodes need {need} KV slots; the cache holds "
                f"{self.cache.capacity_tokens} (use --num-blocks {self.blocks_for(need)} or more)"
            )

    # ------------------------------------------------------------------ admission
    def admit(self) -> list[Request]:
        """Move waiting requests to running (arrival order) while the batch and the free blocks allow."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = self.blocks_for(req.prefill_target + self.max_tree_nodes)
            if need > self.cache.allocator.num_free:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.seq_id = self.cache.add_sequence()
            if not req.start_time:
                req.start_time = time.perf_counter()
            self.running.append(req)
            admitted.append(req)
        return admitted

    # ------------------------------------------------------------------ blocks
    def reserve_tree(self, req: Request, nodes: int) -> bool:
        """Reserve ``nodes`` positions for ``req``'s tree, preempting younger requests if needed. Returns
        ``False`` if ``req`` itself had to be preempted (it is then waiting again)."""
        while True:
            try:
                self.cache.reserve(req.seq_id, nodes)
                return True
            except OutOfBlocks:
                victim = max(self.running, key=lambda r: r.arrival)
                self.preempt(victim)
                if victim is req:
                    return False

    def reserve_chunk(self, req: Request, tokens: int) -> int:
        """Reserve as many of ``tokens`` prefill positions as free blocks allow (never preempts); returns how
        many were reserved (0: none fit)."""
        seq = req.seq_id
        while tokens > 0:
            if self.cache.blocks_needed(seq, tokens) <= self.cache.allocator.num_free:
                self.cache.reserve(seq, tokens)
                return tokens
            room = (len(self.cache.blocks(seq)) + self.cache.allocator.num_free) * self.cache.block_size
            tokens = min(tokens - 1, room - self.cache.num_tokens(seq))
        return 0

    def preempt(self, req: Request) -> None:
        """Free every block of ``req`` and queue it first, to be prefilled again from its history."""
        self.cache.release(req.seq_id)
        self.running.remove(req)
        self._on_preempt(req)
        req.reset_for_prefill()
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free ``req``'s blocks and drop it from the queues (idempotent)."""
        if req.seq_id is not None:
            self.cache.release(req.seq_id)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED

"""The verify forward compiled over static, bucketed shapes (``torch.compile(fullgraph=True, dynamic=False)``).

A step's :class:`~specdec.attention.TreeBatch` is padded to a bucket: its ``T`` query tokens to the next size in
``token_buckets`` (1, 2, 4, ..., 64 by default) and its ``B`` sequences to the next in ``batch_buckets``; the block
table to the cache's full width. Each bucket is one graph, traced once and reused for every later step of that
shape (no recompilation: nothing in the graph depends on a Python value that changes between steps). Padding:

* padding tokens (rows past ``cu_q[B]``) carry slot ``-1``, so their K/V are never written, and attend to nothing
  (the attention op returns 0 for them); their logits are computed and dropped.
* padding sequences have no query and context 0; their block-table rows are never read.

The attention and the cache write run as the ``specdec::`` custom ops (:mod:`specdec.ops`): the Triton kernels on
CUDA, gather + SDPA on CPU. On CUDA each bucket is also captured as a CUDA graph, one of two ways (``graphs``):

* ``"manual"`` (default on CUDA; SGLang / vLLM style): inductor code without graphs of its own, captured by
  :class:`StepGraph` over static input buffers and the cache's K/V (one graph per bucket and cache). A replay is
  one ``_foreach_copy_`` of the padded metadata into the buffers and ``graph.replay()``: no dynamo guard
  evaluation, no parameter list, no cudagraph-tree bookkeeping on the host (on an H200 with an 8B model the
  step's host time is what separates a verify step from HF's compiled decode step).
* ``"trees"``: ``mode="reduce-overhead"`` (torch's CUDA-graph trees; the cache tensors marked static addresses).

``graphs="manual"`` also runs on CPU (tests): the "replay" re-runs the compiled function on the static buffers and
copies its outputs into persistent output buffers, so the aliasing of a real graph's outputs is reproduced.

Steps that fit no bucket (e.g. a long prefill chunk, tree offsets, or a cache that is not a
:class:`~specdec.kv_cache.PagedKVCache`) run eagerly, so results never depend on whether a step was compiled
beyond floating-point rounding (tested: greedy outputs equal the eager engine's).

Cost: every new bucket traces and compiles the model once (about a minute for SmolLM2 on a 2-core CPU, seconds
from the on-disk inductor cache afterwards), so it pays on long runs and servers, not on one short generation.
"""

from __future__ import annotations

import bisect
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

try:  # transformers >= 5 captures hidden states through hooks (older versions return them directly)
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:  # pragma: no cover - depends on the installed transformers
    maybe_install_capturing_hooks = None

from specdec import ops
from specdec.attention import ForwardContext, TreeBatch, build_tree_batch
from specdec.kv_cache import PagedKVCache
from specdec.step_graph import StepGraph, StepPlan
from specdec.tree import TokenTree

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
# CUDA: a step is memory-bound, so padding is nearly free (8B shape on an H200: 7.2 ms for 1 node, 7.7 ms padded to
# 16) while every bucket costs a compilation (about 30 s): few, coarse buckets
CUDA_TOKEN_BUCKETS = (1, 4, 16, 64)
CUDA_BATCH_BUCKETS = (1, 8, 32)


class OpsCache:
    """A whole ``[L, NB, BS, Hkv, D]`` K/V pair seen through the custom ops (what the compiled graph writes)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        ops.write_kv(self.k[layer], self.v[layer], slot_mapping, k, v)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


class OpsBackend:
    """Attention through ``torch.ops.specdec.paged_tree_attention`` on a :class:`StepPlan`."""

    name = "ops"

    def attend(self, plan: StepPlan, q, k_cache, v_cache, sm_scale: float) -> torch.Tensor:
        return ops.paged_tree_attention(q, k_cache, v_cache, plan.block_table, plan.context_lens, plan.cu_q,
                                        plan.tree_mask, plan.mask_indptr, sm_scale, plan.max_q,
                                        q_offsets=plan.q_offsets)


def default_buckets(device: torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(token_buckets, batch_buckets)`` when none are given: coarse on CUDA, fine elsewhere."""
    if torch.device(device).type == "cuda":
        return CUDA_TOKEN_BUCKETS, CUDA_BATCH_BUCKETS
    return TOKEN_BUCKETS, BATCH_BUCKETS


def bucket(value: int, sizes: Sequence[int]) -> int | None:
    """The smallest size in ``sizes`` (sorted) that holds ``value``; ``None`` if none does."""
    i = bisect.bisect_left(sizes, value)
    return sizes[i] if i < len(sizes) else None


class CompiledVerifier:
    """Runs :meth:`TargetModel.run <specdec.target.TargetModel.run>` through one compiled graph per bucket.

    Args:
        verifier: the target's attention view of the HF model (``TargetModel.verifier``).
        token_buckets / batch_buckets: the padded sizes (sorted); a step larger than the last runs eagerly.
            Default: 1, 2, 4, ..., 64 tokens and 1, 2, 4, ..., 32 sequences; on CUDA 1 / 4 / 16 / 64 tokens and
            1 / 8 / 32 sequences (padding costs little there, each bucket a compilation).
        graphs: ``"manual"`` (default on CUDA: :class:`StepGraph` captures), ``"trees"`` (``torch.compile``'s
            ``mode="reduce-overhead"``) or ``"none"`` (default elsewhere). ``"manual"`` on CPU re-runs the function
            over the static buffers (tests of the buffer plumbing).
        backend: ``torch.compile`` backend (default ``"inductor"``; ``"aot_eager"`` traces the same graph without
            code generation: seconds instead of a minute, for tests of the tracing and padding).
    """

    GRAPHS = ("manual", "trees", "none")

    def __init__(self, verifier: torch.nn.Module, token_buckets: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] | None = None, graphs: str | None = None,
                 backend: str = "inductor") -> None:
        device = next(verifier.parameters()).device
        default_tokens, default_batch = default_buckets(device)
        token_buckets = default_tokens if token_buckets is None else token_buckets
        batch_buckets = default_batch if batch_buckets is None else batch_buckets
        for name, sizes in (("token_buckets", token_buckets), ("batch_buckets", batch_buckets)):
            if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
                raise ValueError(f"{name} must be increasing positive sizes, got {tuple(sizes)}")
        self.verifier = verifier
        self.token_buckets, self.batch_buckets = tuple(token_buckets), tuple(batch_buckets)
        self.graph_mode = graphs if graphs is not None else ("manual" if device.type == "cuda" else "none")
        if self.graph_mode not in self.GRAPHS:
            raise ValueError(f"graphs must be one of {self.GRAPHS}, got {graphs!r}")
        self.mode = "reduce-overhead" if self.graph_mode == "trees" else None
        self.graphs: set[tuple] = set()  # buckets traced so far
        # captures per cache, held weakly: a graph pins its cache's K/V, so it must go when the cache goes (a
        # caller that builds a cache per generation would otherwise keep every old cache alive)
        self._captures: weakref.WeakKeyDictionary[PagedKVCache, dict[tuple, StepGraph]] = weakref.WeakKeyDictionary()
        self.capture_error: str | None = None
        self.compiled_steps = self.eager_steps = self.captures = 0  # captures: graphs captured so far
        self._static_caches: weakref.WeakSet[PagedKVCache] = weakref.WeakSet()  # "trees": K/V marked static
        # one compiled graph per bucket and output kind; the limit only bounds how many dynamo keeps
        limit = len(self.token_buckets) * len(self.batch_buckets) * 4 + 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, limit)
        # HF captures hidden states through hooks it installs on first use, under a lock dynamo cannot trace:
        # install them now (on the view only; its hook dicts are its own)
        for module in verifier.modules() if maybe_install_capturing_hooks is not None else ():
            if isinstance(module, PreTrainedModel):
                maybe_install_capturing_hooks(module)
        self._forward = torch.compile(self._graph, fullgraph=True, dynamic=False, mode=self.mode, backend=backend)

    def fits(self, cache: object, batch: TreeBatch) -> bool:
        """Whether this step can run compiled (otherwise the caller runs it eagerly)."""
        return (isinstance(cache, PagedKVCache) and not any(batch.q_offsets_host)
                and bucket(batch.num_tokens, self.token_buckets) is not None
                and bucket(len(batch.context_lens_host), self.batch_buckets) is not None)

    def pad(self, cache: PagedKVCache, batch: TreeBatch) -> tuple[torch.Tensor, torch.Tensor, StepPlan]:
        """``input_ids [Tp]``, ``positions [Tp]`` and the :class:`StepPlan` of ``batch`` padded to its bucket."""
        t, b = batch.num_tokens, len(batch.context_lens_host)
        tp, bp = bucket(t, self.token_buckets), bucket(b, self.batch_buckets)
        dt, db = tp - t, bp - b
        table = batch.block_table
        plan = StepPlan(
            slot_mapping=F.pad(batch.slot_mapping, (0, dt), value=-1),
            block_table=F.pad(table, (0, cache.k.shape[1] - table.shape[1], 0, db)),
            context_lens=F.pad(batch.context_lens, (0, db)),
            cu_q=F.pad(batch.cu_q, (0, db), value=t),
            tree_mask=F.pad(batch.tree_mask, (0, tp * tp - batch.tree_mask.numel())),
            mask_indptr=F.pad(batch.mask_indptr, (0, db), value=batch.tree_mask.numel()),
            q_offsets=F.pad(batch.q_offsets, (0, db)),
            max_q=tp,
        )
        return F.pad(batch.input_ids, (0, dt)), F.pad(batch.positions, (0, dt)), plan

    def run(self, cache: PagedKVCache, batch: TreeBatch, keep: torch.Tensor | None,
            hidden_layers: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the ``keep`` rows (all ``T`` rows if ``None``) and, if ``hidden_layers`` is given, the
        concatenated hidden states of those HF ``hidden_states`` indices for the ``T`` real tokens."""
        input_ids, positions, plan = self.pad(cache, batch)
        layers = None if hidden_layers is None else tuple(int(i) for i in hidden_layers)
        self.graphs.add((input_ids.numel(), plan.context_lens.numel(), layers))
        if self.graph_mode == "manual":
            flat = self.flat(input_ids, positions, plan)
            key = (input_ids.numel(), plan.context_lens.numel(), layers)
            captures = self._captures.setdefault(cache, {})
            graph = captures.get(key)
            if graph is None:
                try:
                    graph = StepGraph(self._forward, flat, plan.max_q, cache.k, cache.v, layers)
                except RuntimeError as err:  # a capture the platform refuses: the compiled code without graphs
                    warnings.warn(f"CUDA graph capture failed ({err}); running the compiled step without graphs",
                                  stacklevel=2)
                    self.capture_error, self.graph_mode = f"{type(err).__name__}: {err}", "none"
                    return self.run(cache, batch, keep, hidden_layers)
                captures[key] = graph
                self.captures += 1
            logits, hidden = graph.replay(flat)
            self.compiled_steps += 1
            t = batch.num_tokens  # the buffers are overwritten by the next replay: hand out copies
            logits = logits[:t].clone() if keep is None else logits.index_select(0, keep)
            return logits, None if hidden is None else hidden[:t].clone()
        if cache.device.type == "cuda" and cache not in self._static_caches:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            self._static_caches.add(cache)
        graphed = self.mode == "reduce-overhead"
        if graphed:  # the previous replay's outputs were copied out: the graph may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        logits, hidden = self._forward(input_ids, positions, plan, cache.k, cache.v, layers)
        self.compiled_steps += 1
        t = batch.num_tokens
        logits = logits[:t] if keep is None else logits.index_select(0, keep)
        hidden = None if hidden is None else hidden[:t]
        if graphed:  # a CUDA graph's outputs live in its memory pool, overwritten by the next replay
            logits = logits.clone() if keep is None else logits
            hidden = None if hidden is None else hidden.clone()
        return logits, hidden

    @torch.inference_mode()  # as TargetModel.run: no autograd graph (it would also make capture fail)
    def warmup(self, cache: PagedKVCache, max_batch: int, max_tokens: int,
               hidden_layers: Sequence[Sequence[int] | None] = (None,), log=None) -> list[tuple[int, int]]:
        """Trace, compile and (CUDA) capture now every bucket a step of at most ``max_batch`` sequences and
        ``max_tokens`` tokens can use, so a server pays the compilations at start rather than on its first
        requests. Each bucket runs one dummy step: chain trees of token 0 on scratch sequences of ``cache``, all
        released afterwards (their K/V writes land in blocks that are free again). ``hidden_layers``: the output
        kinds the engine will ask for (``None``: logits only; ``[-1]``: the last hidden state too). ``log(msg)``
        reports progress. Returns the ``(tokens, sequences)`` buckets run."""
        done: list[tuple[int, int]] = []
        prev_b = 0
        for bp in self.batch_buckets:
            b = min(bp, max_batch)
            if b <= prev_b:
                break
            prev_t = 0
            for tp in self.token_buckets:
                t = min(tp, max_tokens)
                if t <= prev_t:
                    break
                prev_t = tp
                if t < b:  # every real sequence has a token: this bucket pair never occurs
                    continue
                sizes = [t // b + (i < t % b) for i in range(b)]
                seqs = [cache.add_sequence() for _ in range(b)]
                try:
                    for seq, n in zip(seqs, sizes, strict=True):
                        cache.reserve(seq, n)
                    batch = build_tree_batch(cache, seqs, [TokenTree.chain([0] * n) for n in sizes])
                    for layers in hidden_layers:
                        if log is not None:
                            log(f"compiling the verify step for {tp} tokens x {bp} sequences"
                                + ("" if layers is None else f" (hidden states {list(layers)})"))
                        self.run(cache, batch, None, layers)
                finally:
                    for seq in seqs:
                        cache.release(seq)
                done.append((tp, bp))
            prev_b = bp
        return done

    @property
    def step_graphs(self) -> dict[tuple, StepGraph]:
        """Every live capture, keyed ``(tokens, sequences, layers, id(cache))``."""
        return {(*key, id(cache)): g for cache, graphs in self._captures.items() for key, g in graphs.items()}

    def release(self, cache: PagedKVCache) -> None:
        """Drop the captured graphs over ``cache`` now (they hold its K/V and their own memory; they also go when
        the cache is garbage-collected)."""
        self._captures.pop(cache, None)

    @staticmethod
    def flat(input_ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan) -> list[torch.Tensor]:
        """The step's tensors in :class:`StepGraph` input order."""
        return [input_ids, positions, plan.slot_mapping, plan.block_table, plan.context_lens, plan.cu_q,
                plan.tree_mask, plan.mask_indptr, plan.q_offsets]

    def _graph(self, input_ids, positions, plan: StepPlan, k, v, layers):
        ctx = ForwardContext(OpsCache(k, v), plan, OpsBackend(), plan)
        out = self.verifier(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                            logits_to_keep=0, output_hidden_states=layers is not None, specdec=ctx)
        hidden = None if layers is None else torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)
        return out.logits[0], hidden

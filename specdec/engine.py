"""The decode loop: draft a tree, verify it in one target forward, keep the accepted path, repeat.

With no drafter every tree is the root alone, which is plain autoregressive decoding through the same paged-KV
forward (the in-house baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specdec.acceptance import Verdict, greedy_accept, tree_rejection_sample, typical_accept_lossy
from specdec.interfaces import Draft, Drafter
from specdec.kv_cache import PagedKVCache
from specdec.sampling import GREEDY, SamplingParams, process_logits, sample
from specdec.stats import RequestStats
from specdec.target import TargetModel
from specdec.tree import TokenTree

TokenCallback = Callable[[list[int]], None]


@dataclass(frozen=True)
class GenerationResult:
    """Output of one request.

    Attributes:
        tokens: generated token ids (an EOS token, when it ended the request, is included).
        stop_reason: ``"eos"`` or ``"length"``.
        stats: acceptance and timing statistics (see :mod:`specdec.stats` for tau's definition).
    """

    tokens: list[int]
    stop_reason: str
    stats: RequestStats


class SpeculativeEngine:
    """Greedy speculative decoding of one request at a time over a shared paged KV cache.

    Args:
        target: the verifier.
        cache: paged KV cache built by ``target.new_cache``.
        drafter: proposes trees; ``None`` decodes autoregressively.
        eos_token_ids: generation stops after any of these.
        max_tree_nodes: per-step tree size limit (root included); larger drafts raise ``ValueError``.
        acceptance: ``"exact"`` (greedy at temperature 0, tree rejection sampling above: the output follows the
            target's distribution) or ``"typical_lossy"`` (Medusa's typical acceptance at temperature > 0; does NOT
            preserve the target's distribution).
    """

    def __init__(
        self,
        target: TargetModel,
        cache: PagedKVCache,
        drafter: Drafter | None = None,
        eos_token_ids: Sequence[int] = (),
        max_tree_nodes: int = 64,
        acceptance: str = "exact",
    ) -> None:
        if acceptance not in ("exact", "typical_lossy"):
            raise ValueError(f"unknown acceptance rule {acceptance!r}; choose 'exact' or 'typical_lossy'")
        if drafter is not None and drafter.vocab_size is not None and drafter.vocab_size != target.vocab_size:
            raise ValueError(
                f"tokenizer mismatch: the drafter's vocabulary has {drafter.vocab_size} tokens, "
                f"the target's {target.vocab_size}"
            )
        self.target = target
        self.cache = cache
        self.drafter = drafter
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.max_tree_nodes = max_tree_nodes
        self.acceptance = acceptance

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ``ValueError`` naming the limit if the request cannot fit the model or the cache."""
        if prompt_len == 0:
            raise ValueError("empty prompt: need at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        need = prompt_len + max_new_tokens + self.max_tree_nodes
        if need > self.target.max_positions:
            raise ValueError(
                f"prompt too long: {prompt_len} prompt tokens + {max_new_tokens} new + {self.max_tree_nodes} tree "
                f"nodes exceed the model's context of {self.target.max_positions} tokens"
            )
        if need > self.cache.capacity_tokens:
            raise ValueError(
                f"prompt too long for the cache: {prompt_len} prompt tokens + {max_new_tokens} new + "
                f"{self.max_tree_nodes} tree nodes need {need} KV slots; the cache holds {self.cache.capacity_tokens}"
            )

    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        on_tokens: TokenCallback | None = None,
        sampling: SamplingParams = GREEDY,
    ) -> GenerationResult:
        """Decode until an EOS token or ``max_new_tokens``; every KV block is freed on return or error.

        ``sampling`` at temperature 0 is greedy (token-identical to target-only greedy decoding); above 0 the
        output follows the target's processed distribution (with ``acceptance="exact"``).
        """
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        gen = sampling.generator()
        self.check_request(prompt.numel(), max_new_tokens)
        stats = RequestStats(prompt_tokens=prompt.numel())
        history = torch.empty(prompt.numel() + max_new_tokens, dtype=torch.long)  # static buffer
        history[: prompt.numel()] = prompt
        seq = self.cache.add_sequence()
        start = time.perf_counter()
        try:
            first = self._prefill(seq, prompt, sampling, gen)
            stats.prefill_s = time.perf_counter() - start
            out = self._append(history, prompt.numel(), [first], max_new_tokens, on_tokens)
            while not self._done(out, max_new_tokens):
                verdict = self._step(seq, history[: prompt.numel() + len(out)], stats, sampling, gen)
                out += self._append(history, prompt.numel() + len(out), verdict.tokens.tolist(),
                                    max_new_tokens - len(out), on_tokens)
        finally:
            self.cache.release(seq)
            if self.drafter is not None:
                self.drafter.release(seq)
        stats.new_tokens = len(out)
        stats.total_s = time.perf_counter() - start
        return GenerationResult(out, "eos" if out[-1] in self.eos else "length", stats)

    # ------------------------------------------------------------------ steps
    @property
    def _needs_hidden(self) -> bool:
        return self.drafter is not None and self.drafter.needs_hidden

    def _prefill(self, seq: int, prompt: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
        """Run the prompt as a chain, commit it, tell the drafter, return the target's first token."""
        tree = TokenTree.chain(prompt)
        self.cache.reserve(seq, tree.num_nodes + self.max_tree_nodes)
        out = self.target.forward(self.cache, [seq], [tree], last_only=True, return_hidden=self._needs_hidden)
        self.cache.commit(seq, range(tree.num_nodes), keep_reserved=self.max_tree_nodes)
        logits = out.logits[-1]
        first = int(logits.argmax()) if sampling.greedy else int(sample(process_logits(logits, sampling), gen))
        if self.drafter is not None:
            self.drafter.accept(seq, torch.tensor([first]), out.hidden)
        return first

    def _step(
        self, seq: int, history: torch.Tensor, stats: RequestStats, sampling: SamplingParams, gen: torch.Generator
    ) -> Verdict:
        t0 = time.perf_counter()
        draft = self._draft(seq, history, sampling)
        t1 = time.perf_counter()
        tree = draft.tree
        self.cache.reserve(seq, tree.num_nodes)
        out = self.target.forward(self.cache, [seq], [tree], return_hidden=self._needs_hidden)
        verdict = self._accept(draft, out.logits, sampling, gen)
        self.cache.commit(seq, verdict.path, keep_reserved=self.max_tree_nodes)
        if self.drafter is not None:
            self.drafter.accept(seq, verdict.tokens, None if out.hidden is None else out.hidden[verdict.path])
        stats.draft_s += t1 - t0
        stats.verify_s += time.perf_counter() - t1
        has_children = bool((tree.parents == verdict.path[-1]).any())
        stats.record_step(verdict.num_accepted, has_children, tree.num_nodes)
        return verdict

    def _accept(
        self, draft: Draft, logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator
    ) -> Verdict:
        if sampling.greedy:
            return greedy_accept(draft.tree, logits.argmax(-1))
        probs = process_logits(logits, sampling)
        if self.acceptance == "typical_lossy":
            return typical_accept_lossy(draft.tree, probs, gen)
        return tree_rejection_sample(draft.tree, probs, draft.probs, gen, draft.without_replacement)

    def _draft(self, seq: int, history: torch.Tensor, sampling: SamplingParams) -> Draft:
        root = int(history[-1])
        if self.drafter is None:
            return Draft(TokenTree.chain([root]))
        draft = self.drafter.propose([seq], [history], sampling)[0]
        if int(draft.tree.tokens[0]) != root:
            raise ValueError(f"bad tree: root token {int(draft.tree.tokens[0])} is not the last token {root}")
        draft.tree.check_fits(self.max_tree_nodes)
        return draft

    # ------------------------------------------------------------------ bookkeeping
    def _append(
        self, history: torch.Tensor, at: int, tokens: list[int], room: int, on_tokens: TokenCallback | None
    ) -> list[int]:
        """Clip ``tokens`` at ``room`` and after the first EOS, write them to ``history[at:]``, stream them."""
        tokens = tokens[:room]
        for i, t in enumerate(tokens):
            if t in self.eos:
                tokens = tokens[: i + 1]
                break
        history[at : at + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if on_tokens is not None:
            on_tokens(tokens)
        return tokens

    def _done(self, out: list[int], max_new_tokens: int) -> bool:
        return len(out) >= max_new_tokens or out[-1] in self.eos

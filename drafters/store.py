"""A retrieval store for drafting: the target's own past answers, searched by the last few tokens of the history.

Prompt lookup (:mod:`specdec.drafters.ngram`) only proposes text that already occurred in *this* sequence. Most
steps of an ordinary answer have no such match, and plain decoding runs there. Many of those steps still continue
a phrase the target has written before in other answers ("Here are some", "I hope this helps"). This store holds
a corpus of the target's own greedy answers, and proposes the continuations that most often followed the
history's longest matching suffix there, with their frequencies (as in REST, He et al. 2024, on a corpus of the
model's own outputs).

Index: a token ``t`` is the digit ``t + 1`` in base ``2**bits`` (``bits`` enough for ``vocab_size + 1`` values;
the digit 0 ends a sequence), and every corpus position holds the packed ``width`` digits from there on
(``width = 64 // bits``: 4 tokens for vocabularies of up to 65,535, 3 up to 2**21 - 1) in one ``uint64``. Sorted once,
the positions whose next ``n <= width`` tokens equal a query form one range, found with two ``searchsorted``.
A lookup tries ``n = width`` down to ``min_ngram`` and counts the continuations of at most ``max_matches``
positions spread evenly over the range (memoised: the store never changes).

Files: ``tokens.safetensors`` (``tokens``: the sequences, concatenated; ``lengths``: one length per sequence;
int32) and ``config.json`` (``kind``: ``"store"``, ``vocab_size``, ``sources``, ``num_sequences``,
``num_tokens``). Built by ``python -m specdec.train store`` from generated data folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from specdec.checkpoint import CONFIG_FILE, KIND_KEY, read_json_object


class TokenStore:
    """An immutable corpus of token sequences, searchable by suffix (see the module docstring).

    Args:
        sequences: token id lists (e.g. the target's answers); empty ones are skipped.
        vocab_size: the tokenizer's vocabulary; every token must be below it.
        sources: where the sequences came from (recorded in ``config.json``).
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int, sources: Sequence[str] = ()) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size, self.sources = int(vocab_size), tuple(sources)
        self.bits = int(vocab_size).bit_length()  # digits 0 .. vocab_size
        self.width = 64 // self.bits
        if self.width < 2:
            raise ValueError(f"vocab_size {vocab_size} is too large to pack 2 tokens in 64 bits")
        parts = [np.asarray(s, dtype=np.int64) for s in sequences if len(s)]
        self.lengths = np.array([len(p) for p in parts], dtype=np.int64)
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            raise ValueError(f"store tokens must lie in [0, {vocab_size}), got [{flat.min()}, {flat.max()}]")
        # digits: token + 1, with a 0 after every sequence (and ``width`` trailing zeros so windows never overrun)
        digits = np.zeros(flat.size + len(parts) + self.width, dtype=np.uint64)
        ends = np.cumsum(self.lengths + 1)
        starts = ends - self.lengths - 1
        for (s, p) in zip(starts.tolist(), parts, strict=True):
            digits[s: s + p.size] = p.astype(np.uint64) + 1
        self.digits = digits
        keys = np.zeros(digits.size - self.width, dtype=np.uint64)
        for j in range(self.width):
            keys |= digits[j: j + keys.size] << np.uint64(self.bits * (self.width - 1 - j))
        keep = np.flatnonzero(digits[: keys.size] != 0)  # windows starting on a token
        order = np.argsort(keys[keep], kind="stable")
        self.positions, self.keys = keep[order], keys[keep][order]
        self._lookup = lru_cache(maxsize=1 << 16)(self._lookup_uncached)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def _range(self, query: tuple[int, ...]) -> tuple[int, int]:
        shift = self.bits * (self.width - len(query))
        lo = 0
        for j, tok in enumerate(query):
            lo |= (tok + 1) << (self.bits * (self.width - 1 - j))
        hi = lo + (1 << shift) - 1
        return (int(np.searchsorted(self.keys, np.uint64(lo), side="left")),
                int(np.searchsorted(self.keys, np.uint64(hi), side="right")))

    def _lookup_uncached(self, suffix: tuple[int, ...], min_ngram: int, depth: int,
                         max_matches: int) -> tuple[tuple[tuple[int, ...], float], ...]:
        for n in range(min(self.width, len(suffix)), min_ngram - 1, -1):
            query = suffix[len(suffix) - n:]
            if any(not 0 <= t < self.vocab_size for t in query):
                return ()
            lo, hi = self._range(query)
            if hi <= lo:
                continue
            pick = np.linspace(lo, hi - 1, num=min(max_matches, hi - lo)).round().astype(np.int64)
            starts = self.positions[pick] + n
            window = self.digits[starts[:, None] + np.arange(depth)[None, :]].astype(np.int64)
            counts: dict[tuple[int, ...], int] = {}
            for row in window.tolist():
                for d, digit in enumerate(row):
                    if digit == 0:
                        break
                    key = tuple(t - 1 for t in row[: d + 1])
                    counts[key] = counts.get(key, 0) + 1
            total = len(pick)
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
            return tuple((path, c / total) for path, c in ranked)
        return ()

    def continuations(self, history: torch.Tensor | Sequence[int], min_ngram: int = 2, depth: int = 8,
                      max_matches: int = 64) -> list[tuple[tuple[int, ...], float]]:
        """Continuation prefixes of the longest suffix of ``history`` (at most ``width`` tokens, at least
        ``min_ngram``) found in the store, each with the fraction of the sampled matches it continues; most frequent
        first, a prefix always before its extensions. ``[]`` if no suffix matches."""
        tail = history[-self.width:]
        suffix = tuple(int(t) for t in (tail.tolist() if isinstance(tail, torch.Tensor) else tail))
        return list(self._lookup(suffix, max(1, min_ngram), max(1, depth), max(1, max_matches)))

    def tree_candidates(self, history: torch.Tensor, nodes: int, min_p: float, min_ngram: int = 2,
                        depth: int = 8) -> list[tuple[tuple[int, ...], float]]:
        """At most ``nodes`` continuation prefixes (tree nodes below the root) with their frequencies, each
        continuing at least a ``min_p`` fraction of the matches, most frequent first (a parent always comes before
        its children)."""
        if nodes < 1:
            return []
        out = []
        for path, p in self.continuations(history, min_ngram, min(depth, nodes)):
            if p < min_p:
                break
            out.append((path, p))
            if len(out) == nodes:
                break
        return out

    def tree_paths(self, history: torch.Tensor, nodes: int, min_p: float, min_ngram: int = 2,
                   depth: int = 8) -> list[tuple[int, ...]]:
        """The paths of :meth:`tree_candidates`."""
        return [path for path, _ in self.tree_candidates(history, nodes, min_p, min_ngram, depth)]

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokens = (self.digits[self.digits != 0].astype(np.int64) - 1).astype(np.int32)
        save_file({"tokens": torch.from_numpy(tokens), "lengths": torch.from_numpy(self.lengths.astype(np.int32))},
                  str(folder / "tokens.safetensors"))
        config = {KIND_KEY: "store", "vocab_size": self.vocab_size, "sources": list(self.sources),
                  "num_sequences": int(self.lengths.size), "num_tokens": self.num_tokens}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TokenStore:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = check_store(folder)
        arrays = load_file(str(folder / "tokens.safetensors"))
        tokens, lengths = arrays["tokens"].numpy().astype(np.int64), arrays["lengths"].numpy().astype(np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"{folder}: lengths sum to {int(lengths.sum())} but there are {tokens.size} tokens")
        sequences = np.split(tokens, np.cumsum(lengths)[:-1]) if lengths.size else []
        return cls(sequences, int(config["vocab_size"]), config.get("sources", ()))


def check_store(folder: str | Path) -> dict:
    """The ``config.json`` of a store folder, checked without reading the tokens (fast enough to run before a
    model loads); ``ValueError`` naming what is missing or wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"store {folder} does not exist")
    if not (folder / "tokens.safetensors").is_file() or not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder} is not a token store (needs tokens.safetensors and config.json)")
    config = read_json_object(folder / CONFIG_FILE)
    if config.get(KIND_KEY, "store") != "store":
        raise ValueError(f"{folder} holds {config[KIND_KEY]!r} weights, not a token store")
    if "vocab_size" not in config:
        raise ValueError(f"{folder / CONFIG_FILE} has no vocab_size")
    return config

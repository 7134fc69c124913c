"""Whole-batch acceptance equals the per-tree rules it replaces, node for node and token for token."""

import random

import torch

from specdec.acceptance import greedy_accept, tree_rejection_sample
from specdec.acceptance_batch import PaddedTrees, greedy_accept_batch, rejection_sample_batch
from specdec.tree import TokenTree


def _random_tree(rng: random.Random, vocab: int, max_nodes: int = 12, dup: bool = True) -> TokenTree:
    n = rng.randint(1, max_nodes)
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    tokens = [rng.randrange(vocab) for _ in range(n)]
    if dup and n > 2:  # duplicate siblings exercise the "first matching child" rule
        tokens[n - 1] = tokens[next((i for i in range(1, n - 1) if parents[i] == parents[n - 1]), n - 1)]
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


def test_greedy_batch_equals_the_sequential_walk_on_random_trees():
    rng = random.Random(0)
    for _ in range(40):
        trees = [_random_tree(rng, 4) for _ in range(rng.randint(1, 6))]
        argmax = [torch.tensor([rng.randrange(4) for _ in range(t.num_nodes)]) for t in trees]
        padded = PaddedTrees.stack(trees)
        n = padded.tokens.shape[1]
        target = torch.stack([torch.nn.functional.pad(a, (0, n - a.numel())) for a in argmax])
        depth = max(t.max_depth for t in trees)
        got = greedy_accept_batch(padded, target, depth)
        for b, (tree, a) in enumerate(zip(trees, argmax, strict=True)):
            want = greedy_accept(tree, a)
            k = want.num_accepted
            assert int(got.accept_len[b]) == k
            assert got.path[b, : k + 1].tolist() == want.path and (got.path[b, k + 1 :] == -1).all()
            assert got.tokens[b, : k + 1].tolist() == want.tokens.tolist() and (got.tokens[b, k + 1 :] == -1).all()


def _probs(gen: torch.Generator, shape, vocab: int, sharp: float = 3.0) -> torch.Tensor:
    logits = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * sharp
    logits[..., 0] = logits[..., 0].clamp(max=-50.0)  # some zero-probability mass
    return logits.softmax(-1)


def test_rejection_batch_equals_the_sequential_rule_fed_the_same_noise():
    rng, gen, vocab = random.Random(1), torch.Generator().manual_seed(1), 6
    accepted_deep = 0
    for trial in range(60):
        trees = [_random_tree(rng, vocab, dup=False) for _ in range(rng.randint(1, 5))]
        padded = PaddedTrees.stack(trees)
        b, n = padded.tokens.shape
        p = _probs(gen, (b, n), vocab)
        q = None if trial % 3 == 0 else _probs(gen, (b, n), vocab, sharp=1.0)
        wr = torch.tensor([trial % 2 == 1 and q is not None] * b)
        u = torch.rand(b, n, generator=gen, dtype=torch.float64)
        race = torch.empty(b, vocab, dtype=torch.float64).exponential_(generator=gen)
        depth = max(t.max_depth for t in trees)
        kids = max((int(torch.bincount(t.parents[1:]).max()) if t.num_nodes > 1 else 0) for t in trees)
        got = rejection_sample_batch(padded, p, q, u, race, wr, depth, kids)
        for i, tree in enumerate(trees):
            m = tree.num_nodes
            want = tree_rejection_sample(tree, p[i, :m], None if q is None else q[i, :m], None, bool(wr[i]),
                                         uniforms=u[i, :m], race=race[i])
            k = want.num_accepted
            accepted_deep += int(k >= 2)
            assert int(got.accept_len[i]) == k, (trial, i)
            assert got.path[i, : k + 1].tolist() == want.path
            assert got.tokens[i, : k + 1].tolist() == want.tokens.tolist()
    assert accepted_deep > 5  # the acceptance path, not only rejections, was compared

"""The whole engine through the Triton backend (interpreted on CPU) matches the PyTorch backend."""

import pytest
import torch

from specdec.attention import TorchBackend, TritonBackend
from specdec.engine import SpeculativeEngine
from specdec.target import TargetModel
from specdec.tree import TokenTree

from .conftest import tiny_llama
from .test_engine import NoisyOracleDrafter

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1",
)


@pytest.fixture(scope="module")
def model32():
    return tiny_llama(dtype=torch.float32, seed=3)


def test_tree_logits_match_between_backends(model32):
    torch.manual_seed(0)
    logits = []
    for backend in (TorchBackend(), TritonBackend()):
        target = TargetModel(model32, backend)
        cache = target.new_cache(32, 4)
        seq = cache.add_sequence()
        cache.reserve(seq, 13)
        target.forward(cache, [seq], [TokenTree.chain(torch.arange(13) % 64)])
        cache.commit(seq, range(13))
        tree = TokenTree(torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([-1, 0, 0, 1, 2, 2]))
        cache.reserve(seq, tree.num_nodes)
        logits.append(target.forward(cache, [seq], [tree]).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_decoding_is_identical_through_triton(model32, seed):
    prompt = torch.randint(0, 64, (9 + seed,), generator=torch.Generator().manual_seed(seed))
    ref_target = TargetModel(model32, TorchBackend())
    ar = SpeculativeEngine(ref_target, ref_target.new_cache(64, 4)).generate(prompt, 24)
    results = []
    for backend in (TorchBackend(), TritonBackend()):
        target = TargetModel(model32, backend)
        cache = target.new_cache(64, 4)
        drafter = NoisyOracleDrafter(prompt.tolist() + ar.tokens, seed, max_nodes=8)
        results.append(SpeculativeEngine(target, cache, drafter, max_tree_nodes=16).generate(prompt, 24))
        assert cache.allocator.num_free == 64
    assert results[1].tokens == results[0].tokens == ar.tokens
    assert results[1].stats.tau > 1.0

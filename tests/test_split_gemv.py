import pytest
import torch
import torch.nn.functional as F

from specdec.split_gemv import SplitGemvMode, split_linear
from specdec.target import TargetModel
from specdec.tree import TokenTree


@pytest.mark.parametrize("shape", [(1, 8), (3, 8), (2, 5, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_split_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64) if bias else None
    for chunks in (1, 2, 3, 4):
        torch.testing.assert_close(split_linear(x, w, b, chunks), F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_mode_intercepts_small_linears_only():
    layer = torch.nn.Linear(8, 6)
    calls = []

    class Spy(SplitGemvMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                calls.append(args[0].shape[0])
            return super().__torch_function__(func, types, args, kwargs)

    with Spy(chunks=2, max_rows=4):
        small, big = layer(torch.randn(3, 8)), layer(torch.randn(9, 8))
    assert calls == [3, 9] and small.shape == (3, 6) and big.shape == (9, 6)


def test_target_logits_unchanged_by_split_gemv(tiny_model):
    tree = TokenTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 0, 0, 1]))
    logits = []
    for split in (False, True):
        target = TargetModel(tiny_model, split_gemv=split)
        cache = target.new_cache(8, 4)
        seq = cache.add_sequence()
        cache.reserve(seq, 4)
        logits.append(target.forward(cache, [seq], [tree]).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)

import pytest
import torch
import torch.nn.functional as F

from specdec import split_gemv
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


def _spy_split(monkeypatch):
    """Record the row count of every call that takes the split path (``split_linear``), not every ``F.linear``."""
    calls = []
    real = split_gemv.split_linear

    def spy(x, weight, bias, chunks):
        calls.append((x.numel() // x.shape[-1], tuple(weight.shape), chunks))
        return real(x, weight, bias, chunks)

    monkeypatch.setattr(split_gemv, "split_linear", spy)
    return calls


def test_mode_routes_small_linears_only_through_the_split(monkeypatch):
    calls = _spy_split(monkeypatch)
    layer, odd = torch.nn.Linear(8, 6), torch.nn.Linear(8, 5)  # 5 output rows do not split into 2 slices
    xs = {n: torch.randn(n, 8) for n in (3, 4, 5, 9)}
    with SplitGemvMode(chunks=2, max_rows=4):
        outs = {n: layer(x) for n, x in xs.items()}
        batched = layer(torch.randn(2, 2, 8))  # 4 rows in a 3-d input: still small
        odd_out = odd(xs[3])
    assert calls == [(3, (6, 8), 2), (4, (6, 8), 2), (4, (6, 8), 2)]  # 5 and 9 rows, and the odd layer, fall through
    for n, x in xs.items():
        torch.testing.assert_close(outs[n], F.linear(x, layer.weight, layer.bias))
    assert batched.shape == (2, 2, 6) and odd_out.shape == (3, 5)
    calls.clear()
    with SplitGemvMode(chunks=1, max_rows=4):  # one chunk: nothing to split
        layer(xs[3])
    assert calls == []


def test_target_logits_unchanged_by_split_gemv(tiny_model, monkeypatch):
    tree = TokenTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 0, 0, 1]))
    calls = _spy_split(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two weight slices, whatever this machine has
    logits, used = [], []
    for split in (False, True):
        target = TargetModel(tiny_model, split_gemv=split)
        cache = target.new_cache(8, 4)
        seq = cache.add_sequence()
        cache.reserve(seq, 4)
        logits.append(target.forward(cache, [seq], [tree]).logits)
        used.append(len(calls))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)
    # the split path really ran, only when switched on: every projection (7 per layer, 2 layers) and the LM head
    assert used == [0, 15]

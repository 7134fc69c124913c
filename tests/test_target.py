"""Tree verification through the paged cache equals plain causal attention over each root-to-node branch."""

import pytest
import torch

from specdec.attention import TorchBackend, build_tree_batch, select_backend
from specdec.tree import TokenTree

from .conftest import tiny_llama


def _plain_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("parents", [[-1, 0, 0, 1, 1, 2, 3], [-1, 0, 1, 2], [-1], [-1, 0, 0, 0, 0, 0, 1, 1, 2, 6]])
def test_tree_logits_equal_branch_logits(tiny_target, tiny_model, block_size, parents):
    torch.manual_seed(1)
    prompt = torch.randint(0, 64, (11,)).tolist()
    tree = TokenTree(torch.randint(0, 64, (len(parents),)), torch.tensor(parents))
    cache = tiny_target.new_cache(32, block_size)
    seq = cache.add_sequence()
    cache.reserve(seq, len(prompt) - 1)
    tiny_target.forward(cache, [seq], [TokenTree.chain(prompt[:-1])])
    cache.commit(seq, range(len(prompt) - 1))
    tree = TokenTree(torch.tensor([prompt[-1], *tree.tokens[1:].tolist()]), tree.parents)
    cache.reserve(seq, tree.num_nodes)
    logits = tiny_target.forward(cache, [seq], [tree]).logits
    for node in range(tree.num_nodes):
        branch = prompt[:-1] + tree.tokens[tree.path_to(node)].tolist()
        torch.testing.assert_close(logits[node], _plain_logits(tiny_model, branch)[-1], rtol=1e-9, atol=1e-9)


def test_batch_of_ragged_trees_equals_each_alone(tiny_target):
    torch.manual_seed(2)
    cache = tiny_target.new_cache(64, 4)
    trees = [TokenTree(torch.randint(0, 64, (n,)), torch.tensor(p))
             for n, p in [(4, [-1, 0, 0, 1]), (1, [-1]), (6, [-1, 0, 1, 1, 0, 4])]]
    seqs = []
    for length in (9, 4, 17):
        seq = cache.add_sequence()
        cache.reserve(seq, length)
        tiny_target.forward(cache, [seq], [TokenTree.chain(torch.randint(0, 64, (length,)))])
        cache.commit(seq, range(length))
        cache.reserve(seq, 8)
        seqs.append(seq)
    together = tiny_target.forward(cache, seqs, trees).logits
    alone = torch.cat([tiny_target.forward(cache, [s], [t]).logits for s, t in zip(seqs, trees, strict=True)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)


def test_hf_generate_after_a_specdec_forward_equals_generate_before_any(tiny_target):
    """The caller's model is left untouched: ``generate`` (tokens and per-step logits) is the same before any
    specdec forward and after several, and still differs for another prompt (it really ran)."""
    from specdec.target import TargetModel

    model = tiny_llama(seed=4)  # a fresh model: nothing of specdec has touched it yet
    prompt = torch.tensor([[1, 2, 3, 9, 4]])
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True}
    attn = model.config._attn_implementation
    with torch.inference_mode():
        before = model.generate(prompt, **kwargs)
    target = TargetModel(model)
    cache = target.new_cache(8, 4)
    seq = cache.add_sequence()
    cache.reserve(seq, 3)
    target.forward(cache, [seq], [TokenTree.chain([1, 2, 3])])
    cache.commit(seq, range(3))
    cache.reserve(seq, 4)
    target.forward(cache, [seq], [TokenTree(torch.tensor([3, 9, 5, 4]), torch.tensor([-1, 0, 0, 1]))])
    assert model.config._attn_implementation == attn != "specdec_paged"
    with torch.inference_mode():
        after = model.generate(prompt, **kwargs)
        other = model.generate(torch.tensor([[7, 7, 1]]), **kwargs)
    assert torch.equal(after.sequences, before.sequences)
    for a, b in zip(after.scores, before.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(other.sequences[0, 3:], before.sequences[0, 5:])


def test_build_tree_batch_positions_and_slots():
    model = tiny_llama(layers=1)
    from specdec.target import TargetModel

    cache = TargetModel(model).new_cache(8, 4)
    seq = cache.add_sequence()
    cache.reserve(seq, 5)
    cache.commit(seq, range(5))
    tree = TokenTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 0, 0, 2]))
    cache.reserve(seq, tree.num_nodes)
    batch = build_tree_batch(cache, [seq], [tree])
    assert batch.positions.tolist() == [5, 6, 6, 7]  # RoPE: committed length + depth
    assert batch.slot_mapping.tolist() == cache.slots(seq, torch.arange(5, 9)).tolist()  # committed + index
    assert batch.context_lens.tolist() == [5] and batch.cu_q.tolist() == [0, 4]


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("SPECDEC_ATTENTION", raising=False)
    assert isinstance(select_backend(device="cpu"), TorchBackend)
    assert select_backend("triton").name == "triton"
    monkeypatch.setenv("SPECDEC_ATTENTION", "triton")
    assert select_backend(device="cpu").name == "triton"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        select_backend("flash")

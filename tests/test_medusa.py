"""Medusa heads drafter: shapes, save/load, tree limits, and greedy equality with autoregressive decoding."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads, medusa_choices
from specdec.engine import SpeculativeEngine
from specdec.sampling import SamplingParams
from specdec.target import TargetModel
from tests.conftest import inputs
from tests.oracles import PlantedMedusaHeads

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama())


def _prompt(seed: int, n: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def _perturb(heads: MedusaHeads, seed: int = 0) -> MedusaHeads:
    """Give the residual blocks random weights, so heads differ from each other and from the LM head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if "linear" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return heads


class OracleHeads(nn.Module):
    """Test heads that know the reference continuation: they find the position of the hidden state they get among
    the reference's hidden states and put head ``k``'s top logit on the token ``k`` places after the root. Only a
    drafter that honours the hidden-state contract (``hidden[-1]`` predicted the root) gets near-full acceptance."""

    def __init__(self, model, reference: torch.Tensor, num_heads: int = 3) -> None:
        super().__init__()
        self.config = MedusaConfig(32, 64, num_heads)
        with torch.inference_mode():
            self.ref_hidden = model(reference[None], output_hidden_states=True).hidden_states[-1][0].clone()
        self.reference = reference.tolist()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.cdist(hidden.to(self.ref_hidden.dtype), self.ref_hidden).argmin(-1)  # hidden[pos] -> ref[pos+1]
        logits = torch.linspace(0, 1, 64, dtype=torch.float64).repeat(hidden.shape[0], self.config.num_heads, 1)
        for b, p in enumerate(pos.tolist()):
            for k in range(self.config.num_heads):
                if p + 2 + k < len(self.reference):
                    logits[b, k, self.reference[p + 2 + k]] = 5.0
        return logits

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)  # no draft vocabulary


# ---------------------------------------------------------------------- heads


@pytest.mark.parametrize("share", [False, True])
def test_forward_shapes_and_untrained_heads_reproduce_the_lm_head(target, share):
    drafter = MedusaDrafter.untrained(target, num_heads=3, share_lm_head=share)
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    logits = drafter.heads(hidden)
    assert logits.shape == (2, 5, 3, 64) and logits.dtype == torch.float64
    base = target.model.get_output_embeddings()(hidden)
    for k in range(3):
        torch.testing.assert_close(logits[..., k, :], base)
    names = [n for n, _ in drafter.heads.named_parameters()]
    assert len(names) == (6 if share else 9)  # 3 x (linear weight + bias) [+ own LM head]


def test_config_and_constructor_errors(target):
    with pytest.raises(ValueError, match="bad Medusa config"):
        MedusaConfig(32, 64, 0)
    with pytest.raises(ValueError, match="needs the target's LM head"):
        MedusaHeads(MedusaConfig(32, 64, 2, share_lm_head=True))
    with pytest.raises(ValueError, match="LM head weight has shape"):
        MedusaHeads(MedusaConfig(16, 64, 2), target.model.get_output_embeddings())
    heads = MedusaHeads(MedusaConfig(32, 64, 2))
    with pytest.raises(ValueError, match="not both"):
        MedusaDrafter(heads, choices=[(0,)], budget=4)
    with pytest.raises(ValueError, match="depth"):
        MedusaDrafter(heads, budget=8, depth=3)
    with pytest.raises(ValueError, match="choices need 3 heads"):
        MedusaDrafter(heads, choices=[(0,), (0, 0), (0, 0, 0)])


def test_default_choices_are_sorted_ancestor_closed_medusa_trees():
    for heads, nodes in [(3, 16), (4, 30), (1, 5)]:
        choices = medusa_choices(heads, nodes)
        assert len(choices) == len(set(choices)) == nodes
        assert choices == sorted(choices, key=lambda c: (len(c), c))
        assert all(c[:-1] in choices for c in choices if len(c) > 1)
        assert max(map(len, choices)) <= heads
    assert medusa_choices()[:5] == [(0,), (1,), (2,), (3,), (0, 0)]


# ---------------------------------------------------------------------- proposals


def test_propose_needs_a_hidden_state_first(target):
    drafter = MedusaDrafter.untrained(target)
    with pytest.raises(ValueError, match=r"no hidden state for sequence\(s\) \[7\]"):
        drafter.propose(inputs([7], [torch.tensor([1, 2])]))
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        drafter.accept(7, torch.tensor([2]), None)
    drafter.accept(7, torch.tensor([2]), torch.randn(3, 32, dtype=torch.float64))
    assert drafter.propose(inputs([7], [torch.tensor([1, 2])]))[0].tree.tokens[0] == 2
    drafter.release(7)
    with pytest.raises(ValueError, match="no hidden state"):
        drafter.propose(inputs([7], [torch.tensor([1, 2])]))


def test_static_tree_follows_the_choices_and_each_heads_topk(target):
    heads = _perturb(MedusaDrafter.untrained(target).heads)
    choices = [(0,), (1,), (0, 0), (0, 2), (0, 0, 1)]
    drafter = MedusaDrafter(heads, choices=choices)
    hidden = torch.randn(4, 32, dtype=torch.float64)
    drafter.accept(0, torch.tensor([9]), hidden)
    [draft] = drafter.propose(inputs([0], [torch.tensor([3, 9])]))
    top = heads(hidden[-1]).topk(3, dim=-1).indices.tolist()  # [K, 3]
    assert draft.probs is None
    assert draft.tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert draft.tree.tokens.tolist() == [9, top[0][0], top[0][1], top[1][0], top[1][2], top[2][1]]


@pytest.mark.parametrize("budget,depth,topk", [(1, 3, 4), (5, 1, 4), (12, 3, 4), (20, 2, 3), (40, 3, 2)])
def test_dynamic_tree_respects_budget_and_depth(target, budget, depth, topk):
    drafter = MedusaDrafter(_perturb(MedusaDrafter.untrained(target).heads), budget=budget, depth=depth, topk=topk)
    for seq in range(3):
        drafter.accept(seq, torch.tensor([5]), torch.randn(2, 32, dtype=torch.float64))
    drafts = drafter.propose(inputs([0, 1, 2], [torch.tensor([5])] * 3))
    for draft in drafts:
        tree = draft.tree
        assert tree.num_nodes <= budget and tree.max_depth <= depth and tree.tokens[0] == 5
        assert tree.num_nodes == min(budget, 1 + topk + (depth - 1) * topk**2)  # frontier: topk nodes per level


@pytest.mark.parametrize("share", [False, True])
def test_save_load_gives_identical_proposals(target, tmp_path, share):
    drafter = MedusaDrafter.untrained(target, num_heads=3, share_lm_head=share)
    _perturb(drafter.heads).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "hidden_size": 32, "vocab_size": 64, "num_heads": 3, "num_layers": 1, "share_lm_head": share,
        "draft_vocab_size": 0, "kind": "medusa"}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert ((64, 32) in shapes.values()) != share  # a shared LM head is never saved
    loaded = MedusaDrafter.from_pretrained(tmp_path, target)
    hidden = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded.heads(hidden), drafter.heads(hidden), rtol=0, atol=0)
    for d in (drafter, loaded):
        d.accept(0, torch.tensor([4]), hidden)
    [ours], [theirs] = (d.propose(inputs([0], [torch.tensor([4])])) for d in (drafter, loaded))
    assert ours.tree.tokens.tolist() == theirs.tree.tokens.tolist()
    assert ours.tree.parents.tolist() == theirs.tree.parents.tolist()
    if share:
        with pytest.raises(ValueError, match="needs the target's LM head"):
            MedusaHeads.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", [{}, {"budget": 12}, {"share_lm_head": True, "budget": 8, "depth": 2}])
def test_greedy_equals_autoregressive(target, mode):
    """Heads that know the next ``g`` tokens for a random ``g`` per step (planted into the real heads' logits,
    the rest of the tree from the heads themselves): drafts are accepted at every depth and rejected too, and
    the output still equals autoregressive decoding."""
    cache = target.new_cache(64, 4)
    depth = mode.get("depth", 3)
    for seed in range(3):
        prompt = _prompt(seed, 5 + 4 * seed)
        ar = SpeculativeEngine(target, cache).generate(prompt, 24)
        drafter = MedusaDrafter.untrained(target, **mode)
        if seed == 2:
            _perturb(drafter.heads, seed)  # heads that disagree with each other and with the LM head
        drafter.heads = PlantedMedusaHeads(drafter.heads, target.model, prompt.tolist() + ar.tokens, seed)
        spec = SpeculativeEngine(target, cache, drafter).generate(prompt, 24)
        assert spec.tokens == ar.tokens
        s = spec.stats
        assert s.tau > 1.3 and s.depth_accepted[depth - 1] > 0  # accepted, down to the deepest head
        assert sum(s.depth_accepted) < sum(s.depth_tried)  # and rejected
        assert cache.allocator.num_free == 64
        assert drafter._hidden == {}  # released


@pytest.mark.parametrize("mode", [{}, {"budget": 10}])
def test_heads_that_know_the_answer_are_accepted_in_full(target, mode):
    """Checks the hidden-state alignment: head k on hidden[-1] drafts depth k below the root."""
    cache = target.new_cache(64, 4)
    prompt = _prompt(11, 9)
    ar = SpeculativeEngine(target, cache).generate(prompt, 25)
    oracle = OracleHeads(target.model, torch.cat([prompt, torch.tensor(ar.tokens)]))
    spec = SpeculativeEngine(target, cache, MedusaDrafter(oracle, **mode)).generate(prompt, 25)
    assert spec.tokens == ar.tokens
    assert spec.stats.steps == 6 and spec.stats.accepted_hist[3] == 6  # 1 + 6 x 4 tokens: every draft accepted
    assert cache.allocator.num_free == 64


def test_sampling_runs_and_reproduces_with_a_seed(target):
    cache = target.new_cache(64, 4)
    drafter = MedusaDrafter(_perturb(MedusaDrafter.untrained(target).heads, 3))
    runs = [SpeculativeEngine(target, cache, drafter).generate(_prompt(4), 20, sampling=SamplingParams(0.8, seed=0))
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 20
    assert cache.allocator.num_free == 64

"""EAGLE feature drafter: greedy equality, catch-up pairs, no stale KV, save/load, lossless chain sampling."""

import json

import pytest
import torch
from safetensors import safe_open

from specdec.drafters.eagle import EagleDrafter, EagleHead
from specdec.engine import SpeculativeEngine
from specdec.sampling import SamplingParams
from specdec.target import TargetModel
from tests.conftest import inputs
from tests.oracles import plant_eagle

from .conftest import assert_same_committed_kv, first_two_tokens_pvalue, tiny_llama

OPTIONS = {"depth": 3, "budget": 8, "topk": 2, "num_blocks": 64, "block_size": 4}


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=3))


def _prompt(seed: int, n: int = 9, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _features(target: TargetModel, tokens: torch.Tensor) -> torch.Tensor:
    """``[L, H]`` the target's post-norm last hidden states of ``tokens`` (plain HF forward)."""
    with torch.inference_mode():
        return target.model(tokens[None], output_hidden_states=True).hidden_states[-1][0]


@pytest.mark.parametrize("tree", ["chain", "dynamic"])
def test_greedy_output_equals_autoregressive(target, tree):
    """A head that predicts the target's true next feature part of the time (planted into the real head's
    forward, at random rows): drafts are accepted at depth 2 and deeper and rejected too; output unchanged."""
    cache = target.new_cache(96, 4)
    for seed in range(3):
        drafter = EagleDrafter.untrained(target, tree=tree, **OPTIONS)
        prompt = _prompt(seed, n=5 + 3 * seed)
        ar = SpeculativeEngine(target, cache).generate(prompt, 20)
        plant_eagle(drafter.head, target.model, prompt.tolist() + ar.tokens, seed=seed)
        spec = SpeculativeEngine(target, cache, drafter, max_tree_nodes=16).generate(prompt, 20)
        assert spec.tokens == ar.tokens
        s = spec.stats
        assert s.tau > 1.3 and s.depth_accepted[1] > 0 and sum(s.depth_accepted) < sum(s.depth_tried)
        assert cache.allocator.num_free == 96 and drafter.cache.allocator.num_free == 64


def test_catch_up_feeds_the_real_history_pairs(target):
    drafter = EagleDrafter.untrained(target, tree="dynamic", **OPTIONS)
    calls, state = [], {"catch_up": False}
    head_forward, propose = drafter.head.forward, drafter.propose

    def spy_propose(*args, **kwargs):
        state["catch_up"] = True
        return propose(*args, **kwargs)

    def spy_head(features, tokens, positions, specdec):
        if state.pop("catch_up", False):  # the first head call of each propose is the catch-up chain
            calls.append((features.clone(), tokens.clone(), positions.clone()))
        return head_forward(features, tokens, positions, specdec)

    drafter.propose, drafter.head.forward = spy_propose, spy_head
    prompt = _prompt(5, n=7)
    cache = target.new_cache(96, 4)
    result = SpeculativeEngine(target, cache, drafter, max_tree_nodes=16).generate(prompt, 16)
    seq = torch.cat([prompt, torch.tensor(result.tokens)])
    h = _features(target, seq)
    assert len(calls) == result.stats.steps and calls[0][2].tolist() == list(range(prompt.numel()))
    end = 0
    for features, tokens, positions in calls:
        t = positions
        assert int(t[0]) == max(end - 1, 0)  # starts at the last uncommitted pair (the previous root)
        assert torch.equal(t, torch.arange(int(t[0]), int(t[0]) + t.numel()))
        torch.testing.assert_close(features, h[t], rtol=1e-10, atol=1e-10)  # (h_t, x_{t+1})
        assert torch.equal(tokens, seq[t + 1])
        end = int(t[-1]) + 1


def test_draft_state_after_a_rejection_equals_a_fresh_drafter(target):
    opts = {**OPTIONS, "tree": "chain", "depth": 4, "num_blocks": 32}
    drafter = EagleDrafter.untrained(target, **opts)
    fresh = EagleDrafter(drafter.head, **opts)
    history = _prompt(1, n=11)
    drafter.accept(0, history[-1:], _features(target, history)[:-1])
    [proposal] = drafter.propose(inputs([0], [history]))
    drafted = proposal.tree.tokens[1:].tolist()
    accepted = torch.tensor([drafted[0], (drafted[1] + 1) % 64])  # first draft accepted, second replaced (bonus)
    new_history = torch.cat([history, accepted])
    h = _features(target, new_history)
    drafter.accept(0, accepted, h[history.numel() - 1 : history.numel() + 1])  # root + accepted node
    [after] = drafter.propose(inputs([0], [new_history]))
    fresh.accept(7, new_history[-1:], h[:-1])
    [fresh_proposal] = fresh.propose(inputs([7], [new_history]))
    assert after.tree.tokens.tolist() == fresh_proposal.tree.tokens.tolist()
    n = drafter.cache.num_tokens(drafter._seqs[0])
    assert n == fresh.cache.num_tokens(fresh._seqs[7]) == new_history.numel() - 2  # real pairs, root excluded
    assert_same_committed_kv(drafter.cache, drafter._seqs[0], fresh.cache, fresh._seqs[7], n)
    drafter.release(0)
    fresh.release(7)
    assert drafter.cache.allocator.num_free == 32 and fresh.cache.allocator.num_free == 32


def test_save_load_gives_identical_proposals(target, tmp_path):
    drafter = EagleDrafter.untrained(target, tree="dynamic", **OPTIONS)
    drafter.head.save_pretrained(tmp_path)
    loaded = EagleDrafter.from_pretrained(tmp_path, target, tree="dynamic", **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["layer_config"]["model_type"] == "llama"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("fc.", "layer.")) for k in keys)
    assert not any("embed" in k or "lm_head" in k for k in keys)
    lm_weight = target.model.get_output_embeddings().weight
    assert isinstance(loaded.head, EagleHead) and loaded.head.proj_weight.data_ptr() == lm_weight.data_ptr()
    history = _prompt(2, n=10)
    h = _features(target, history)[:-1]
    for d in (drafter, loaded):
        d.accept(0, history[-1:], h)
    [a], [b] = drafter.propose(inputs([0], [history])), loaded.propose(inputs([0], [history]))
    assert a.tree.tokens.tolist() == b.tree.tokens.tolist() and a.tree.parents.tolist() == b.tree.parents.tolist()
    assert a.tree.num_nodes == OPTIONS["budget"]


def test_accept_without_hidden_and_bad_options_are_refused(target):
    drafter = EagleDrafter.untrained(target, **OPTIONS)
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        drafter.accept(0, torch.tensor([1]))
    with pytest.raises(ValueError, match="no features for sequence 3"):
        drafter.propose(inputs([3], [torch.tensor([1, 2])]))
    with pytest.raises(ValueError, match="unknown tree shape 'bush'"):
        EagleDrafter(drafter.head, tree="bush")


def test_chain_sampling_preserves_the_target_distribution():
    """First two tokens' joint with a sampled EAGLE chain (head probabilities reported) vs the exact target."""
    target = TargetModel(tiny_llama(vocab=8, seed=11))
    torch.manual_seed(4)
    drafter = EagleDrafter.untrained(target, tree="chain", depth=2, num_blocks=1024, block_size=4)
    pvalue, accepted = first_two_tokens_pvalue(target, drafter, [1, 5, 2, 7, 3], 2000, SamplingParams(1.0), 4)
    assert pvalue > 1e-3 and accepted > 2000 // 20
    assert drafter.cache.allocator.num_free == 1024


def test_chain_matches_a_plain_causal_run_of_the_head(target):
    """Greedy chain = the head run autoregressively with ordinary causal attention (no paged cache): real pairs,
    then each draft token paired with the previous PREDICTED feature, RoPE at its absolute position."""
    drafter = EagleDrafter.untrained(target, tree="chain", depth=3, num_blocks=32, block_size=4)
    head = drafter.head
    history = _prompt(8, n=9)
    h = _features(target, history)[:-1]
    drafter.accept(0, history[-1:], h)
    [draft] = drafter.propose(inputs([0], [history]))

    def plain(features, tokens):
        n = tokens.numel()
        x = head.fc(torch.cat([head.embed_tokens(tokens), features], -1))[None]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)[None, None]
        cfg, previous = head.layer.self_attn.config, head.layer.self_attn.config._attn_implementation
        cfg._attn_implementation = "eager"
        try:
            return head.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=head.rotary(x, pos))[0]
        finally:
            cfg._attn_implementation = previous

    feats, tokens, expected = h, history[1:], []
    with torch.inference_mode():
        for _ in range(3):
            out = plain(feats, tokens)
            expected.append(int(head.logits(out[-1]).argmax()))
            feats, tokens = torch.cat([feats, out[-1:]]), torch.cat([tokens, torch.tensor(expected[-1:])])
    assert draft.tree.tokens[1:].tolist() == expected and draft.probs is None

"""Draft vocabularies: frequency ranking, id mapping, and Medusa / EAGLE heads restricted to a draft vocabulary
(save/load, proposals inside the vocabulary, greedy output still equal to autoregressive decoding)."""

import pytest
import torch

from specdec.draft_vocab import check_vocab_ids, draft_index, expand_logits, frequent_tokens
from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.engine import SpeculativeEngine
from specdec.target import TargetModel
from tests.conftest import inputs
from tests.oracles import PlantedMedusaHeads, plant_eagle

from .conftest import tiny_llama

VOCAB_IDS = torch.tensor([0, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47], dtype=torch.long)


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=5))


def test_frequent_tokens_ranks_by_count_then_id_and_keeps_always():
    seqs = [[5, 5, 5, 2, 2, 9], [9, 1, 1, 7]]
    assert frequent_tokens(seqs, 2, 10).tolist() == [1, 5]  # counts 5:3, then 1, 2, 9 tie at 2 -> lowest id 1
    assert frequent_tokens(seqs, 2, 10, always=[8]).tolist() == [1, 5, 8]
    assert frequent_tokens(seqs, 100, 10).tolist() == [1, 2, 5, 7, 9]
    with pytest.raises(ValueError, match="size must be >= 1"):
        frequent_tokens(seqs, 0, 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        frequent_tokens([[3, 12]], 4, 10)


def test_index_and_expand_round_trip():
    ids = torch.tensor([1, 4, 6])
    assert draft_index(torch.tensor([[4, 0], [6, 1]]), ids, 8).tolist() == [[1, -1], [2, 0]]
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    full = expand_logits(logits, ids, 8)
    assert full.shape == (1, 8) and full[0, [1, 4, 6]].tolist() == [0.5, -1.0, 2.0]
    assert torch.isinf(full[0, [0, 2, 3, 5, 7]]).all()
    assert expand_logits(logits, None, 3) is logits
    for bad in (torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([0, 8]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="vocab_ids"):
            check_vocab_ids(bad, 8)


@pytest.mark.parametrize("share", [False, True])
def test_medusa_heads_with_a_draft_vocab(target, tmp_path, share):
    lm_head = target.model.get_output_embeddings()
    config = MedusaConfig(32, 64, num_heads=3, share_lm_head=share, draft_vocab_size=VOCAB_IDS.numel())
    heads = MedusaHeads(config, lm_head, VOCAB_IDS).double()
    hidden = torch.randn(5, 32, dtype=torch.float64)
    assert heads(hidden).shape == (5, 3, 16)
    # untrained heads = the target's LM head restricted to the draft rows
    torch.testing.assert_close(heads(hidden)[:, 0], lm_head(hidden)[:, VOCAB_IDS])
    heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path, lm_head)
    assert torch.equal(loaded.vocab_ids, VOCAB_IDS)
    torch.testing.assert_close(loaded.full_logits(hidden), heads.full_logits(hidden), rtol=0, atol=0)
    drafter = MedusaDrafter(loaded)
    drafter.accept(0, torch.tensor([3]), hidden)
    [draft] = drafter.propose(inputs([0], [torch.tensor([3])]))
    assert set(draft.tree.tokens[1:].tolist()) <= set(VOCAB_IDS.tolist())
    with pytest.raises(ValueError, match="needs exactly that many vocab_ids"):
        MedusaHeads(config, lm_head)


def test_eagle_head_with_a_draft_vocab(target, tmp_path):
    base = EagleConfig.from_target(target)
    config = EagleConfig(base.hidden_size, base.vocab_size, base.layer_config, VOCAB_IDS.numel())
    head = EagleHead(config, target, VOCAB_IDS)
    feats = torch.randn(4, 32, dtype=target.dtype)
    lm_head = target.model.get_output_embeddings()
    torch.testing.assert_close(head.logits(feats), lm_head(feats)[:, VOCAB_IDS])
    head.save_pretrained(tmp_path)
    loaded = EagleDrafter.from_pretrained(tmp_path, target, tree="dynamic", depth=3, budget=8, topk=2,
                                          num_blocks=64, block_size=4)
    assert torch.equal(loaded.head.vocab_ids, VOCAB_IDS)
    full = loaded.head.full_logits(feats)
    assert torch.isinf(full[:, 1]).all() and torch.isfinite(full[:, VOCAB_IDS]).all()


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_greedy_output_with_a_draft_vocab_equals_autoregressive(target, kind):
    """Heads over a draft vocabulary of the target's 10 most frequent output tokens (how draft vocabularies are
    built), planted with the true continuation at random depths (tests/oracles.py): drafts stay inside the
    vocabulary, are accepted (depth 2 and deeper) and rejected, and the output equals autoregressive decoding."""
    cache = target.new_cache(96, 4)
    for seed in range(3):
        prompt = torch.randint(0, 64, (6 + seed,), generator=torch.Generator().manual_seed(seed))
        ar = SpeculativeEngine(target, cache).generate(prompt, 16)
        reference = prompt.tolist() + ar.tokens
        vocab_ids = frequent_tokens([ar.tokens], 10, 64)
        if kind == "medusa":
            lm_head = target.model.get_output_embeddings()
            config = MedusaConfig(32, 64, num_heads=3, draft_vocab_size=vocab_ids.numel())
            drafter = MedusaDrafter(MedusaHeads(config, lm_head, vocab_ids).to(target.dtype), budget=8, topk=2)
            drafter.heads = PlantedMedusaHeads(drafter.heads, target.model, reference, seed)
        else:
            base = EagleConfig.from_target(target)
            config = EagleConfig(base.hidden_size, base.vocab_size, base.layer_config, vocab_ids.numel())
            drafter = EagleDrafter(EagleHead(config, target, vocab_ids), tree="dynamic", depth=3, budget=8, topk=2,
                                   num_blocks=64, block_size=4)
            plant_eagle(drafter.head, target.model, reference, seed=seed)
        proposed = []
        propose = drafter.propose
        drafter.propose = lambda batch, propose=propose, log=proposed: [log.append(d) or d for d in propose(batch)]
        spec = SpeculativeEngine(target, cache, drafter, max_tree_nodes=16).generate(prompt, 16)
        assert spec.tokens == ar.tokens
        assert all(set(d.tree.tokens[1:].tolist()) <= set(vocab_ids.tolist()) for d in proposed)
        s = spec.stats
        assert s.tau > 1.3 and s.depth_accepted[1] > 0 and sum(s.depth_accepted) < sum(s.depth_tried)
    assert cache.allocator.num_free == 96


def test_export_casts_floats_and_keeps_the_vocabulary(target, tmp_path):
    from safetensors import safe_open

    from specdec.checkpoint import export_checkpoint

    base = EagleConfig.from_target(target)
    config = EagleConfig(base.hidden_size, base.vocab_size, base.layer_config, VOCAB_IDS.numel())
    EagleHead(config, target, VOCAB_IDS).save_pretrained(tmp_path / "fp64")
    export_checkpoint(tmp_path / "fp64", tmp_path / "fp16")
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes.pop("vocab_ids") == torch.int64 and set(dtypes.values()) == {torch.float16}
    loaded = EagleHead.from_pretrained(tmp_path / "fp16", target)  # cast back to the target's dtype
    assert loaded.fc.weight.dtype == target.dtype and torch.equal(loaded.vocab_ids, VOCAB_IDS)

"""The embedded SmolLM2-135M-Instruct (float32): speculative greedy output equals HF ``generate`` greedy."""

import pytest
import torch

from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
from specdec.drafters import NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.target import TargetModel, eos_token_ids
from specdec.tree import TokenTree

pytestmark = pytest.mark.slow

NEAR_TIE = 1e-4


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def test_ngram_speculation_equals_hf_greedy(smollm2):
    model, tokenizer = smollm2
    target = TargetModel(model)
    cache = target.new_cache(128, 16)
    eos = eos_token_ids(model, tokenizer)
    prompts = [p for p in load_prompts(builtin_prompts_path()) if p.category in {"summarization", "rewriting", "code"}]
    identical = 0
    for prompt in prompts[::2]:
        ids = encode_prompt(tokenizer, prompt.text)
        with torch.inference_mode():
            ref = model.generate(ids[None], max_new_tokens=48, do_sample=False)[0, ids.numel():].tolist()
        spec = SpeculativeEngine(target, cache, NgramDrafter(), eos).generate(ids, 48)
        i = _first_difference(spec.tokens, ref)
        if i is None:
            assert len(spec.tokens) == len(ref)
            identical += 1
            continue
        with torch.inference_mode():  # a difference is only allowed at a near-tie of the target's top two logits
            logits = model(torch.cat([ids, torch.tensor(ref[:i])])[None]).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, f"{prompt.text[:40]!r}: differs at token {i}, not a near-tie"
    assert identical >= len(prompts[::2]) - 1
    assert cache.allocator.num_free == 128


def test_chat_template_is_applied(smollm2):
    _, tokenizer = smollm2
    with_chat = encode_prompt(tokenizer, "Hello")
    plain = encode_prompt(tokenizer, "Hello", chat=False)
    assert with_chat.numel() > plain.numel()
    assert "<|im_start|>" in tokenizer.decode(with_chat)


@pytest.mark.parametrize(("spec", "min_tau"), [("eagle:path=shipped,tree=dynamic,budget=8,depth=5", 1.5),
                                             ("medusa:path=shipped,tree=dynamic,budget=8", 1.3),
                                             ("eagle3:path=shipped,tree=dynamic,budget=8,depth=5", 1.3),
                                             ("hybrid:model=eagle3,path=shipped,store=shipped,model_budget=6,"
                                              "model_depth=3,cost=auto", 1.3),
                                             ("hybrid:model=eagle3,path=shipped,store=shipped,cost=auto,steps=auto",
                                              1.3)])
def test_shipped_drafters_are_trained_and_lossless(smollm2, spec, min_tau):
    """The weights shipped for SmolLM2 load, keep greedy output identical to HF, and accept drafts (untrained
    heads give tau of about 1.0-1.2)."""
    from specdec.drafters import DrafterSpec, build_drafter

    model, tokenizer = smollm2
    target = TargetModel(model)
    drafter = build_drafter(DrafterSpec.parse(spec), target)
    cache = target.new_cache(128, 16)
    ids = encode_prompt(tokenizer, "A baker makes 12 trays of 8 rolls and sells 70 rolls. How many rolls are left?")
    with torch.inference_mode():
        ref = model.generate(ids[None], max_new_tokens=48, do_sample=False)[0, ids.numel():].tolist()
    result = SpeculativeEngine(target, cache, drafter, eos_token_ids(model, tokenizer)).generate(ids, 48)
    assert result.tokens == ref[: len(result.tokens)] and len(result.tokens) == len(ref)
    assert result.stats.tau > min_tau, result.stats.tau
    assert cache.allocator.num_free == 128


def test_the_shipped_store_is_lossless_and_raises_tau_where_the_history_has_no_match(smollm2):
    """``ngram:store=shipped`` (the target's own answers to other prompts) matches the target's vocabulary, keeps
    greedy output identical to HF and accepts store drafts on prompts that do not repeat themselves; so does the
    store's tree sized by this machine's measured step cost (``steps=auto``)."""
    from specdec.drafters import DrafterSpec, build_drafter

    model, tokenizer = smollm2
    target = TargetModel(model)
    cache = target.new_cache(128, 16)
    taus = {}
    for spec in ("ngram", "ngram:store=shipped", "ngram:store=shipped,steps=auto"):
        drafter = build_drafter(DrafterSpec.parse(spec), target)
        taus[spec] = []
        for text in ("Give me three tips for staying focused while working from home.",
                     "A baker makes 12 trays of 8 rolls and sells 70 rolls. How many rolls are left?"):
            ids = encode_prompt(tokenizer, text)
            with torch.inference_mode():
                ref = model.generate(ids[None], max_new_tokens=48, do_sample=False)[0, ids.numel():].tolist()
            result = SpeculativeEngine(target, cache, drafter, eos_token_ids(model, tokenizer)).generate(ids, 48)
            assert result.tokens == ref, spec
            taus[spec].append(result.stats.tau)
    for spec in ("ngram:store=shipped", "ngram:store=shipped,steps=auto"):
        assert all(s > n + 0.1 for s, n in zip(taus[spec], taus["ngram"], strict=True)), taus
    assert cache.allocator.num_free == 128


def test_packed_linears_give_the_plain_targets_tree_logits_on_smollm2(smollm2):
    """The default (packed) target against ``packed=False`` on a 12-node tree over a real prompt: the same argmax
    at every node and logits equal to float32 rounding (the packed GEMM sums in another order)."""
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, "List three uses of a paperclip.")
    gen = torch.Generator().manual_seed(0)
    tree = TokenTree(torch.randint(0, 49152, (12,), generator=gen),
                     torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 8, 3]))
    logits = []
    for packed in (False, True):
        target = TargetModel(model, packed=packed)
        assert (target.packed_linears > 0) == packed
        cache = target.new_cache(8, 16)
        seq = cache.add_sequence()
        cache.reserve(seq, ids.numel())
        target.forward(cache, [seq], [TokenTree.chain(ids)], last_only=True)
        cache.advance(seq, ids.numel())
        cache.reserve(seq, tree.num_nodes)
        logits.append(target.forward(cache, [seq], [tree]).logits)
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=2e-3)


def test_the_shipped_eagle_heads_default_to_their_measured_tree_shape(smollm2):
    """``eagle3:path=shipped`` (and EAGLE's dynamic tree) take the shape measured fastest for the shipped heads where
    no size is given; a given size wins, and untrained heads keep the class defaults."""
    from specdec.drafters import DrafterSpec, build_drafter

    target = TargetModel(smollm2[0])
    shapes = {spec: (d.tree, d.budget, d.depth) for spec in (
        "eagle3:path=shipped", "eagle3:path=shipped,budget=8", "eagle:path=shipped,tree=dynamic",
        "eagle:path=shipped", "eagle3") for d in [build_drafter(DrafterSpec.parse(spec), target)]}
    assert shapes == {"eagle3:path=shipped": ("dynamic", 6, 3), "eagle3:path=shipped,budget=8": ("dynamic", 8, 3),
                      "eagle:path=shipped,tree=dynamic": ("dynamic", 6, 3), "eagle:path=shipped": ("chain", 16, 4),
                      "eagle3": ("dynamic", 16, 4)}

"""The compiled verify step: padded static shapes, one graph per bucket, the same outputs as the eager engine.

Inductor (the real CPU code path) is exercised once on the tiny float64 Llama; the other engine tests trace the
same graph with ``aot_eager`` (no code generation: seconds instead of a minute per bucket)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.kernels as K  # noqa: E402
from specdec import ops  # noqa: E402
from specdec.compiled_step import CompiledVerifier, bucket, default_buckets  # noqa: E402
from specdec.drafters import NgramDrafter  # noqa: E402
from specdec.engine import SpeculativeEngine  # noqa: E402
from specdec.kernels.tree_attention_sdpa import paged_tree_attention_sdpa  # noqa: E402
from specdec.sampling import SamplingParams  # noqa: E402
from specdec.target import TargetModel  # noqa: E402
from tests.kernel_cases import build_case, rand_tree, star  # noqa: E402
from tests.test_batch_engine import OracleDrafter, _prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("q", "k_cache", "v_cache", "block_table", "context_lens", "cu_q", "tree_mask", "mask_indptr")


def _padded_case(extra_rows: int, mask_slack: int):
    args, _, _ = build_case([9, 0, 5], [rand_tree(5, 1), star(3), rand_tree(4, 2)], hq=4, hkv=2, d=16, page=4,
                            seed=3)
    args = {k: torch.nan_to_num(v, nan=0.0) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    real = args["q"].shape[0]
    padded = dict(args)
    padded["q"] = torch.cat([args["q"], torch.randn(extra_rows, *args["q"].shape[1:])])
    padded["tree_mask"] = torch.cat([args["tree_mask"], torch.ones(mask_slack, dtype=args["tree_mask"].dtype)])
    return args, padded, real


def test_padding_rows_come_out_zero_and_leave_real_rows_unchanged_in_every_implementation():
    args, padded, real = _padded_case(extra_rows=3, mask_slack=7)
    expect = K.paged_tree_attention_reference(**args)
    outs = {
        "reference": K.paged_tree_attention_reference(**padded),
        "kernel": K.paged_tree_attention(**padded),
        "kernel split 3": K.paged_tree_attention(**padded, num_splits=3),
        "sdpa": paged_tree_attention_sdpa(*(padded[k] for k in ARGS), padded["sm_scale"]),
        "op": ops.paged_tree_attention(*(padded[k] for k in ARGS), padded["sm_scale"], padded["max_q"]),
    }
    for name, out in outs.items():
        torch.testing.assert_close(out[:real], expect, msg=name)
        assert torch.equal(out[real:], torch.zeros_like(out[real:])), name


def test_the_cpu_op_with_padding_passes_opcheck():
    _, padded, _ = _padded_case(extra_rows=2, mask_slack=5)
    torch.library.opcheck(torch.ops.specdec.paged_tree_attention.default,
                          tuple(padded[k] for k in ARGS) + (padded["sm_scale"], padded["max_q"]))


def test_the_sdpa_op_keeps_float64_and_equals_the_reference():
    args, _, _ = build_case([6, 11], [rand_tree(6, 4), star(2)], hq=4, hkv=1, d=8, page=2, seed=5)
    args = {k: torch.nan_to_num(v, nan=0.0) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    wide = {k: args[k].double() if k in ("q", "k_cache", "v_cache") else args[k] for k in ARGS}
    out = paged_tree_attention_sdpa(*(wide[k] for k in ARGS), args["sm_scale"])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, K.paged_tree_attention_reference(**args).double(), rtol=1e-5, atol=1e-6)


def test_buckets_pick_the_smallest_size_that_holds_the_step_and_bad_buckets_are_refused(tiny_model):
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="token_buckets must be increasing positive sizes"):
        CompiledVerifier(TargetModel(tiny_model).verifier, token_buckets=(4, 2))
    with pytest.raises(ValueError, match="batch_buckets must be increasing positive sizes"):
        CompiledVerifier(TargetModel(tiny_model).verifier, batch_buckets=())
    # defaults: every power of two on CPU; on CUDA few coarse buckets (padding is cheap, compilation is not)
    assert default_buckets(torch.device("cpu")) == ((1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16, 32))
    assert default_buckets(torch.device("cuda", 0)) == ((1, 4, 16, 64), (1, 8, 32))
    assert CompiledVerifier(TargetModel(tiny_model).verifier).token_buckets == (1, 2, 4, 8, 16, 32, 64)


def _engine(target, drafter, **kw):
    return SpeculativeEngine(target, target.new_cache(160, 4), drafter, max_batch=4, max_step_tokens=64, **kw)


def _run(target, prompts, drafter_factory, new_tokens=14, params=None):
    engine = _engine(target, drafter_factory())
    results = engine.generate_batch(prompts, new_tokens, *([] if params is None else [params]))
    assert engine.cache.allocator.num_free == 160
    return [r.tokens for r in results], sum(r.stats.step_tokens - r.stats.steps for r in results)


def _oracle(tiny_model, prompts, new_tokens=14):
    eager = TargetModel(tiny_model)
    refs = {tuple(p): SpeculativeEngine(eager, eager.new_cache(64, 4)).generate(p, new_tokens).tokens
            for p in prompts}
    return eager, refs


def test_inductor_compiled_engine_equals_the_eager_engine_and_never_recompiles_inside_a_bucket(tiny_model):
    prompts = _prompts(11, 3)
    eager, refs = _oracle(tiny_model, prompts)
    want, accepted = _run(eager, prompts, lambda: OracleDrafter(refs, seed=1, max_nodes=6))
    assert accepted > 0  # trees were verified, not only roots
    compiled = TargetModel(tiny_model, compile=True, buckets=((8, 32), (4,)))
    got, _ = _run(compiled, prompts, lambda: OracleDrafter(refs, seed=1, max_nodes=6))
    assert got == want
    assert compiled.compiled.compiled_steps > 0
    traced = set(compiled.compiled.graphs)
    more = _prompts(12, 3)
    _, refs2 = _oracle(tiny_model, more)
    want2, _ = _run(eager, more, lambda: OracleDrafter(refs2, seed=2, max_nodes=6))
    before = compiled.compiled.compiled_steps
    with torch._dynamo.config.patch(error_on_recompile=set(compiled.compiled.graphs) == traced):
        got2, _ = _run(compiled, more, lambda: OracleDrafter(refs2, seed=2, max_nodes=6))
    assert got2 == want2 and compiled.compiled.compiled_steps > before


@pytest.mark.parametrize("drafter,graphs", [("oracle", "none"), ("ngram", "none"), ("oracle", "manual")])
def test_aot_traced_step_equals_eager_for_trees_batches_and_prefill_chunks(tiny_model, drafter, graphs):
    prompts = _prompts(21, 4)
    eager, refs = _oracle(tiny_model, prompts)
    make = (lambda: OracleDrafter(refs, seed=3, max_nodes=10)) if drafter == "oracle" else NgramDrafter
    want, _ = _run(eager, prompts, make)
    compiled = TargetModel(tiny_model, compile="aot_eager", graphs=graphs)
    got, _ = _run(compiled, prompts, make)
    assert got == want
    cv = compiled.compiled
    assert cv.compiled_steps > 0
    assert all(t in cv.token_buckets and b in cv.batch_buckets for t, b, _ in cv.graphs)
    # manual graphs: one capture per bucket and cache, replayed for every later step of that bucket
    assert len(cv.step_graphs) == (len(cv.graphs) if graphs == "manual" else 0)


def test_manual_step_graphs_hand_out_copies_and_are_captured_per_cache(tiny_model):
    from specdec.tree import TokenTree

    target = TargetModel(tiny_model, compile="aot_eager", graphs="manual", buckets=((4,), (1,)))
    caches = [target.new_cache(16, 4), target.new_cache(16, 4)]
    outs = []
    for cache in caches:
        seq = cache.add_sequence()
        cache.reserve(seq, 8)
        for tokens in ([3, 5, 7], [9, 2, 4]):  # the same bucket twice: one capture, then a replay
            outs.append(target.forward(cache, [seq], [TokenTree.chain(tokens)]).logits)
    cv = target.compiled
    assert len(cv.step_graphs) == 2 and cv.compiled_steps == 4
    held = outs[0].clone()
    target.forward(caches[0], [0], [TokenTree.chain([1, 1, 1])])
    assert torch.equal(outs[0], held)  # a later replay overwrote the graph's buffers, not the handed-out logits
    eager = TargetModel(tiny_model)
    cache = eager.new_cache(16, 4)
    cache.reserve(cache.add_sequence(), 8)
    torch.testing.assert_close(outs[1], eager.forward(cache, [0], [TokenTree.chain([9, 2, 4])]).logits)
    cv.release(caches[0])
    assert len(cv.step_graphs) == 1
    with pytest.raises(ValueError, match="graphs must be one of"):
        TargetModel(tiny_model, compile="aot_eager", graphs="sometimes")


def test_sampled_requests_draw_the_same_tokens_compiled_and_eager(tiny_model):
    prompts = _prompts(31, 3)
    eager, refs = _oracle(tiny_model, prompts)
    params = [SamplingParams(0.8, seed=s) for s in range(3)]
    want, _ = _run(eager, prompts, lambda: OracleDrafter(refs, seed=4), params=params)
    got, _ = _run(TargetModel(tiny_model, compile="aot_eager", graphs="manual"), prompts,
                  lambda: OracleDrafter(refs, seed=4), params=params)
    assert got == want


def test_steps_larger_than_every_bucket_run_eagerly_with_the_same_result(tiny_model):
    prompts = _prompts(41, 3)
    eager, refs = _oracle(tiny_model, prompts)
    want, _ = _run(eager, prompts, lambda: OracleDrafter(refs, seed=5))
    compiled = TargetModel(tiny_model, compile="aot_eager", buckets=((8,), (4,)))
    got, _ = _run(compiled, prompts, lambda: OracleDrafter(refs, seed=5))
    assert got == want
    assert compiled.compiled.eager_steps > 0 and compiled.compiled.compiled_steps > 0


def test_hidden_states_for_eagle_come_from_the_compiled_graph(tiny_model):
    from specdec.drafters.eagle import EagleDrafter

    prompts = _prompts(51, 2)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules()]
    outs = []
    for compile_, graphs in ((False, None), ("aot_eager", "none"), ("aot_eager", "manual")):
        target = TargetModel(tiny_model, compile=compile_, graphs=graphs)
        torch.manual_seed(0)
        outs.append(_run(target, prompts, lambda t=target: EagleDrafter.untrained(t))[0])
        if compile_:
            assert any(layers is not None for _, _, layers in target.compiled.graphs)
    assert outs[0] == outs[1] == outs[2]
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_model.modules()] == hooks


def test_a_cache_that_is_dropped_takes_its_captured_graphs_with_it(tiny_model):
    import gc
    import weakref

    from specdec.tree import TokenTree

    target = TargetModel(tiny_model, compile="aot_eager", graphs="manual", buckets=((4,), (1,)))
    cache = target.new_cache(16, 4)
    cache.reserve(cache.add_sequence(), 4)
    target.forward(cache, [0], [TokenTree.chain([3, 5, 7])])
    assert len(target.compiled.step_graphs) == 1
    k = weakref.ref(cache.k)
    del cache
    gc.collect()
    assert len(target.compiled.step_graphs) == 0 and k() is None  # neither the graph nor the K/V outlive it


def test_warmup_compiles_every_bucket_a_step_can_use_and_frees_its_scratch_blocks(tiny_model):
    target = TargetModel(tiny_model, compile="aot_eager", graphs="manual", buckets=((1, 4, 8), (1, 2, 4)))
    cache = target.new_cache(160, 4)
    cv = target.compiled
    logs = []
    done = cv.warmup(cache, max_batch=3, max_tokens=6, hidden_layers=(None, (-1,)), log=logs.append)
    # sequences 1, 2, 3 (bucket 4); tokens up to 6 (bucket 8), never fewer tokens than sequences
    assert done == [(1, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4)]
    assert len(logs) == 2 * len(done) and cache.allocator.num_free == 160
    assert {(t, b) for t, b, _ in cv.graphs} == set(done) and len(cv.step_graphs) == 2 * len(done)
    traced, captured = set(cv.graphs), len(cv.step_graphs)
    prompts = _prompts(61, 3)
    _, refs = _oracle(tiny_model, prompts)
    engine = SpeculativeEngine(target, cache, OracleDrafter(refs, seed=6, max_nodes=2), max_batch=3,
                               max_step_tokens=6, max_tree_nodes=2)
    results = engine.generate_batch(prompts, 10)
    assert [r.tokens for r in results] == [refs[tuple(p)][:10] for p in prompts]
    assert set(cv.graphs) == traced and len(cv.step_graphs) == captured  # nothing new to compile or capture
    assert cache.allocator.num_free == 160


def test_the_engine_warms_up_the_buckets_with_the_outputs_its_drafter_reads(tiny_model):
    from specdec.drafters.eagle import EagleDrafter

    target = TargetModel(tiny_model, compile="aot_eager", graphs="manual", buckets=((1, 4), (1, 2)))
    torch.manual_seed(0)
    engine = SpeculativeEngine(target, target.new_cache(64, 4), EagleDrafter.untrained(target), max_batch=2,
                               max_step_tokens=4, max_tree_nodes=4)
    assert engine.warmup() == [(1, 1), (4, 1), (4, 2)]
    assert {layers for _, _, layers in target.compiled.graphs} == {(-1,)}  # EAGLE reads the last hidden state
    assert engine.cache.allocator.num_free == 64
    eager = TargetModel(tiny_model)
    assert SpeculativeEngine(eager, eager.new_cache(16, 4)).warmup() == []  # nothing to compile

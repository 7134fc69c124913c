"""Packed-weight CPU linears: the same products as ``F.linear`` (to float32 rounding), the caller's model untouched,
greedy decoding unchanged, and a weight changed in place repacked."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from specdec import linear_kernels, packed_linear
from specdec.app.model_cache import read_keyed
from specdec.engine import SpeculativeEngine
from specdec.linear_kernels import (
    ROW_POINTS,
    approximate_kernels,
    available_kernels,
    choose,
    choose_table,
    kernel_for,
    kernel_table,
    split_kernel,
)
from specdec.packed_linear import PackedLinear, PackedWeight, linear_bytes, pack_linears, packing_works
from specdec.target import TargetModel
from specdec.tree import TokenTree
from tests.conftest import tiny_llama
from tests.oracles import KnownDepthDrafter

pytestmark = pytest.mark.skipif(not packing_works(), reason="this torch build cannot pack float32 weights (no MKL)")


def _tiny(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(dtype).eval()


PACKED = [k for k in available_kernels() if k != "plain"]


@pytest.fixture(params=PACKED)
def always_packed(request, monkeypatch):
    """Every product runs this packed kernel, whatever this machine measured."""
    monkeypatch.setattr(packed_linear, "kernel_for", lambda out_features, in_features, rows, approximate=False:
                        request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 16, 33])
def test_packed_weight_computes_the_same_products_as_f_linear_for_any_row_count(rows, always_packed):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(70, 40, generator=gen), torch.randn(70, generator=gen)
    x = torch.randn(2, rows, 40, generator=gen)
    got = PackedWeight(weight, bias)(x)
    assert got.shape == (2, rows, 70)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_the_kernel_is_measured_once_per_shape_and_remembered_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    measured = []
    real = linear_kernels.measure_kernels
    monkeypatch.setattr(linear_kernels, "measure_kernels", lambda *a, **k: measured.append(a[:2]) or real(*a, **k))
    kernel_table.cache_clear()
    table = kernel_table(70, 41, 1)
    assert len(table) == len(ROW_POINTS) and measured == [(70, 41)]
    assert {split_kernel(k)[0] for k in table} <= set(available_kernels())
    assert (tmp_path / linear_kernels.FILE_NAME).is_file()
    kernel_table.cache_clear()  # a new process: the file answers
    assert kernel_table(70, 41, 1) == table and measured == [(70, 41)]
    kernel_table.cache_clear()


def test_a_row_count_between_measured_points_takes_the_next_point_up(monkeypatch):
    monkeypatch.setattr(linear_kernels, "kernel_table", lambda *a: ("plain", "mkl", "onednn", "onednn", "mkl", "plain"))
    monkeypatch.delenv("SPECDEC_LINEAR_KERNEL", raising=False)
    assert [kernel_for(9, 9, r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 100)] == [
        "plain", "mkl", "onednn", "onednn", "mkl", "mkl", "plain", "plain", "plain"]


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_one_or_two_rows_padded_to_the_kernels_faster_row_count_give_the_same_products(rows, monkeypatch):
    """``onednn@4``: the rows run padded to 4 in a buffer kept between calls; a call with fewer rows after one
    with more reads none of the earlier rows (GEMM rows are independent, the extra outputs dropped)."""
    kernel = next((k for k in PACKED if k == "onednn"), PACKED[0])
    monkeypatch.setattr(packed_linear, "kernel_for", lambda out_features, in_features, n, approximate=False:
                        f"{kernel}@4" if n < 3 else kernel)
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(70, 40, generator=gen), torch.randn(70, generator=gen)
    packed = PackedWeight(weight, bias)
    for n in (2, rows, 1, rows):
        x = torch.randn(1, n, 40, generator=gen)
        got = packed(x)
        assert got.shape == (1, n, 70)
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_one_or_two_rows_run_padded_only_where_the_padded_product_was_measured_faster():
    ms = {n: {"plain": 9.0, "onednn": 1.0} for n in ROW_POINTS}
    ms[1]["onednn"], ms[2]["onednn"], ms[3]["onednn"] = 1.5, 1.02, 1.5  # 4 rows: 1.0
    assert choose_table(ms)[:4] == ("onednn@4", "onednn", "onednn", "onednn")  # 3 rows never (measured per step)
    ms[1] = {"plain": 1.2, "onednn": 1.5}  # plain at 1 row; padded oneDNN takes 83 % of its time
    assert choose_table(ms)[0] == "onednn@4"
    assert split_kernel("onednn@4") == ("onednn", 4) and split_kernel("mkl") == ("mkl", 0)


def test_a_kept_table_is_chosen_again_from_its_timings(monkeypatch, tmp_path):
    """A file written before padding existed (its choices unpadded) gets the padded choices from its own timings,
    with nothing measured again."""
    import json

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setattr(linear_kernels, "measure_kernels", lambda *a, **k: pytest.fail("measured again"))
    key = f"torch {torch.__version__} | {linear_kernels.processor()} | 1 threads | 70x41"
    ms = {str(n): {"plain": 9.0, PACKED[0]: 1.0 if n >= 4 else 2.0} for n in ROW_POINTS}
    old = [PACKED[0]] * len(ROW_POINTS)
    (tmp_path / linear_kernels.FILE_NAME).write_text(json.dumps({key: {"kernels": old, "rows": list(ROW_POINTS),
                                                                       "ms": ms}}))
    kernel_table.cache_clear()
    try:
        assert kernel_table(70, 41, 1) == (f"{PACKED[0]}@4", f"{PACKED[0]}@4", *old[2:])
    finally:
        kernel_table.cache_clear()


def test_a_packed_kernel_replaces_plain_only_when_clearly_faster():
    assert choose({"plain": 1.0, "mkl": 0.95, "onednn": 0.93}) == "plain"
    assert choose({"plain": 1.0, "mkl": 0.5, "onednn": 0.6}) == "mkl"
    assert choose({"plain": 1.0}) == "plain"


def test_a_forced_kernel_runs_everywhere_and_an_unknown_one_is_named(monkeypatch):
    monkeypatch.setenv("SPECDEC_LINEAR_KERNEL", "plain")
    assert kernel_for(49152, 576, 3) == "plain"
    monkeypatch.setenv("SPECDEC_LINEAR_KERNEL", "cublas")
    with pytest.raises(ValueError, match=r"SPECDEC_LINEAR_KERNEL='cublas': this torch build has \['plain'"):
        kernel_for(9, 9, 1)


def test_a_row_count_that_f_linear_runs_faster_gives_f_linears_exact_output(monkeypatch):
    monkeypatch.setattr(packed_linear, "kernel_for", lambda out_features, in_features, rows, approximate=False: "plain")
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(70, 40, generator=gen), torch.randn(3, 40, generator=gen)
    packed = PackedWeight(weight)
    assert torch.equal(packed(x), F.linear(x, weight))
    assert not packed._packed  # nothing packed: no call ran a packed kernel


def test_a_weight_changed_in_place_is_repacked_at_the_next_call(always_packed):
    weight = torch.randn(30, 20)
    packed, x = PackedWeight(weight), torch.randn(8, 20)
    packed(x)
    with torch.no_grad():
        weight.mul_(2)
    torch.testing.assert_close(packed(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_packing_replaces_only_the_targets_own_view_and_keeps_the_callers_model():
    model = _tiny()
    target = TargetModel(model)
    assert target.packed_linears == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) > 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # HF generate still runs nn.Linear
    packed = [m for m in target.verifier.modules() if isinstance(m, PackedLinear)]
    ours = {id(p) for p in model.parameters()}
    assert packed and all(id(m.weight) in ours for m in packed)  # the same Parameters, not copies


def test_packing_is_off_for_float64_models_for_compile_and_when_asked():
    assert TargetModel(_tiny(torch.float64)).packed_linears == 0
    assert TargetModel(_tiny(), packed=False).packed_linears == 0
    assert TargetModel(_tiny(), compile="aot_eager").packed_linears == 0


def test_asking_for_packed_linears_where_none_can_be_packed_names_the_reason():
    with pytest.raises(ValueError, match=r"packed linears need a float32 model on the CPU .* torch.float64 on cpu"):
        TargetModel(_tiny(torch.float64), packed=True)


def test_the_size_limit_leaves_large_models_alone():
    model = _tiny()
    assert pack_linears(model, limit=linear_bytes(model) - 1) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_tree_logits_with_packed_linears_match_plain_linears(always_packed):
    model = _tiny()
    plain, packed = TargetModel(model, packed=False), TargetModel(model)
    gen = torch.Generator().manual_seed(1)
    tree = TokenTree(torch.randint(0, 97, (9,), generator=gen), torch.tensor([-1, 0, 0, 1, 1, 2, 3, 4, 5]))
    outs = []
    for target in (plain, packed):
        cache = target.new_cache(num_blocks=4)
        seq = cache.add_sequence()
        cache.reserve(seq, 20 + 9)
        target.forward(cache, [seq], [TokenTree.chain(torch.randint(0, 97, (20,), generator=gen))], last_only=True)
        cache.advance(seq, 20)
        outs.append(target.forward(cache, [seq], [tree]).logits)
        gen.manual_seed(1)
        torch.randint(0, 97, (9,), generator=gen)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_greedy_decoding_with_packed_linears_matches_hf_generate(always_packed):
    """Trees of up to 7 nodes, every row count on the packed kernel, keep greedy decoding identical to HF's."""
    model = tiny_llama(dtype=torch.float32, seed=5)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3))
    reference = model.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40,
                               attention_mask=torch.ones(1, 12, dtype=torch.long))[0].tolist()
    target = TargetModel(model)
    assert target.packed_linears > 0
    drafter = KnownDepthDrafter(reference, seed=0)
    engine = SpeculativeEngine(target, target.new_cache(num_blocks=8), drafter, eos_token_ids=[])
    assert engine.generate(prompt.tolist(), max_new_tokens=40).tokens == reference[12:]
    assert max(length for length, _ in drafter.log) >= 4  # multi-row trees ran


def test_a_copied_or_pickled_packed_weight_packs_its_own_weight(always_packed):
    import copy
    import pickle

    weight, x = torch.randn(30, 20), torch.randn(8, 20)
    packed = PackedWeight(weight)
    packed(x)  # packed now
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone.weight is not weight
        torch.testing.assert_close(clone(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_packed_linear_follows_a_swapped_parameter(always_packed):
    linear = PackedLinear(torch.nn.Linear(20, 30, bias=False))
    x = torch.randn(8, 20)
    linear(x)  # packed now
    linear.weight = torch.nn.Parameter(torch.randn(30, 20))  # as a load or .to() that swaps parameters does
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


APPROXIMATE = list(approximate_kernels())


@pytest.mark.skipif(not APPROXIMATE, reason="this processor has no native bfloat16 linear kernel")
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 33])
def test_the_approximate_kernel_computes_the_products_to_bfloat16_rounding(rows, monkeypatch):
    monkeypatch.setattr(packed_linear, "kernel_for", lambda out_features, in_features, n, approximate=False:
                        APPROXIMATE[0] if approximate else "plain")
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(70, 40, generator=gen), torch.randn(70, generator=gen)
    x = torch.randn(2, rows, 40, generator=gen)
    exact, approx = PackedWeight(weight, bias)(x), PackedWeight(weight, bias, approximate=True)(x)
    assert torch.equal(exact, F.linear(x, weight, bias))  # not approximate: never the bfloat16 kernel
    assert approx.dtype == torch.float32 and not torch.equal(approx, exact)
    assert float((approx - exact).norm()) < 0.02 * float(exact.norm())


def test_only_drafters_may_get_an_approximate_kernel_and_float32_precision_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECDEC_LINEAR_KERNEL", raising=False)
    tables = []
    monkeypatch.setattr(linear_kernels, "kernel_table", lambda o, i, t, approximate=False: tables.append(
        approximate) or ("plain",) * len(ROW_POINTS))
    kernel_for(70, 41, 1)
    monkeypatch.setenv("SPECDEC_DRAFT_PRECISION", "float32")
    kernel_for(70, 41, 1, approximate=True)
    assert tables == [False, False]
    monkeypatch.setenv("SPECDEC_DRAFT_PRECISION", "bfloat16")
    kernel_for(70, 41, 1, approximate=True)
    assert tables[-1] == bool(APPROXIMATE)
    monkeypatch.setenv("SPECDEC_DRAFT_PRECISION", "float16")
    with pytest.raises(ValueError, match=r"SPECDEC_DRAFT_PRECISION='float16': use 'bfloat16' \(default\) or 'float32'"):
        kernel_for(70, 41, 1, approximate=True)


@pytest.mark.skipif(not APPROXIMATE, reason="this processor has no native bfloat16 linear kernel")
def test_an_approximate_table_is_measured_beside_the_exact_one_under_its_own_key(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    kernel_table.cache_clear()
    try:
        exact, approx = kernel_table(70, 41, 1), kernel_table(70, 41, 1, True)
        assert set(exact) <= set(available_kernels()) and set(approx) <= set(available_kernels()) | set(APPROXIMATE)
        keys = list(read_keyed(linear_kernels.FILE_NAME))
        assert len(keys) == 2 and sum(k.endswith(" | approximate") for k in keys) == 1
    finally:
        kernel_table.cache_clear()


@pytest.mark.skipif(not APPROXIMATE, reason="this processor has no native bfloat16 linear kernel")
def test_an_eagle_head_drafting_in_bfloat16_keeps_greedy_decoding_identical(monkeypatch):
    """The head's linears run the bfloat16 kernel (proposals change a little), the target stays exact."""
    from specdec.drafters.eagle import EagleDrafter

    monkeypatch.setattr(packed_linear, "kernel_for", lambda out_features, in_features, n, approximate=False:
                        APPROXIMATE[0] if approximate else "plain")
    model = tiny_llama(dtype=torch.float32, seed=5)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3))
    reference = model.generate(prompt[None], max_new_tokens=40, do_sample=False, min_new_tokens=40,
                               attention_mask=torch.ones(1, 12, dtype=torch.long))[0].tolist()
    target = TargetModel(model)
    drafter = EagleDrafter.untrained(target, tree="dynamic", budget=8)
    assert sum(isinstance(m, PackedLinear) and m._run.approximate for m in drafter.head.modules()) > 0
    engine = SpeculativeEngine(target, target.new_cache(num_blocks=8), drafter, eos_token_ids=[])
    assert engine.generate(prompt.tolist(), max_new_tokens=40).tokens == reference[12:]

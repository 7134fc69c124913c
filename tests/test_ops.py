"""specdec.ops: the tree-attention and KV-write custom ops pass ``torch.library.opcheck`` and trace through
``torch.compile(fullgraph=True)`` with the same results as eager (CPU: the ops run their PyTorch references)."""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.kernels as K  # noqa: E402
from specdec import ops  # noqa: E402
from tests.kernel_cases import ancestor_mask, build_case, rand_tree, star  # noqa: E402

CPU_ARGS = ("q", "k_cache", "v_cache", "block_table", "context_lens", "cu_q", "tree_mask", "mask_indptr")


def attention_args(args):
    return tuple(args[k].cpu() for k in CPU_ARGS) + (args["sm_scale"], args["max_q"])


@pytest.fixture(scope="module")
def case():
    args, _, _ = build_case([9, 0], [rand_tree(5, 1), star(3)], hq=4, hkv=2, d=16, page=4, seed=1)
    for name in ("k_cache", "v_cache"):  # opcheck compares outputs: no NaN poison in unread slots
        args[name] = torch.nan_to_num(args[name].cpu(), nan=0.0)
    return args


def test_attention_op_passes_opcheck(case):
    torch.library.opcheck(torch.ops.specdec.paged_tree_attention.default, attention_args(case))
    strided = {**case}
    kv = torch.stack([case["k_cache"], case["v_cache"]], 1)  # FlashInfer [NB, 2, BS, H, D] views
    strided.update(k_cache=kv[:, 0], v_cache=kv[:, 1], tree_mask=case["tree_mask"].bool())
    torch.library.opcheck(torch.ops.specdec.paged_tree_attention.default, attention_args(strided) + (3,))


def test_attention_op_with_tree_offsets_passes_opcheck_and_equals_the_reference():
    args, _, _ = build_case([9, 2], [rand_tree(7, 3), star(4)], hq=4, hkv=2, d=16, page=4, seed=2, offsets=[3, 1])
    args = {k: torch.nan_to_num(v.cpu(), nan=0.0) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    op_args = attention_args(args) + (0, args["q_offsets"])
    torch.library.opcheck(torch.ops.specdec.paged_tree_attention.default, op_args)
    out = ops.paged_tree_attention(*attention_args(args), q_offsets=args["q_offsets"])
    torch.testing.assert_close(out, K.paged_tree_attention_reference(**args))


def test_write_kv_op_passes_opcheck():
    gen = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(4, 4, 2, 8, generator=gen), torch.randn(4, 4, 2, 8, generator=gen)
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    torch.library.opcheck(torch.ops.specdec.write_kv.default, (kc, vc, torch.tensor([5, -1, 12]), k, v))


def test_ops_equal_the_references_in_eager_mode(case):
    out = ops.paged_tree_attention(*attention_args(case))
    torch.testing.assert_close(out, K.paged_tree_attention_reference(**{**case, "q": case["q"].cpu()}))
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    ops.write_kv(kc, vc, torch.tensor([3, 9]), k, v)
    assert torch.equal(kc.view(16, 2, 8)[[3, 9]], k) and torch.equal(vc.view(16, 2, 8)[[3, 9]], v)


def test_fake_attention_op_propagates_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 4, 16)
        kc = torch.empty(10, 4, 2, 16)
        out = ops.paged_tree_attention(q, kc, kc, torch.empty(2, 3, dtype=torch.int32),
                                       torch.empty(2, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                                       torch.empty(29, dtype=torch.uint8), torch.empty(3, dtype=torch.int64), 0.25, 5)
        assert out.shape == (7, 4, 16) and out.dtype == torch.float32


def _verify_layers(q, k_new, v_new, slots, k_all, v_all, block_table, context_lens, cu_q, tree_mask, mask_indptr):
    """A miniature verify step: per layer, write the tree's K/V into the paged cache, then attend."""
    outs = []
    for layer in range(k_all.shape[0]):
        ops.write_kv(k_all[layer], v_all[layer], slots, k_new[layer], v_new[layer])
        outs.append(ops.paged_tree_attention(q[layer], k_all[layer], v_all[layer], block_table, context_lens, cu_q,
                                             tree_mask, mask_indptr, 0.25, 8))
    return tuple(outs)  # no torch.stack: the graph needs no generated kernel, which keeps the compile short


def _step_inputs(seed):
    """2 layers, one sequence: ctx 6 committed tokens already cached, a 5-node tree written by the step."""
    gen = torch.Generator().manual_seed(seed)
    layers, nb, page, hkv, hq, d, ctx, parents = 2, 6, 4, 2, 4, 16, 6, [-1, 0, 0, 1, 2]
    n = len(parents)
    table = torch.tensor([[4, 1, 3]], dtype=torch.int32)
    pos = torch.arange(ctx + n)
    slots = (table[0, pos // page].long() * page + pos % page)
    k_all, v_all = torch.zeros(layers, nb, page, hkv, d), torch.zeros(layers, nb, page, hkv, d)
    k_all.view(layers, -1, hkv, d)[:, slots[:ctx]] = torch.randn(layers, ctx, hkv, d, generator=gen)
    v_all.view(layers, -1, hkv, d)[:, slots[:ctx]] = torch.randn(layers, ctx, hkv, d, generator=gen)
    return (torch.randn(layers, n, hq, d, generator=gen), torch.randn(layers, n, hkv, d, generator=gen),
            torch.randn(layers, n, hkv, d, generator=gen), slots[ctx:], k_all, v_all, table,
            torch.tensor([ctx], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32),
            ancestor_mask(parents).flatten(), torch.tensor([0, n * n]))


def test_verify_step_with_the_ops_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    eager_in, compiled_in = _step_inputs(3), _step_inputs(3)
    want = _verify_layers(*eager_in)
    compiled = torch.compile(_verify_layers, fullgraph=True, backend="inductor", dynamic=False)
    t0 = time.perf_counter()
    got = compiled(*compiled_in)
    compile_s = time.perf_counter() - t0
    assert len(got) == 2
    torch.testing.assert_close(got, want)
    assert torch.equal(compiled_in[4], eager_in[4]) and torch.equal(compiled_in[5], eager_in[5]), \
        "the compiled write_kv did not update the caller's cache in place"
    again_in = _step_inputs(4)  # fresh values, same shapes: no recompilation, still right
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(*again_in)
    torch.testing.assert_close(again, _verify_layers(*_step_inputs(4)))
    print(f"inductor compile + first call: {compile_s:.1f} s")

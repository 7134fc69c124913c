"""Correctness at realistic sizes and timing of the paged tree attention kernel (GPU).

    python experiments/bench_kernels.py --out out/bench_kernels.json          # full run, needs CUDA
    python experiments/bench_kernels.py --smoke                               # tiny CPU run (interpreter)

Correctness: bf16/fp16 kernel against the fp32 PyTorch reference with contexts up to 8k, trees up to 64 nodes,
a 32k-block cache with permuted block tables, GQA groups up to 8, a prefill chain, and (``--huge``) a cache
larger than 2^31 elements so block offsets need int64.

Timing (``triton.testing.do_bench``, median ms) over tree size x context x batch for: the kernel (its automatic
split-KV factor; ``bench_gpu.py`` times split against unsplit with CUDA-graph replay), the PyTorch
reference, and ``scaled_dot_product_attention`` (boolean tree mask, ``enable_gqa``) on the same data laid out
contiguously. Reports achieved GB/s against the bytes that must move (K/V of prefix and tree read once per
KV head, plus q, out and mask), and the time ratio of the largest to the smallest tree at equal context.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="one tiny case on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--trees", default="1,4,16,64", help="tree sizes (comma separated)")
    p.add_argument("--ctx", default="512,2048,8192", help="context lengths")
    p.add_argument("--batch", default="1,8,32", help="batch sizes")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=32768)
    p.add_argument("--huge", action="store_true", help="also check a >2^31-element cache (about 9 GB)")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-ref", action="store_true", help="do not time the PyTorch reference")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ints(text):
    return [int(x) for x in text.split(",") if x]


def random_parents(n, rng):
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def make_batch(torch, ctxs, trees, k_cache, v_cache, hq, rng, high_blocks=False):
    """Write random K/V for each sequence through a random block table; returns kernel kwargs and slots."""
    num_blocks, page, hkv, d = k_cache.shape
    dev, dtype = k_cache.device, k_cache.dtype
    sizes = [len(t) for t in trees]
    need = [-(-(c + n) // page) for c, n in zip(ctxs, sizes, strict=True)]
    total = sum(need)
    if total > num_blocks:
        raise ValueError(f"batch needs {total} blocks, cache has {num_blocks}")
    ids = torch.randperm(num_blocks, device=dev)[:total] if not high_blocks else \
        num_blocks - 1 - torch.randperm(total, device=dev)
    table = torch.zeros(len(ctxs), max(need), dtype=torch.int32, device=dev)
    slots, used, masks = [], 0, []
    for b, (ctx, n) in enumerate(zip(ctxs, sizes, strict=True)):
        table[b, : need[b]] = ids[used: used + need[b]].int()
        used += need[b]
        pos = torch.arange(ctx + n, device=dev)
        s = table[b, pos // page].long() * page + pos % page
        k_cache.view(-1, hkv, d)[s] = torch.randn(ctx + n, hkv, d, device=dev, dtype=dtype)
        v_cache.view(-1, hkv, d)[s] = torch.randn(ctx + n, hkv, d, device=dev, dtype=dtype)
        slots.append(s)
        m = torch.zeros(n, n, dtype=torch.uint8)
        for i, par in enumerate(trees[b]):
            if par >= 0:
                m[i] = m[par]
            m[i, i] = 1
        masks.append(m.flatten())
    cu = torch.tensor([0, *sizes], device=dev).cumsum(0).int()
    mptr = torch.tensor([0] + [n * n for n in sizes], device=dev).cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, device=dev, dtype=dtype)
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table,
                  context_lens=torch.tensor(ctxs, dtype=torch.int32, device=dev), cu_q=cu,
                  tree_mask=torch.cat(masks).to(dev), mask_indptr=mptr, sm_scale=d ** -0.5, max_q=max(sizes))
    return kwargs, slots


def fp32_args(kwargs, torch):
    """Reference inputs in fp32, with the cache cut down to the blocks the block table names (renumbered)."""
    table = kwargs["block_table"]
    used = torch.unique(table.long())
    remap = torch.zeros(kwargs["k_cache"].shape[0], dtype=torch.int32, device=table.device)
    remap[used] = torch.arange(used.numel(), dtype=torch.int32, device=table.device)
    return {**kwargs, "q": kwargs["q"].float(), "k_cache": kwargs["k_cache"][used].float(),
            "v_cache": kwargs["v_cache"][used].float(), "block_table": remap[table.long()]}


def correctness(torch, kernels, args, dtype, dev, rng):
    tol = {torch.bfloat16: (1.5e-2, 1e-2), torch.float16: (1e-2, 1e-2), torch.float32: (1e-4, 1e-4)}[dtype]
    if args.smoke:
        cases = [dict(name="smoke", ctxs=[40, 0], sizes=[4, 3], hq=4, hkv=2, d=32, blocks=64, page=16)]
    else:
        nb = args.num_blocks
        cases = [
            dict(name="mixed-g8-d128", ctxs=[8192, 4000, 1, 517], sizes=[64, 16, 1, 33], hq=32, hkv=4, d=128,
                 blocks=nb, page=16),
            dict(name="mixed-g5-d80", ctxs=[2048, 15, 3000], sizes=[64, 7, 2], hq=40, hkv=8, d=80, blocks=nb,
                 page=16),
            dict(name="g1-d64-page1", ctxs=[1000, 2000], sizes=[64, 16], hq=8, hkv=8, d=64, blocks=nb,
                 page=1),
            dict(name="prefill-chain-1024", ctxs=[0, 100], sizes=[1024, 300], hq=32, hkv=8, d=128, blocks=nb,
                 page=16, chain=True),
        ]
        if args.huge:  # 140k blocks x 16 x 8 x 128 > 2^31 elements: offsets overflow int32
            cases.append(dict(name="huge-cache-int64", ctxs=[4096, 300], sizes=[64, 9], hq=32, hkv=8, d=128,
                              blocks=140_000, page=16, high=True))
    results = []
    for c in cases:
        k_cache = torch.zeros(c["blocks"], c["page"], c["hkv"], c["d"], dtype=dtype, device=dev)
        v_cache = torch.zeros_like(k_cache)
        trees = [list(range(-1, n - 1)) if c.get("chain") else random_parents(n, rng) for n in c["sizes"]]
        kw, _ = make_batch(torch, c["ctxs"], trees, k_cache, v_cache, c["hq"], rng, c.get("high", False))
        out = kernels.paged_tree_attention(**kw)
        ref = kernels.paged_tree_attention_reference(**fp32_args(kw, torch))
        err = (out.float() - ref).abs()
        ok = bool(torch.allclose(out.float(), ref, atol=tol[0], rtol=tol[1])) and not bool(out.isnan().any())
        results.append(dict(name=c["name"], max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
                            ok=ok, atol=tol[0], rtol=tol[1]))
        print(f"  {c['name']:<22} max|err|={float(err.max()):.3e}  {'OK' if ok else 'FAIL'}")
        del k_cache, v_cache, kw, out, ref
    return results


def bench_fn(fn, dev, triton):
    if dev.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_inputs(torch, kw, slots, ctx, n):
    """Contiguous [B, H, L, D] copies of the same K/V plus a boolean [B, 1, n, ctx+n] mask."""
    hkv, d = kw["k_cache"].shape[2:]
    b = len(slots)
    idx = torch.stack(slots)  # uniform ctx and n per batch
    k = kw["k_cache"].view(-1, hkv, d)[idx].transpose(1, 2).contiguous()
    v = kw["v_cache"].view(-1, hkv, d)[idx].transpose(1, 2).contiguous()
    q = kw["q"].view(b, n, -1, d).transpose(1, 2).contiguous()
    allow = torch.ones(b, 1, n, ctx + n, dtype=torch.bool, device=q.device)
    allow[:, 0, :, ctx:] = kw["tree_mask"].view(b, n, n).bool()
    return q, k, v, allow


def sdpa_call(torch, q, k, v, allow, scale):
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allow, scale=scale,
                                                                enable_gqa=True)
    except TypeError:  # torch < 2.5 has no enable_gqa
        g = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allow, scale=scale)


def timing(torch, triton, kernels, args, dtype, dev, rng):
    if args.smoke:
        grid_b, grid_c, grid_n, hq, hkv, d, page, nb = [1], [40], [1, 4], 4, 2, 32, 16, 64
    else:
        grid_b, grid_c, grid_n = ints(args.batch), ints(args.ctx), ints(args.trees)
        hq, hkv, d, page, nb = args.hq, args.hkv, args.head_dim, args.page, args.num_blocks
    k_cache = torch.zeros(nb, page, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    elt = k_cache.element_size()
    rows = []
    print(f"\n{'batch':>5} {'ctx':>6} {'n':>4} | {'kernel ms':>9} {'GB/s':>7} | {'ref ms':>8} | "
          f"{'sdpa ms':>8} {'k/sdpa':>6}")
    for b in grid_b:
        for ctx in grid_c:
            for n in grid_n:
                kw, slots = make_batch(torch, [ctx] * b, [random_parents(n, rng) for _ in range(b)],
                                       k_cache, v_cache, hq, rng)
                out = torch.empty_like(kw["q"])
                t_kernel = bench_fn(lambda kw=kw, out=out: kernels.paged_tree_attention(**kw, out=out),
                                    dev, triton)
                t_ref = None if args.skip_ref else bench_fn(
                    lambda kw=kw: kernels.paged_tree_attention_reference(**kw), dev, triton)
                q4, k4, v4, allow = sdpa_inputs(torch, kw, slots, ctx, n)
                t_sdpa = bench_fn(lambda a=(q4, k4, v4, allow, kw["sm_scale"]): sdpa_call(torch, *a),
                                  dev, triton)
                moved = b * hkv * (ctx + n) * d * 2 * elt + 2 * b * n * hq * d * elt + b * n * n
                gbps = moved / (t_kernel * 1e-3) / 1e9
                rows.append(dict(batch=b, ctx=ctx, n=n, kernel_ms=t_kernel, ref_ms=t_ref, sdpa_ms=t_sdpa,
                                 bytes=moved, kernel_gbps=gbps))
                ref_s = f"{t_ref:8.3f}" if t_ref is not None else f"{'-':>8}"
                print(f"{b:>5} {ctx:>6} {n:>4} | {t_kernel:9.3f} {gbps:7.1f} | {ref_s} | {t_sdpa:8.3f} "
                      f"{t_kernel / t_sdpa:6.2f}")
                del kw, out, q4, k4, v4, allow
    ratios = []
    lo, hi = min(grid_n), max(grid_n)
    for b in grid_b:
        for ctx in grid_c:
            t = {r["n"]: r["kernel_ms"] for r in rows if r["batch"] == b and r["ctx"] == ctx}
            ratios.append(dict(batch=b, ctx=ctx, n_small=lo, n_large=hi, ratio=t[hi] / t[lo]))
    print(f"\ntime(n={hi}) / time(n={lo}) at equal context:")
    for r in ratios:
        print(f"  batch {r['batch']:>3} ctx {r['ctx']:>6}: {r['ratio']:.2f}")
    return rows, ratios


def split_vs_unsplit(torch, triton, kernels, grid_b, grid_c, grid_n, dev, rng):
    """Kernel with ``num_splits=1`` vs its automatic split-KV factor, and SDPA, over batch x context x tree size
    (bf16, Hq 32 / Hkv 8 / D 128, page 16), timed with ``do_bench_cudagraph`` (graph replay: no launch overhead,
    and proof the launch is capturable). On CPU (smoke): fp32, tiny heads, two forced splits, wall-clock timing.
    Rows: ms of each, GB/s and TFLOP/s of the faster kernel variant, max |split - unsplit|."""
    smoke = dev.type != "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    hq, hkv, d, page, nb = (4, 2, 32, 16, 64) if smoke else (32, 8, 128, 16, 32768)
    k_cache = torch.zeros(nb, page, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    elt = k_cache.element_size()

    def bench(fn):
        return bench_fn(fn, dev, triton) if smoke else triton.testing.do_bench_cudagraph(fn, return_mode="median")

    rows = []
    print(f"\n(a) kernels {dtype}, Hq {hq} Hkv {hkv} D {d}\n{'batch':>5} {'ctx':>6} {'n':>3} | {'1 split':>8} "
          f"{'S':>3} {'split':>8} | {'GB/s':>6} {'TFLOP/s':>7} | {'sdpa':>8}  (ms)")
    for b in grid_b:
        for ctx in grid_c:
            for n in grid_n:
                kw, slots = make_batch(torch, [ctx] * b, [random_parents(n, rng) for _ in range(b)], k_cache,
                                       v_cache, hq, rng)
                out = torch.empty_like(kw["q"])
                splits = 2 if smoke else kernels.choose_num_splits(  # smoke: force the split path
                    b, hkv, hq, n, kw["block_table"].shape[1] * page, kernels.tiles.sm_count(), d)
                err = float((kernels.paged_tree_attention(**kw, num_splits=1).float()
                             - kernels.paged_tree_attention(**kw, num_splits=splits).float()).abs().max())
                t1 = bench(lambda kw=kw, out=out: kernels.paged_tree_attention(**kw, out=out, num_splits=1))
                ts = bench(lambda kw=kw, out=out, s=splits: kernels.paged_tree_attention(**kw, out=out,
                                                                                         num_splits=s))
                q4, k4, v4, allow = sdpa_inputs(torch, kw, slots, ctx, n)
                t_sdpa = bench(lambda a=(q4, k4, v4, allow, kw["sm_scale"]): sdpa_call(torch, *a))
                best = min(t1, ts)
                moved = b * hkv * (ctx + n) * d * 2 * elt + 2 * b * n * hq * d * elt + b * n * n
                flops = 4 * b * n * hq * d * (ctx + (n + 1) / 2)
                row = dict(batch=b, ctx=ctx, n=n, unsplit_ms=t1, num_splits=splits, split_ms=ts, sdpa_ms=t_sdpa,
                           gbps=moved / best / 1e6, tflops=flops / best / 1e9, split_vs_unsplit_max_err=err)
                rows.append(row)
                print(f"{b:>5} {ctx:>6} {n:>3} | {t1:8.4f} {splits:>3} {ts:8.4f} | {row['gbps']:6.0f} "
                      f"{row['tflops']:7.2f} | {t_sdpa:8.4f}  err {err:.1e}", flush=True)
                del kw, out, q4, k4, v4, allow
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    import torch
    import triton
    import triton.testing  # noqa: F401

    from specdec import kernels

    if args.smoke:
        dev, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py needs CUDA (use --smoke for a CPU interpreter check)")
        dev = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print(f"device: {device_name}  dtype: {dtype}  triton {triton.__version__}  torch {torch.__version__}")
    result = dict(device=device_name, dtype=str(dtype), args=vars(args), correctness=[], timing=[], ratios=[])
    if not args.skip_correctness:
        print("correctness (kernel vs fp32 reference):")
        result["correctness"] = correctness(torch, kernels, args, dtype, dev, rng)
    if not args.skip_timing:
        result["timing"], result["ratios"] = timing(torch, triton, kernels, args, dtype, dev, rng)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    if not all(c["ok"] for c in result["correctness"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""One-call GPU measurement of specdec (issue 14): kernels, verify step, end to end, every drafter.

    python experiments/bench_gpu.py --out out/bench_gpu.json      # CUDA, about 5-8 minutes on an H100/H200
    python experiments/bench_gpu.py --smoke --out /tmp/smoke.json  # CPU, tiny shapes, well under a minute
    python experiments/bench_gpu.py --sections kernels,verify       # a subset: kernels, verify, e2e, drafters

Runs from a plain checkout too (no ``pip install``; the device image has none of specdec installed): the
script imports ``specdec`` from the repository it lives in when the package is not installed.

(a) ``kernels``: the bench_kernels grid (batch x context x tree size, bf16, Hq 32 / Hkv 8 / D 128, page 16), the
    Triton kernel unsplit (``num_splits=1``) and with the automatic split-KV factor, timed with
    ``triton.testing.do_bench_cudagraph`` (graph replay: launch overhead excluded, and proof the launch is
    capturable), next to SDPA on the same data laid out contiguously; GB/s and TFLOP/s.
(b) ``verify``: ``TargetModel.forward`` latency for trees of 1..64 nodes at contexts 1k / 4k on a random-weight
    8B-shaped Llama (bf16; speed does not depend on the weights), eager and compiled (``--compile``: the
    :mod:`specdec.compiled_step` graphs, CUDA-graph replays, for the tree sizes of ``--compile-buckets``; each
    bucket compiles once, about a minute), next to HF's eager decode step (DynamicCache) and
    HF's static-cache compiled decode step (``generate`` with ``cache_implementation="static"``, per-token time =
    (time(N new) - time(1 new)) / (N - 1)), all on the same card.
(c) ``e2e``: HF static+compile ``generate`` vs the specdec engine without a drafter and with an oracle chain
    drafter proposing the target's own greedy continuation (the ceiling of any chain drafter of that depth),
    eager and compiled.
(d) ``drafters``: every drafter at T=0 and T=0.8 with a small random float32 model: runs, greedy output equals
    autoregressive decoding, every KV block is freed.

Imports only torch, triton, transformers and specdec's core (no gguf, wandb, datasets or server packages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=16384),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024),
}
SECTIONS = ("kernels", "verify", "e2e", "drafters")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny version of every section on CPU")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated subset of {SECTIONS}")
    p.add_argument("--shape", default="llama8b", choices=sorted(SHAPES), help="model of (b) and (c)")
    p.add_argument("--ctx", default="1024,4096", help="contexts of (b)")
    p.add_argument("--trees", default="1,2,4,8,16,32,64", help="tree sizes of (b)")
    p.add_argument("--new", type=int, default=128, help="new tokens in (c)")
    p.add_argument("--attention", default=None, choices=["triton", "torch"], help="specdec backend (b)-(d)")
    p.add_argument("--kernel-batch", default="1,8,32")
    p.add_argument("--kernel-ctx", default="512,2048,8192")
    p.add_argument("--kernel-trees", default="1,4,16,64")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled / CUDA-graph verify step in (b) and (c)")
    p.add_argument("--compile-buckets", default="1,8,16", help="token buckets of the compiled step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.ctx, args.trees, args.new = "tiny", "24", "1,4", 12
        args.kernel_batch, args.kernel_ctx, args.kernel_trees = "1", "40", "1,4"
        args.compile_buckets = "1,4"
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def ints(text):
    return [int(x) for x in str(text).split(",") if x]


def timeit(torch, fn, dev, reps=10, warm=2):
    """Median wall milliseconds of ``fn()`` (synchronised on CUDA)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_model(torch, shape, dev, dtype, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model never exists in float32
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # smaller weights keep bf16 activations sane; speed is unaffected
        for prm in model.parameters():
            if prm.dim() == 2:
                prm.mul_(0.5)
    return model


# ------------------------------------------------------------------------------------------ (a) kernels
def section_kernels(torch, triton, args, dev):
    import random

    import bench_kernels

    from specdec import kernels

    return bench_kernels.split_vs_unsplit(torch, triton, kernels, ints(args.kernel_batch), ints(args.kernel_ctx),
                                          ints(args.kernel_trees), dev, random.Random(args.seed))


# ------------------------------------------------------------------------------------- (b) verify step
def hf_static_generate(torch, model, prompt, new, dev):
    """(tokens [new], seconds) of HF greedy ``generate`` with a static cache (auto-compiled on CUDA)."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return out[0, prompt.shape[1]:].cpu(), time.perf_counter() - t0


def hf_eager_step_ms(torch, model, ids, dev, reps):
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = ids[:, -1:]

        def step():
            model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache.crop(-1)

        return timeit(torch, step, dev, reps)


def cache_blocks(args, extra=64):
    """One cache size for every context of (b) and (c): the compiled graphs' shapes include it."""
    return (max(ints(args.ctx)) + max(max(ints(args.trees)), args.new) + extra) // 16 + 8


def section_verify(torch, args, model, target, dev, compiled=None):
    from specdec.tree import TokenTree

    g = torch.Generator().manual_seed(args.seed)
    vocab, reps, new = model.config.vocab_size, 3 if args.smoke else 10, args.new
    rows = []
    print(f"\n(b) verify step (ms), {args.shape}\n{'ctx':>6} {'n':>3} | {'specdec':>8} {'compiled':>8} | "
          f"{'HF eager':>8} {'HF static':>9} | {'vs static':>9} {'compiled':>8}")
    for ctx in ints(args.ctx):
        ids = torch.randint(0, vocab, (1, ctx), generator=g).to(dev)
        hf_eager = hf_eager_step_ms(torch, model, ids, dev, reps)
        hf_static_generate(torch, model, ids, new, dev)  # warm-up (compiles on CUDA)
        _, t_new = hf_static_generate(torch, model, ids, new, dev)
        _, t_one = hf_static_generate(torch, model, ids, 1, dev)
        hf_static = max(t_new - t_one, 0.0) / (new - 1) * 1e3
        max_n = max(ints(args.trees))
        cache = target.new_cache(num_blocks=cache_blocks(args), block_size=16)
        seq = cache.add_sequence()
        cache.reserve(seq, ctx + max_n)
        target.forward(cache, [seq], [TokenTree.chain(ids[0].cpu())], last_only=True)
        cache.commit(seq, range(ctx), keep_reserved=max_n)
        for n in ints(args.trees):
            parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
            tree = TokenTree(torch.randint(0, vocab, (n,), generator=g), torch.tensor(parents))
            ms = timeit(torch, lambda t=tree, c=cache, s=seq: target.forward(c, [s], [t]), dev, reps)
            cms = None
            if compiled is not None and n in compiled.compiled.token_buckets:
                cms = timeit(torch, lambda t=tree, c=cache, s=seq: compiled.forward(c, [s], [t]), dev, reps)
            rows.append(dict(ctx=ctx, n=n, specdec_ms=ms, compiled_ms=cms, hf_eager_ms=hf_eager,
                             hf_static_ms=hf_static))
            ctext = "       -" if cms is None else f"{cms:8.2f}"
            cratio = "       -" if cms is None else f"{cms / hf_static:7.2f}x"
            print(f"{ctx:>6} {n:>3} | {ms:8.2f} {ctext} | {hf_eager:8.2f} {hf_static:9.2f} | "
                  f"{ms / hf_static:8.2f}x {cratio}", flush=True)
        cache.release(seq)
        del cache
    return rows


# ------------------------------------------------------------------------------------- (c) end to end
class OracleChain:
    """Chain drafter proposing the next ``depth`` tokens of a known continuation ``full`` (prompt + output)."""

    vocab_size = None
    needs_hidden = False

    def __init__(self, full, depth):
        self.full, self.depth = [int(t) for t in full], depth

    def propose(self, batch, histories=None, sampling=None):
        """``batch``: a list of ``DraftInput`` (or, older protocol, ``seq_ids`` with ``histories``)."""
        from specdec.interfaces import Draft
        from specdec.tree import TokenTree

        hists = histories if histories is not None else [item.history for item in batch]
        return [Draft(TokenTree.chain([int(h[-1])] + self.full[h.numel(): h.numel() + self.depth]))
                for h in hists]

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


def run_engine(torch, target, drafter, prompt, new, dev, sampling=None, num_blocks=None):
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams

    cache = target.new_cache(num_blocks=num_blocks or (prompt.numel() + new + 64) // 16 + 8, block_size=16)
    engine = SpeculativeEngine(target, cache, drafter, eos_token_ids=())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = engine.generate(prompt, max_new_tokens=new, sampling=sampling or SamplingParams(0.0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    freed = cache.allocator.num_free == cache.allocator.num_blocks
    return result, time.perf_counter() - t0, freed


def section_e2e(torch, args, model, target, dev, compiled=None):
    g = torch.Generator().manual_seed(args.seed + 1)
    ctx, new = ints(args.ctx)[0], args.new
    prompt = torch.randint(0, model.config.vocab_size, (1, ctx), generator=g).to(dev)
    hf_static_generate(torch, model, prompt, new, dev)  # warm-up
    hf_tokens, hf_s = hf_static_generate(torch, model, prompt, new, dev)
    rows = [dict(name="hf_static_compile", tok_s=new / hf_s, speedup=1.0, tau=None, identical_to_hf=True)]
    print(f"\n(c) end to end, prompt {ctx}, {new} new tokens\n  hf_static_compile {new / hf_s:8.1f} tok/s")
    blocks = cache_blocks(args)
    run_engine(torch, target, None, prompt[0].cpu(), 8, dev, num_blocks=blocks)  # warm-up
    own = None
    runs = [("specdec_ar", 0, target), ("oracle_chain4", 4, target), ("oracle_chain8", 8, target)]
    if compiled is not None:
        runs += [(f"{name}_compiled", depth, compiled) for name, depth, _ in runs]
    for name, depth, tgt in runs:
        drafter = OracleChain(torch.cat([prompt[0].cpu(), torch.tensor(own)]), depth) if depth else None
        if tgt is compiled:  # warm-up: compiles the buckets this drafter's trees use
            run_engine(torch, tgt, drafter, prompt[0].cpu(), 2 * depth + 2, dev, num_blocks=blocks)
        result, secs, freed = run_engine(torch, tgt, drafter, prompt[0].cpu(), new, dev, num_blocks=blocks)
        own = own or result.tokens  # the target's own greedy continuation feeds the oracle
        row = dict(name=name, tok_s=new / secs, speedup=hf_s / secs, tau=result.stats.tau,
                   identical_to_hf=result.tokens == hf_tokens.tolist(), identical_to_ar=result.tokens == own,
                   blocks_freed=freed)
        rows.append(row)
        print(f"  {name:<17} {row['tok_s']:8.1f} tok/s  {row['speedup']:5.2f}x HF static  tau {row['tau']:.2f}  "
              f"same as AR {row['identical_to_ar']}  same as HF {row['identical_to_hf']}", flush=True)
    return rows


# ------------------------------------------------------------------------------------- (d) every drafter
def drafter_specs(model_dir):
    return ["ngram", "self:layers=1,tree=chain,depth=3", "self:layers=1,tree=dynamic,budget=8,depth=3,topk=2",
            f"draft-model:path={model_dir},tree=chain,depth=3",
            f"draft-model:path={model_dir},tree=dynamic,budget=8,depth=3,topk=2",
            "medusa:tree=chain", "medusa", "medusa:tree=dynamic,budget=8",
            "eagle:tree=chain,depth=3", "eagle:tree=dynamic,budget=8,depth=3,topk=2"]


def section_drafters(torch, args, dev):
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.sampling import SamplingParams
    from specdec.target import TargetModel

    shape = "tiny" if args.smoke else "small"
    model = build_model(torch, shape, dev, torch.float32, args.seed)
    target = TargetModel(model, backend=_backend(args, dev))
    new = 6 if args.smoke else 32
    prompt = torch.tensor([3, 17, 5, 9, 3, 17, 5, 9, 3, 17, 5, 11] * 2)
    ar, _, ar_freed = run_engine(torch, target, None, prompt, new, dev)
    rows = []
    print(f"\n(d) drafters ({shape} float32 model, {new} new tokens): AR blocks freed {ar_freed}")
    with tempfile.TemporaryDirectory() as tmp:
        draft_dir = os.path.join(tmp, "draft")
        build_model(torch, shape, "cpu", torch.float32, args.seed + 7).save_pretrained(draft_dir)
        for spec in drafter_specs(draft_dir):
            for temp in (0.0, 0.8):
                row = dict(drafter=spec.replace(draft_dir, "DIR"), temperature=temp)
                try:
                    drafter = build_drafter(DrafterSpec.parse(spec), target)
                    res, _, freed = run_engine(torch, target, drafter, prompt, new, dev,
                                               SamplingParams(temp, seed=args.seed))
                    row.update(ok=True, tau=res.stats.tau, blocks_freed=freed, tokens=len(res.tokens),
                               identical_to_ar=res.tokens == ar.tokens if temp == 0 else None)
                except Exception as err:  # report and go on: one broken drafter must not hide the others
                    row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
                rows.append(row)
                print(f"  {row['drafter']:<40} T={temp:.1f} " + (
                    f"tau {row['tau']:.2f} freed {row['blocks_freed']} same as AR {row['identical_to_ar']}"
                    if row["ok"] else f"FAILED {row['error']}"), flush=True)
    return rows


def _backend(args, dev):
    from specdec.attention import select_backend

    return select_backend(args.attention, dev)


def use_source_tree_if_not_installed():
    """Import specdec from this checkout when it is not installed (the device image): ``specdec.kernels``,
    ``.drafters`` and ``.train`` live at the repository root (pyproject's package-dir), so the root joins
    ``specdec.__path__``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import specdec
    except ImportError:
        sys.path.insert(0, root)
        import specdec
    try:
        import specdec.kernels  # noqa: F401
    except ImportError:
        specdec.__path__.append(root)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_kernels
    use_source_tree_if_not_installed()
    import torch
    import triton
    import triton.testing  # noqa: F401

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    if dev.type != "cuda" and not args.smoke:
        sys.exit("bench_gpu.py needs CUDA (use --smoke for the CPU check)")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, args=vars(args))
    t_start = time.perf_counter()
    if "kernels" in args.sections:
        result["kernels"] = section_kernels(torch, triton, args, dev)
    if "verify" in args.sections or "e2e" in args.sections:
        from specdec.target import TargetModel

        model = build_model(torch, args.shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32,
                            args.seed)
        target = TargetModel(model, backend=_backend(args, dev))
        compiled = None
        if args.compile:  # aot_eager in the smoke run: the same trace without minutes of CPU code generation
            compiled = TargetModel(model, backend=_backend(args, dev), compile="aot_eager" if args.smoke else True,
                                   buckets=(ints(args.compile_buckets), (1,)))
        if "verify" in args.sections:
            result["verify"] = section_verify(torch, args, model, target, dev, compiled)
        if "e2e" in args.sections:
            result["e2e"] = section_e2e(torch, args, model, target, dev, compiled)
        del model, target, compiled
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "drafters" in args.sections:
        result["drafters"] = section_drafters(torch, args, dev)
    result["total_s"] = time.perf_counter() - t_start
    print(f"\ntotal {result['total_s']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    drafters_ok = all(r["ok"] and r["blocks_freed"] and r["identical_to_ar"] is not False
                      for r in result.get("drafters", []))
    return 0 if drafters_ok else 1


if __name__ == "__main__":
    sys.exit(main())

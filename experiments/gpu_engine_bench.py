"""Sections (b) verify step and (c) end to end of ``bench_gpu.py``: a random-weight model of a real shape, the
specdec verify step (eager and compiled / CUDA-graphed) next to HF's eager and static-cache compiled decode step,
and whole generations with an oracle chain drafter. Imported by ``bench_gpu.py`` (same folder)."""

from __future__ import annotations

import statistics
import time
import traceback

SHAPES = {
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=16384),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024),
}


def ints(text):
    return [int(x) for x in str(text).split(",") if x]


def sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(torch, fn, dev, reps=10, warm=2):
    """Median wall milliseconds of ``fn()`` (synchronised on CUDA)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync(torch, dev)
        t0 = time.perf_counter()
        fn()
        sync(torch, dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_model(torch, shape, dev, dtype, seed, peaked=False):
    """A random-weight Llama of ``shape`` (speed does not depend on the weights).

    ``peaked``: the next token is decided by a wide margin, so greedy decoding has no near-ties in bf16 and
    "same output as HF / as autoregressive" is a real check: every block's output projections are scaled down
    (the residual stream stays close to the input embedding ``e_x``) and ``lm_head`` row ``j`` is the embedding of
    ``pi^-1(j)`` for a random permutation ``pi``, so the logits peak at ``pi(x)`` (``|e_x|^2`` against dot
    products ~ ``sqrt(hidden)`` times smaller). The text is a walk ``x -> pi(x)``; the shapes, and so the
    speed, are the real model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False)
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
        if peaked:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(0.02)
                layer.mlp.down_proj.weight.mul_(0.02)
            emb = model.get_input_embeddings().weight
            perm = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(seed)).to(emb.device)
            model.lm_head.weight.copy_(emb[torch.argsort(perm)])
    return model


def compile_stats(torch, compiled):
    """How many steps ran compiled / eagerly, the buckets traced, the graphs captured (``step_graphs``: a count,
    the graphs themselves go with their caches) and CUDA-graph skips inductor reported."""
    if compiled is None:
        return None
    cv = compiled.compiled
    try:
        from torch._dynamo.utils import counters
        skips = dict(counters["inductor"].get("cudagraph_skips", {})) if "inductor" in counters else {}
        skips = {str(k): v for k, v in skips.items()} if isinstance(skips, dict) else skips
    except Exception as err:  # counters are private API: report, never fail on them
        skips = f"unavailable: {err}"
    return dict(compiled_steps=cv.compiled_steps, eager_steps=cv.eager_steps, graphs=sorted(map(str, cv.graphs)),
                graph_mode=cv.graph_mode, step_graphs=cv.captures, capture_error=cv.capture_error,
                cudagraph_skips=skips)


# ------------------------------------------------------------------------------------- (b) verify step
def hf_static_generate(torch, model, prompt, new, dev):
    """(tokens [new], seconds) of HF greedy ``generate`` with a static cache (auto-compiled on CUDA)."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.inference_mode():
        sync(torch, dev)
        t0 = time.perf_counter()
        out = model.generate(prompt, **kw)
        sync(torch, dev)
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


def hf_static_step_ms(torch, model, ids, new, dev):
    """Per-token ms of HF static-cache compiled ``generate``: (time(new) - time(1)) / (new - 1), after a warm-up
    (the warm-up compiles on CUDA; its seconds are returned too)."""
    _, warm_s = hf_static_generate(torch, model, ids, new, dev)
    _, t_new = hf_static_generate(torch, model, ids, new, dev)
    _, t_one = hf_static_generate(torch, model, ids, 1, dev)
    return max(t_new - t_one, 0.0) / (new - 1) * 1e3, warm_s


def section_verify(torch, args, model, target, dev, compiled, ctxs, errors):
    """Rows of (b) for the contexts ``ctxs``; a failure of the compiled step is recorded in ``errors`` and the
    eager rows go on without it."""
    from specdec.compiled_step import bucket
    from specdec.tree import TokenTree

    g = torch.Generator().manual_seed(args.seed + sum(ctxs))
    vocab, reps, new = model.config.vocab_size, 3 if args.smoke else 10, args.new
    rows = []
    print(f"\n(b) verify step (ms), {args.shape}\n{'ctx':>6} {'n':>3} | {'specdec':>8} {'compiled':>8} | "
          f"{'HF eager':>8} {'HF static':>9} | {'vs static':>9} {'compiled':>8}", flush=True)
    for ctx in ctxs:
        ids = torch.randint(0, vocab, (1, ctx), generator=g).to(dev)
        hf_eager = hf_eager_step_ms(torch, model, ids, dev, reps)
        hf_static, hf_warm_s = hf_static_step_ms(torch, model, ids, new, dev)
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
            cms = first_s = None
            size = None if compiled is None else bucket(n, compiled.compiled.token_buckets)
            if size is not None:
                try:
                    fresh = not any(gr[0] == size for gr in compiled.compiled.graphs)
                    sync(torch, dev)
                    t0 = time.perf_counter()
                    compiled.forward(cache, [seq], [tree])  # first call of a bucket compiles and captures
                    sync(torch, dev)
                    first_s = time.perf_counter() - t0 if fresh else None
                    cms = timeit(torch, lambda t=tree, c=cache, s=seq, m=compiled: m.forward(c, [s], [t]), dev, reps)
                except Exception as err:  # keep the eager rows; say why the compiled step failed
                    errors.append(f"compiled verify ctx {ctx} n {n}: {type(err).__name__}: {err}"[:2000])
                    traceback.print_exc()
                    compiled = None
            rows.append(dict(ctx=ctx, n=n, bucket=size, specdec_ms=ms, compiled_ms=cms, compile_s=first_s,
                             hf_eager_ms=hf_eager, hf_static_ms=hf_static, hf_static_first_call_s=hf_warm_s))
            ctext = "       -" if cms is None else f"{cms:8.2f}"
            cratio = "       -" if cms is None else f"{cms / hf_static:7.2f}x"
            print(f"{ctx:>6} {n:>3} | {ms:8.2f} {ctext} | {hf_eager:8.2f} {hf_static:9.2f} | "
                  f"{ms / hf_static:8.2f}x {cratio}" + ("" if first_s is None else f"  (compiled in {first_s:.0f} s)"),
                  flush=True)
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


def run_engine(torch, target, drafter, prompt, new, dev, sampling=None, num_blocks=None, cache=None):
    """(result, seconds, every block free afterwards); ``cache``: reuse one (a server keeps one for its life; a
    compiled step captures its CUDA graphs once per cache), else a fresh one of ``num_blocks``."""
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams

    if cache is None:
        cache = target.new_cache(num_blocks=num_blocks or (prompt.numel() + new + 64) // 16 + 8, block_size=16)
    engine = SpeculativeEngine(target, cache, drafter, eos_token_ids=())
    sync(torch, dev)
    t0 = time.perf_counter()
    result = engine.generate(prompt, max_new_tokens=new, sampling=sampling or SamplingParams(0.0))
    sync(torch, dev)
    freed = cache.allocator.num_free == cache.allocator.num_blocks
    return result, time.perf_counter() - t0, freed


def profile_engine(torch, target, prompt, new, dev, cache, path):
    """Host profile (cProfile, by own time) of one engine run: where the step's wall time goes outside the GPU."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_engine(torch, target, None, prompt, new, dev, cache=cache)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    with open(path, "w") as f:
        f.write(text.getvalue())


def section_e2e(torch, args, model, target, dev, compiled, errors, profile=None):
    g = torch.Generator().manual_seed(args.seed + 1)
    ctx, new = ints(args.ctx)[0], args.new
    prompt = torch.randint(0, model.config.vocab_size, (1, ctx), generator=g).to(dev)
    hf_static_generate(torch, model, prompt, new, dev)  # warm-up
    hf_tokens, hf_s = hf_static_generate(torch, model, prompt, new, dev)
    rows = [dict(name="hf_static_compile", tok_s=new / hf_s, speedup=1.0, tau=None, identical_to_hf=True)]
    print(f"\n(c) end to end, prompt {ctx}, {new} new tokens\n  hf_static_compile {new / hf_s:8.1f} tok/s",
          flush=True)
    caches = {id(t): t.new_cache(num_blocks=cache_blocks(args), block_size=16) for t in (target, compiled) if t}
    run_engine(torch, target, None, prompt[0].cpu(), 8, dev, cache=caches[id(target)])  # warm-up
    own = None
    runs = [("specdec_ar", 0, target)] + [(f"oracle_chain{d}", d, target) for d in ints(args.oracle_depths)]
    if compiled is not None:
        runs += [(f"{name}_compiled", depth, compiled) for name, depth, _ in runs]
    for name, depth, tgt in runs:
        drafter = OracleChain(torch.cat([prompt[0].cpu(), torch.tensor(own)]), depth) if depth else None
        try:
            cache = caches[id(tgt)]
            if tgt is compiled:  # warm-up: compiles the buckets this drafter's trees use, captures their graphs
                run_engine(torch, tgt, drafter, prompt[0].cpu(), 4 * depth + 4, dev, cache=cache)
            result, secs, freed = run_engine(torch, tgt, drafter, prompt[0].cpu(), new, dev, cache=cache)
            if profile and name == "specdec_ar_compiled":
                profile_engine(torch, tgt, prompt[0].cpu(), new, dev, cache, profile)
        except Exception as err:  # one failing configuration must not hide the others
            errors.append(f"e2e {name}: {type(err).__name__}: {err}"[:2000])
            traceback.print_exc()
            continue
        own = own or result.tokens  # the target's own greedy continuation feeds the oracle
        st = result.stats
        row = dict(name=name, tok_s=new / secs, speedup=hf_s / secs, tau=st.tau,
                   identical_to_hf=result.tokens == hf_tokens.tolist(), identical_to_ar=result.tokens == own,
                   blocks_freed=freed, wall_s=secs, steps=st.steps, prefill_s=st.prefill_s, draft_s=st.draft_s,
                   verify_s=st.verify_s, ms_per_step=1e3 * (secs - st.prefill_s) / max(st.steps, 1))
        rows.append(row)
        print(f"  {name:<22} {row['tok_s']:8.1f} tok/s  {row['speedup']:5.2f}x HF static  tau {row['tau']:.2f}  "
              f"{row['ms_per_step']:6.2f} ms/step (verify {1e3 * st.verify_s / max(st.steps, 1):.2f})  "
              f"same as AR {row['identical_to_ar']}  same as HF {row['identical_to_hf']}", flush=True)
    return rows

"""One-call GPU measurement of specdec (issue 14): kernels, verify step, end to end, every drafter.

    python experiments/bench_gpu.py --out out/bench_gpu.json      # CUDA, about 5-8 minutes on an H100/H200
    python experiments/bench_gpu.py --smoke --out /tmp/smoke.json  # CPU, tiny shapes, well under a minute
    python experiments/bench_gpu.py --sections kernels,verify       # a subset: kernels, verify, e2e, drafters

Runs from a plain checkout too (no ``pip install``; the device image has none of specdec installed): the
script imports ``specdec`` from the repository it lives in when the package is not installed.

(a) ``kernels``: correctness against the fp32 reference at realistic sizes (automatic split-KV factor), the
    device-to-device copy bandwidth (the ceiling), and the bench_kernels grid (batch x context x tree size, bf16,
    Hq 32 / Hkv 8 / D 128, page 16): the Triton kernel unsplit (``num_splits=1``) and with the automatic split-KV
    factor, timed with ``triton.testing.do_bench_cudagraph`` (graph replay: launch overhead excluded, and proof
    the launch is capturable), next to SDPA on the same data laid out contiguously; GB/s and TFLOP/s.
(b) ``verify`` (gpu_engine_bench.py): ``TargetModel.forward`` latency for trees of 1..64 nodes at contexts 1k /
    4k on a random-weight 8B-shaped Llama (bf16; speed does not depend on the weights), eager and compiled
    (``--compile``: the :mod:`specdec.compiled_step` graphs, CUDA-graph replays, every tree size that fits one of
    ``--compile-buckets``, padded; each bucket compiles once, about a minute), next to HF's eager decode step
    (DynamicCache) and HF's static-cache compiled decode step (``generate`` with ``cache_implementation="static"``,
    per-token time = (time(N new) - time(1 new)) / (N - 1)), all on the same card.
(c) ``e2e`` (gpu_engine_bench.py): HF static+compile ``generate`` vs the specdec engine without a drafter and
    with an oracle chain drafter proposing the target's own greedy continuation (the ceiling of any chain drafter
    of that depth), eager and compiled.
(d) ``drafters``: every drafter at T=0 and T=0.8 with a small random float32 model: runs, greedy output equals
    autoregressive decoding, every KV block is freed.

Order: kernels, verify at the first context, e2e, drafters, verify at the other contexts. Results are written
after every stage; a stage that raises is recorded (``errors``) and the next one runs; ``--budget-s`` skips the
stages that would start late (``skipped``), so a device call with a hard limit still returns what it measured.

Imports only torch, triton, transformers and specdec's core (no gguf, wandb, datasets or server packages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

SECTIONS = ("kernels", "verify", "e2e", "drafters")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny version of every section on CPU")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated subset of {SECTIONS}")
    p.add_argument("--shape", default="llama8b", choices=("llama8b", "small", "tiny"),
                   help="model of (b) and (c) (gpu_engine_bench.SHAPES)")
    p.add_argument("--ctx", default="1024,4096", help="contexts of (b)")
    p.add_argument("--trees", default="1,2,4,8,16,32,64", help="tree sizes of (b)")
    p.add_argument("--new", type=int, default=128, help="new tokens in (c)")
    p.add_argument("--attention", default=None, choices=["triton", "torch"], help="specdec backend (b)-(d)")
    p.add_argument("--kernel-batch", default="1,8,32")
    p.add_argument("--kernel-ctx", default="512,2048,8192")
    p.add_argument("--kernel-trees", default="1,4,16,64")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled / CUDA-graph verify step in (b) and (c)")
    p.add_argument("--graphs", default=None, choices=["manual", "trees", "none"],
                   help="CUDA graphs of the compiled step (default: manual on CUDA; see specdec.compiled_step)")
    p.add_argument("--compile-buckets", default="1,8,16", help="token buckets of the compiled step")
    p.add_argument("--oracle-depths", default="4,8", help="(c): depths of the oracle chain drafter")
    p.add_argument("--profile", default=None, help="(c): write a host profile of the compiled AR run here")
    p.add_argument("--budget-s", type=float, default=0,
                   help="skip the stages that would start after this many seconds (0: no limit)")
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


# ------------------------------------------------------------------------------------------ (a) kernels
def copy_bandwidth_gbs(torch, triton, dev):
    """Device-to-device copy of 2 GiB, bytes read + written per second: the ceiling the kernel is held to."""
    if dev.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda a=src, b=dst: b.copy_(a), return_mode="median")
    del src, dst
    return 2 * 2**31 / ms / 1e6


def section_kernels(torch, triton, args, dev):
    """Correctness against the fp32 reference (automatic split-KV factor, realistic sizes), the copy ceiling,
    then the timing grid of ``bench_kernels.split_vs_unsplit``."""
    import random

    import bench_kernels

    from specdec import kernels

    rng = random.Random(args.seed)
    checks = argparse.Namespace(smoke=args.smoke, num_blocks=32768, huge=False)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    correct = bench_kernels.correctness(torch, kernels, checks, dtype, dev, rng)
    copy = copy_bandwidth_gbs(torch, triton, dev)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)" if copy else "", flush=True)
    grid = bench_kernels.split_vs_unsplit(torch, triton, kernels, ints(args.kernel_batch), ints(args.kernel_ctx),
                                          ints(args.kernel_trees), dev, rng)
    for row in grid:
        row["copy_fraction"] = row["gbps"] / copy if copy else None
    return dict(correctness=correct, copy_gbps=copy, grid=grid)

# ------------------------------------------------------------------------------------- (d) every drafter
def drafter_specs(model_dir):
    return ["ngram", "self:layers=1,tree=chain,depth=3", "self:layers=1,tree=dynamic,budget=8,depth=3,topk=2",
            f"draft-model:path={model_dir},tree=chain,depth=3",
            f"draft-model:path={model_dir},tree=dynamic,budget=8,depth=3,topk=2",
            "medusa:tree=chain", "medusa", "medusa:tree=dynamic,budget=8",
            "eagle:tree=chain,depth=3", "eagle:tree=dynamic,budget=8,depth=3,topk=2"]


def section_drafters(torch, args, dev):
    from gpu_engine_bench import build_model, run_engine

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


# installed name -> folder of the repository root (pyproject's package-dir; tests/test_bench_gpu.py checks they agree)
PACKAGE_DIRS = {"specdec.drafters": "drafters", "specdec.kernels": "specdec_kernels", "specdec.train": "train"}


def use_source_tree_if_not_installed():
    """Import specdec from this checkout when it is not installed (the device image): ``specdec.drafters``,
    ``.kernels`` and ``.train`` live in other folders of the repository root (:data:`PACKAGE_DIRS`, as pyproject's
    ``[tool.setuptools.package-dir]`` maps them); each is loaded from its folder under its installed name."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import specdec
    except ImportError:
        sys.path.insert(0, root)
        import specdec
    try:
        import specdec.kernels  # noqa: F401
        return
    except ImportError:
        pass
    class PackageDirFinder:  # what the editable install's finder does: an installed name -> its folder
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname not in PACKAGE_DIRS:
                return None
            folder = os.path.join(root, PACKAGE_DIRS[fullname])
            return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    sys.meta_path.insert(0, PackageDirFinder())


class Run:
    """Results written to ``--out`` after every stage (a run cut short still leaves what it measured); a stage that
    raises is recorded with its traceback and the next one goes on; stages past ``--budget-s`` are skipped."""

    def __init__(self, args, result):
        self.args, self.result, self.t0 = args, result, time.perf_counter()
        result.setdefault("errors", [])
        result.setdefault("skipped", [])

    def stage(self, name, fn, *fn_args):
        elapsed = time.perf_counter() - self.t0
        if self.args.budget_s and elapsed > self.args.budget_s:
            print(f"\n[{elapsed:.0f} s] skipping {name}: past --budget-s {self.args.budget_s}", flush=True)
            self.result["skipped"].append(name)
            return None
        print(f"\n[{elapsed:.0f} s] {name}", flush=True)
        try:
            value = fn(*fn_args)
        except Exception as err:
            traceback.print_exc()
            self.result["errors"].append(f"{name}: {type(err).__name__}: {err}"[:2000])
            value = None
        self.save()
        return value

    def save(self):
        self.result["total_s"] = time.perf_counter() - self.t0
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump(self.result, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_kernels, gpu_engine_bench
    use_source_tree_if_not_installed()
    import gpu_engine_bench as eb
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
    run = Run(args, result)
    if "kernels" in args.sections:
        result["kernels"] = run.stage("kernels", section_kernels, torch, triton, args, dev)
    ctxs = ints(args.ctx)
    if "verify" in args.sections or "e2e" in args.sections:
        from specdec.target import TargetModel

        model = eb.build_model(torch, args.shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32,
                               args.seed, peaked=True)
        target = TargetModel(model, backend=_backend(args, dev))
        compiled = None
        if args.compile:  # aot_eager in the smoke run: the same trace without minutes of CPU code generation
            compiled = TargetModel(model, backend=_backend(args, dev), compile="aot_eager" if args.smoke else True,
                                   buckets=(ints(args.compile_buckets), (1,)),
                                   graphs=args.graphs or ("manual" if args.smoke else None))
        errors = result["errors"]
        verify = result["verify"] = []
        if "verify" in args.sections:  # the first context now, the others after the drafters (least needed)
            verify += run.stage(f"verify ctx {ctxs[0]}", eb.section_verify, torch, args, model, target, dev,
                                compiled, ctxs[:1], errors) or []
        if "e2e" in args.sections:
            result["e2e"] = run.stage("e2e", eb.section_e2e, torch, args, model, target, dev, compiled, errors,
                                      args.profile)
    if "drafters" in args.sections:
        result["drafters"] = run.stage("drafters", section_drafters, torch, args, dev)
    if "verify" in args.sections and len(ctxs) > 1:
        verify += run.stage(f"verify ctx {ctxs[1:]}", eb.section_verify, torch, args, model, target, dev,
                            compiled, ctxs[1:], errors) or []
    if "verify" in args.sections or "e2e" in args.sections:
        result["compile_stats"] = eb.compile_stats(torch, compiled)
    run.save()
    print(f"\ntotal {result['total_s']:.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    if result["errors"]:
        print("errors:\n  " + "\n  ".join(result["errors"]))
    drafters_ok = all(r["ok"] and r["blocks_freed"] and r["identical_to_ar"] is not False
                      for r in result.get("drafters") or [])
    return 0 if drafters_ok and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

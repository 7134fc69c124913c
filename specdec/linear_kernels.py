"""Which CPU kernel runs a float32 linear of a given shape and row count: measured once per machine, then remembered.

Three kernels compute ``F.linear(x, weight, bias)`` on the CPU:

* ``plain``: ``F.linear`` itself (MKL ``sgemm`` on the weight as stored);
* ``mkl``: MKL's packed GEMM on a copy of the weight reordered once (``torch.ops.mkl._mkl_reorder_linear_weight``
  / ``_mkl_linear``, the ops inductor's CPU weight pre-packing uses);
* ``onednn``: oneDNN's inner product on a copy reordered once (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``).

Which is fastest depends on the processor and the row count, and by a lot. SmolLM2-135M's LM head
(``[49152, 576]``), milliseconds per call, best of 4, 2 threads (torch 2.13):

=========================  ====  ====  ====  ====  ====  ====
kernel                     1     2     3     4     8     16
=========================  ====  ====  ====  ====  ====  ====
2-core AMD EPYC: plain     8.1   19.6  28.8  19.2  18.2  21.7
2-core AMD EPYC: mkl       4.0   8.6   15.8  14.2  15.0  22.4
2-core AMD EPYC: onednn    3.8   4.2   4.3   5.4   6.3   9.1
=========================  ====  ====  ====  ====  ====  ====

(On the 2-core Xeon of earlier sessions the MKL packed kernel was the better one from 4 rows up.) So a tree
verifier that pays 2.4x a decode step's LM head for a 2-node tree on one machine pays 1.1x on another. Results are
the same dot products summed in another order (float32 rounding, like any change of GEMM kernel).

:func:`kernel_for` picks, for a weight shape and row count, the kernel :func:`measure_kernels` found fastest at the
next measured row count up (``ROW_POINTS``; ``plain`` unless another takes under ``MARGIN`` of its time). Weights
are timed cold, as a model's are (each call reads another copy, the copies together larger than the caches). The
choice is measured once per shape, thread count, processor and torch version (about 0.1-0.5 s a shape) and kept in
``<cache>/linear-kernels.json`` (the model cache's folder: ``$SPECDEC_CACHE``, ``$XDG_CACHE_HOME/specdec`` or
``~/.cache/specdec``). ``SPECDEC_LINEAR_KERNEL=plain|mkl|onednn`` forces one kernel everywhere (A/B runs).

Drafters may also run an APPROXIMATE kernel, ``onednn-bf16`` (oneDNN's inner product on a bfloat16 copy of the
weight, the input rounded to bfloat16, float32 output): a draft's precision changes which tokens are proposed,
never what is accepted (the target verifies in float32), and a head's few-row products are memory-bound, so half
the bytes is about half the time where the processor has bfloat16 dot products. The shipped EAGLE-3 head's linears
on the 2-core AMD EPYC (``avx512_bf16``), ms per call, 1 / 4 rows: ``[1536, 576]`` 0.21 / 0.33 float32 oneDNN,
0.12 / 0.13 bfloat16; ``[8192, 576]`` (its LM head) 0.87 / 1.39 against 0.41 / 0.45. ``kernel_for(...,
approximate=True)`` measures it beside the exact kernels (cached under its own key) and takes it when fastest;
``SPECDEC_DRAFT_PRECISION=float32`` keeps drafters exact too (A/B runs).
"""

from __future__ import annotations

import bisect
import functools
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.app.model_cache import cache_root, read_keyed, write_keyed

KERNELS = ("plain", "mkl", "onednn")
APPROXIMATE_KERNELS = ("onednn-bf16",)  # for drafters only (module docstring)
DRAFT_PRECISION_ENV = "SPECDEC_DRAFT_PRECISION"  # "float32": drafters use the exact kernels only
ROW_POINTS = (1, 2, 3, 4, 8, 16)  # row counts measured; another count takes the next point up (beyond: the last)
MKL_ROWS = 16  # row count the MKL copy is packed for (its layout serves any count: outputs equal whichever)
ONEDNN_ROWS = 4  # row-count hint the oneDNN copy is reordered for (any count runs on it)
MARGIN = 0.9  # a packed kernel must take under 90 % of plain's time to replace it
PAD_ROWS = 4  # 1 or 2 rows may run padded to this many (the oneDNN copy's row hint): "KERNEL@4" in a table
PADDED_ROWS = (1, 2)  # 3 rows padded measured slower per whole step (below), though faster per product
PAD_MARGIN = 0.95  # padded, a kernel must take under 95 % of the unpadded choice's time
COLD_BYTES = 96 << 20  # the timed copies of a weight add up to at least this (up to MAX_COPIES): caches miss
MAX_COPIES = 256
FILE_NAME = "linear-kernels.json"


def pack(kernel: str, weight: torch.Tensor) -> torch.Tensor | None:
    """The copy of ``weight`` (``[out, in]`` float32, CPU) that ``kernel`` runs on (``None`` for plain)."""
    with torch.no_grad():
        if kernel == "mkl":
            return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), MKL_ROWS)
        if kernel == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ONEDNN_ROWS)
        if kernel == "onednn-bf16":
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), ONEDNN_ROWS)
    return None


def run(kernel: str, x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor,
        bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a contiguous ``[rows, in]`` ``x`` by ``kernel`` on its ``packed`` copy."""
    if kernel == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if kernel == "onednn-bf16":
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").float()
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


@functools.cache
def available_kernels() -> tuple[str, ...]:
    """The kernels this torch build has whose products match ``F.linear`` (to float32 rounding) for 1, 3 and 16
    rows on a weight packed once; ``plain`` always."""
    have = ["plain"]
    ops = {"mkl": (torch.backends.mkl.is_available(), getattr(torch.ops, "mkl", None),
                   ("_mkl_reorder_linear_weight", "_mkl_linear")),
           "onednn": (torch.backends.mkldnn.is_available(), getattr(torch.ops, "mkldnn", None),
                      ("_reorder_linear_weight", "_linear_pointwise"))}
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    for kernel, (built, namespace, names) in ops.items():
        try:
            if not built or namespace is None or not all(hasattr(namespace, n) for n in names):
                continue
            packed = pack(kernel, weight)
            if all(torch.allclose(run(kernel, x, packed, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
                   for x in (torch.randn(rows, 24, generator=gen) for rows in (1, 3, 16))):
                have.append(kernel)
        except (RuntimeError, AttributeError):
            continue
    return tuple(have)


@functools.cache
def approximate_kernels() -> tuple[str, ...]:
    """The approximate kernels (``APPROXIMATE_KERNELS``) this torch build and processor run natively, each checked
    against ``F.linear`` to bfloat16 rounding (relative error under 2 %)."""
    have = []
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            gen = torch.Generator().manual_seed(0)
            weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
            packed = pack("onednn-bf16", weight)
            if all(float((run("onednn-bf16", x, packed, weight, bias) - F.linear(x, weight, bias)).norm())
                   < 0.02 * float(F.linear(x, weight, bias).norm())
                   for x in (torch.randn(rows, 24, generator=gen) for rows in (1, 3, 16))):
                have.append("onednn-bf16")
    except (RuntimeError, AttributeError):
        pass
    return tuple(have)


def drafts_approximate() -> bool:
    """Whether drafters may run approximate kernels (not when ``SPECDEC_DRAFT_PRECISION=float32``)."""
    value = os.environ.get(DRAFT_PRECISION_ENV, "bfloat16")
    if value not in ("bfloat16", "float32"):
        raise ValueError(f"{DRAFT_PRECISION_ENV}={value!r}: use 'bfloat16' (default) or 'float32'")
    return value == "bfloat16"


def measure_kernels(out_features: int, in_features: int, kernels: Sequence[str] | None = None,
                    rows: Sequence[int] = ROW_POINTS, repeats: int = 2) -> dict[int, dict[str, float]]:
    """Seconds per call of each kernel (exact or approximate) at each row count on cold random weights of this shape:
    every timed pass runs each of ``copies`` weights once (``copies`` large enough that they miss the caches
    together), the kernels taking turns; best of ``repeats`` passes after a warm-up pass."""
    kernels = list(kernels or available_kernels())
    copies = max(1, min(MAX_COPIES, -(-COLD_BYTES // (out_features * in_features * 4))))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weights = [torch.randn(out_features, in_features, generator=gen) for _ in range(copies)]
        packed = {k: [pack(k, w) for w in weights] for k in kernels}
        times: dict[int, dict[str, float]] = {}
        for n in rows:
            x = torch.randn(n, in_features, generator=gen)
            best = dict.fromkeys(kernels, float("inf"))
            for r in range(repeats + 1):
                for k in kernels:
                    t0 = time.perf_counter()
                    for w, p in zip(weights, packed[k], strict=True):
                        run(k, x, p, w, None)
                    if r:
                        best[k] = min(best[k], (time.perf_counter() - t0) / copies)
            times[n] = best
    return times


def choose(times: dict[str, float]) -> str:
    """``plain`` unless the fastest other kernel takes under ``MARGIN`` of its time."""
    other = min((k for k in times if k != "plain"), key=times.__getitem__, default=None)
    return other if other is not None and times[other] < MARGIN * times["plain"] else "plain"


def choose_table(times: dict[int, dict[str, float]]) -> tuple[str, ...]:
    """The kernel of each of ``ROW_POINTS`` from its measured ``times`` (:func:`choose`); at ``PADDED_ROWS`` the
    fastest packed kernel at ``PAD_ROWS`` rows, run on the rows padded (``"onednn@4"``), where it takes under
    ``PAD_MARGIN`` of the unpadded choice's time. oneDNN reorders a weight for a row count: on the 2-core AMD EPYC
    a [1536, 576] product took 0.19 / 0.24 / 0.20 ms for 1 / 2 / 3 rows and 0.17 ms for 4. Whole SmolLM2 steps
    (rejected trees, 200 cached tokens, padded and unpadded interleaved): 2 nodes 2.4-3.7 ms faster in each of
    three runs, 1 node faster in two of three; 3 nodes padded went 45.7 -> 46.6 and 48.6 -> 51.3 ms (not padded;
    docs/results/session14)."""
    out = []
    for n in ROW_POINTS:
        kernel = choose(times[n])
        if n in PADDED_ROWS and PAD_ROWS in times:
            at = times[PAD_ROWS]
            padded = min((k for k in at if k != "plain"), key=at.__getitem__, default=None)
            if padded is not None and at[padded] < PAD_MARGIN * times[n][kernel]:
                kernel = f"{padded}@{PAD_ROWS}"
        out.append(kernel)
    return tuple(out)


def split_kernel(name: str) -> tuple[str, int]:
    """``"onednn@4"`` -> ``("onednn", 4)``: the kernel and the row count its input is padded to (0: not padded)."""
    kernel, _, rows = name.partition("@")
    return kernel, int(rows or 0)


def kernel_for(out_features: int, in_features: int, rows: int, approximate: bool = False) -> str:
    """The kernel a ``rows``-row product with an ``[out_features, in_features]`` float32 weight runs; with
    ``approximate`` (drafters) an approximate kernel may be chosen (module docstring)."""
    forced = os.environ.get("SPECDEC_LINEAR_KERNEL")
    if forced:
        if split_kernel(forced)[0] not in available_kernels():
            raise ValueError(f"SPECDEC_LINEAR_KERNEL={forced!r}: this torch build has {list(available_kernels())}")
        return forced
    approximate = approximate and drafts_approximate() and bool(approximate_kernels())
    table = kernel_table(out_features, in_features, torch.get_num_threads(), approximate)
    return table[min(bisect.bisect_left(ROW_POINTS, rows), len(ROW_POINTS) - 1)]


@functools.cache
def kernel_table(out_features: int, in_features: int, threads: int, approximate: bool = False) -> tuple[str, ...]:
    """The kernel for each of ``ROW_POINTS`` on this machine (among the approximate ones too with ``approximate``):
    from the file of earlier measurements, else measured now (and written there; an unwritable cache is
    skipped)."""
    kernels = available_kernels() + (approximate_kernels() if approximate else ())
    key = f"torch {torch.__version__} | {processor()} | {threads} threads | {out_features}x{in_features}"
    key += " | approximate" if approximate else ""
    saved = read_keyed(FILE_NAME).get(key)
    ms = (saved or {}).get("ms", {})
    if all(str(n) in ms and set(ms[str(n)]) <= set(kernels) for n in ROW_POINTS):  # choices follow the timings kept
        return choose_table({n: {k: t / 1e3 for k, t in ms[str(n)].items()} for n in ROW_POINTS})
    if out_features * in_features >= 1 << 20:  # a visible pause otherwise unexplained (small shapes: milliseconds)
        print(f"specdec: timing CPU linear kernels for a [{out_features}, {in_features}] weight, once on this machine "
              f"(kept in {cache_root() / FILE_NAME})", file=sys.stderr, flush=True)
    times = measure_kernels(out_features, in_features, kernels)
    table = choose_table(times)
    write_keyed(FILE_NAME, key, {"kernels": list(table), "rows": list(ROW_POINTS),
                                 "ms": {str(n): {k: round(1e3 * t, 4) for k, t in times[n].items()}
                                        for n in ROW_POINTS}})
    return table


@functools.cache
def processor() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

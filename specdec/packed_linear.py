"""Packed-weight linears for float32 models on CPU: MKL's packed GEMM, whose cost grows gently with the row count.

On CPU a float32 ``F.linear`` with a handful of rows (a decode step, a small draft tree) runs MKL ``sgemm`` on the
``[out, in]`` weight as stored, and its cost jumps with the row count in ways a tree verifier pays for. Measured on
this project's 2-core Xeon (torch 2.13, the linears of one SmolLM2-135M layer plus its LM head, median of 3):

====  ===========  ======================
rows  ``F.linear``  packed (``_mkl_linear``)
====  ===========  ======================
1     5.65 ms      4.38 ms
4     9.20 ms      6.36 ms
8     17.2 ms      7.56 ms
16    13.2 ms      9.18 ms
====  ===========  ======================

So a 16-node tree costs about 2x one row instead of 2.3-4x, and one row is 1.3x cheaper. The weights are reordered
once into MKL's packed layout (``torch.ops.mkl._mkl_reorder_linear_weight``, the op inductor's CPU weight
pre-packing uses) and every call runs ``cblas_sgemm_compute`` on it (``torch.ops.mkl._mkl_linear``). The packed
layout does not depend on the row count (outputs are bitwise equal whichever count it was packed for; checked by
:func:`packing_works` before anything is packed), so one copy serves every step. Results are the same dot products
in another summation order (float32 rounding, like any change of GEMM kernel).

Applied by :class:`specdec.target.TargetModel` to its own *view* of the HF model (new module objects sharing the
parameters): the caller's model keeps its ``nn.Linear`` modules and HF ``generate`` is untouched. Costs one extra
copy of the linear weights in memory. A weight changed in place after packing (its ``_version`` moved) is
repacked at the next call.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

PACK_ROWS = 16  # row count the weights are packed for (any count then runs on the same copy)
MIN_ROWS = 4  # fewer rows run plain ``F.linear``: measured equal or faster there (table in the module docstring)
AUTO_LIMIT_BYTES = 4 << 30  # ``pack_linears(..., limit)``: bigger models are left alone unless asked (memory x2)


def _ops_present() -> bool:
    mkl = getattr(torch.ops, "mkl", None)
    return (torch.backends.mkl.is_available() and mkl is not None
            and hasattr(mkl, "_mkl_reorder_linear_weight") and hasattr(mkl, "_mkl_linear"))


@functools.cache
def packing_works() -> bool:
    """Whether this torch build packs float32 weights, and packed products match ``F.linear`` (to float32
    rounding) for 1, 3 and 16 rows on a weight packed once."""
    if not _ops_present():
        return False
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
        for rows in (1, 3, PACK_ROWS):
            x = torch.randn(rows, 24, generator=gen)
            got = torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
            if not torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
                return False
    except RuntimeError:
        return False
    return True


class PackedWeight:
    """``F.linear(x, weight, bias)`` on an MKL-packed copy of ``weight`` (float32, CPU; inference only), packed at the
    first call with at least ``MIN_ROWS`` rows and again whenever ``weight`` changes in place.

    Other inputs (fewer rows, another dtype or device, or needing a gradient) run ``F.linear`` on ``weight``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self._packed: torch.Tensor | None = None
        self._key: tuple[int, int] = (-1, -1)

    def __deepcopy__(self, memo: dict) -> PackedWeight:  # a copy packs its own weight (packed tensors don't copy)
        return PackedWeight(copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None, "_key": (-1, -1)}

    def _pack(self) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr())  # in-place updates and ``.data =`` both move it
        if self._packed is None or key != self._key:
            with torch.no_grad():
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), PACK_ROWS)
            self._key = key
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.reshape(-1, weight.shape[1])
        if (rows.shape[0] < MIN_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32
                or x.device.type != "cpu" or weight.device.type != "cpu" or not packing_works()
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, self.bias)
        rows = rows.contiguous()
        out = torch.ops.mkl._mkl_linear(rows, self._pack(), weight, self.bias, rows.shape[0])
        return out.reshape(*x.shape[:-1], weight.shape[0])


class PackedLinear(torch.nn.Module):
    """Drop-in ``nn.Linear`` (same weight and bias Parameters, nothing copied but the packed form) running
    :class:`PackedWeight`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._run = PackedWeight(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < MIN_ROWS * self.in_features:  # decode steps: exactly nn.Linear's cost
            return F.linear(x, self.weight, self.bias)
        if self._run.weight is not self.weight or self._run.bias is not self.bias:  # parameters swapped (load, .to)
            self._run = PackedWeight(self.weight, self.bias)
        return self._run(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linear_bytes(module: torch.nn.Module) -> int:
    """Bytes of the float32 CPU ``nn.Linear`` weights in ``module`` (each shared weight counted once)."""
    seen = {id(m.weight): m.weight for m in module.modules() if _packable(m)}
    return sum(w.numel() * w.element_size() for w in seen.values())


def _packable(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")


def pack_linears(module: torch.nn.Module, limit: int | None = AUTO_LIMIT_BYTES) -> int:
    """Replace, inside ``module``, every float32 CPU ``nn.Linear`` by a :class:`PackedLinear` sharing its weight.

    Only for module trees the caller owns (``TargetModel`` passes its view). Does nothing, returning 0, when this
    torch build cannot pack (:func:`packing_works`) or the weights exceed ``limit`` bytes (``None``: no limit; the
    packed copy doubles their memory). Returns the number of linears replaced."""
    if not packing_works() or (limit is not None and linear_bytes(module) > limit):
        return 0
    count = 0
    for parent in module.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and _packable(child):
                parent._modules[name] = PackedLinear(child)
                count += 1
    return count

"""Packed-weight linears for float32 models on CPU: each product runs the kernel this machine measured fastest for
its shape and row count (:mod:`specdec.linear_kernels`: plain ``F.linear``, MKL's packed GEMM or oneDNN's inner
product on a copy of the weight reordered once).

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

and on a 2-core AMD EPYC (session 11) oneDNN's kernel ran SmolLM2's LM head in 3.8 / 4.2 / 5.4 / 6.3 ms for
1 / 2 / 4 / 8 rows where ``F.linear`` took 8.1 / 19.6 / 19.2 / 18.2 ms (table in :mod:`specdec.linear_kernels`).
Results are the same dot products in another summation order (float32 rounding, like any change of GEMM kernel).

Applied by :class:`specdec.target.TargetModel` to its own *view* of the HF model (new module objects sharing the
parameters): the caller's model keeps its ``nn.Linear`` modules and HF ``generate`` is untouched. Costs up to one
extra copy of the linear weights in memory per kernel in use. A weight changed in place after packing (its
``_version`` moved) is repacked at the next call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from specdec.linear_kernels import available_kernels, kernel_for, pack, run, split_kernel

AUTO_LIMIT_BYTES = 4 << 30  # ``pack_linears(..., limit)``: bigger models are left alone unless asked (memory x2)


def packing_works() -> bool:
    """Whether this torch build has a packed kernel whose products match ``F.linear``
    (:func:`specdec.linear_kernels.available_kernels`)."""
    return len(available_kernels()) > 1


class PackedWeight:
    """``F.linear(x, weight, bias)`` (float32, CPU; inference only) by the kernel this machine runs fastest for the
    weight's shape and ``x``'s row count (:func:`specdec.linear_kernels.kernel_for`), on a copy of ``weight``
    reordered for that kernel at its first use and again whenever ``weight`` changes in place.

    A kernel chosen padded (``"onednn@4"``) copies the rows into a buffer of that many rows kept between calls (so a
    ``PackedWeight`` runs from one thread at a time, as a model in the engine does); the extra rows' outputs are
    dropped.

    Other inputs (another dtype or device, or needing a gradient) run ``F.linear`` on ``weight``. ``approximate``
    (drafters only) lets it run an approximate kernel (bfloat16, :mod:`specdec.linear_kernels`) where faster.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: bool = False) -> None:
        self.weight, self.bias, self.approximate = weight, bias, approximate
        self._packed: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}  # kernel -> (weight key, its copy)
        self._pad: torch.Tensor | None = None  # input rows padded to a kernel's faster row count (reused)

    def __deepcopy__(self, memo: dict) -> PackedWeight:  # a copy packs its own weight (packed tensors don't copy)
        return PackedWeight(copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo), self.approximate)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": {}, "_pad": None}

    def _pack(self, kernel: str) -> torch.Tensor | None:
        if kernel == "plain":
            return None
        key = (self.weight._version, self.weight.data_ptr())  # in-place updates and ``.data =`` both move it
        held = self._packed.get(kernel)
        if held is None or held[0] != key:
            held = self._packed[kernel] = (key, pack(kernel, self.weight))
        return held[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dtype != torch.float32 or weight.dtype != torch.float32
                or x.device.type != "cpu" or weight.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, self.bias)
        rows = x.reshape(-1, weight.shape[1])
        kernel, pad = split_kernel(kernel_for(weight.shape[0], weight.shape[1], rows.shape[0], self.approximate))
        if kernel == "plain" and not pad:
            return F.linear(x, weight, self.bias)
        n = rows.shape[0]
        if pad > n:  # run at the kernel's faster row count; rows are independent, the extra outputs are dropped
            if self._pad is None or self._pad.shape[0] != pad:
                self._pad = rows.new_zeros(pad, rows.shape[1])
            self._pad[:n].copy_(rows)
            rows = self._pad
        out = run(kernel, rows.contiguous(), self._pack(kernel), weight, self.bias)
        return out[:n].reshape(*x.shape[:-1], weight.shape[0])


class PackedLinear(torch.nn.Module):
    """Drop-in ``nn.Linear`` (same weight and bias Parameters, nothing copied but the packed form) running
    :class:`PackedWeight` (``approximate``: drafters only)."""

    def __init__(self, linear: torch.nn.Linear, approximate: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._run = PackedWeight(self.weight, self.bias, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run.weight is not self.weight or self._run.bias is not self.bias:  # parameters swapped (load, .to)
            self._run = PackedWeight(self.weight, self.bias, self._run.approximate)
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


def pack_linears(module: torch.nn.Module, limit: int | None = AUTO_LIMIT_BYTES, approximate: bool = False) -> int:
    """Replace, inside ``module``, every float32 CPU ``nn.Linear`` by a :class:`PackedLinear` sharing its weight
    (``approximate``: drafters' modules only, see :class:`PackedWeight`).

    Only for module trees the caller owns (``TargetModel`` passes its view). Does nothing, returning 0, when this
    torch build cannot pack (:func:`packing_works`) or the weights exceed ``limit`` bytes (``None``: no limit; the
    packed copy doubles their memory). Returns the number of linears replaced."""
    if not packing_works() or (limit is not None and linear_bytes(module) > limit):
        return 0
    count = 0
    for parent in module.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and _packable(child):
                parent._modules[name] = PackedLinear(child, approximate)
                kernel_for(child.out_features, child.in_features, 1, approximate)  # measured now, not mid-run
                count += 1
    return count

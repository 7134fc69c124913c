"""What a compiled verify step runs on: :class:`StepPlan`, the static-shape step metadata, and :class:`StepGraph`,
one bucket's step captured as a CUDA graph over static buffers (see :mod:`specdec.compiled_step`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    """The static-shape step metadata the compiled forward reads (the ``batch`` and ``plan`` of its
    :class:`ForwardContext`): ``slot_mapping [Tp]`` int64 (``-1`` = padding), ``block_table [Bp, MB]`` int32,
    ``context_lens [Bp]`` int32, ``cu_q [Bp + 1]`` int32, ``tree_mask [Tp * Tp]`` uint8, ``mask_indptr [Bp + 1]``
    int64, ``q_offsets [Bp]`` int32; ``max_q = Tp``."""

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    context_lens: torch.Tensor
    cu_q: torch.Tensor
    tree_mask: torch.Tensor
    mask_indptr: torch.Tensor
    q_offsets: torch.Tensor
    max_q: int


class StepGraph:
    """One bucket's step over static buffers: ``inputs`` (``input_ids``, ``positions`` and the :class:`StepPlan`
    tensors, in :meth:`CompiledVerifier.flat` order) and ``outputs`` (logits, hidden or ``None``), which every
    :meth:`replay` overwrites. On CUDA a captured ``torch.cuda.CUDAGraph`` (warm-up on a side stream first, as
    ``torch.cuda.graphs`` asks); elsewhere ``fn`` re-run, its results copied into the output buffers."""

    def __init__(self, fn, inputs: list[torch.Tensor], max_q: int, k: torch.Tensor, v: torch.Tensor, layers):
        self.inputs = [t.clone() for t in inputs]
        ids, pos, *fields = self.inputs
        plan = StepPlan(*fields, max_q=max_q)
        self._call = lambda: fn(ids, pos, plan, k, v, layers)
        self.graph = None
        if k.device.type == "cuda":
            side = torch.cuda.Stream(k.device)
            side.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(side):  # warm-up: compiles (first bucket use) and settles the allocator
                for _ in range(2):
                    self._call()
            torch.cuda.current_stream(k.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of the process (a server's HTTP side) may use CUDA meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self._call()
        else:
            self.outputs = tuple(None if o is None else o.clone() for o in self._call())

    def replay(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch._foreach_copy_(self.inputs, inputs)
        if self.graph is not None:
            self.graph.replay()
        else:
            for buf, out in zip(self.outputs, self._call(), strict=True):
                if buf is not None:
                    buf.copy_(out)
        return self.outputs

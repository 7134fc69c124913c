"""This machine's step cost by tree size, measured once per model and kept: the cost model a drafter can ask for
without a calibration run (``hybrid:steps=auto``).

What a draft node costs is a property of the machine, not of the drafter. On the 2-core AMD EPYC of sessions 11-13
a whole SmolLM2 step with a 3- to 6-node tree took 42-44 ms where a lone root took 45 ms and 2 nodes 48 ms (the
step is bound by reading the weights, and the packed kernels differ by row count), while on the Xeon of earlier
sessions 3 draft nodes cost 31-36 % more than plain decoding. A fixed per-node cost is wrong on one of them.

:func:`machine_cost_model` times whole engine steps with rejected trees
(:func:`specdec.research.cost_measure.measure_step`: ``SIZES`` x ``CONTEXTS``, minimum of ``REPEATS``; about 8 s
for SmolLM2 on 2 cores) and keeps the grid in ``<cache>/step-costs.json`` (the model cache's folder:
``$SPECDEC_CACHE``, ``$XDG_CACHE_HOME/specdec`` or ``~/.cache/specdec``) under a key naming torch, the processor,
the thread count, the device and the model's shape, so a later run on the same machine reads it back. An
unwritable cache is skipped (measured again next time); delete the file to measure again (say, after other jobs
slowed the first measurement). ``specdec calibrate`` makes a fuller model (more sizes,
contexts and drafter times) for ``steps=PATH``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from specdec.app.model_cache import cache_root, read_keyed, write_keyed
from specdec.linear_kernels import processor
from specdec.target import TargetModel

if TYPE_CHECKING:  # the cost model pulls in scipy: imported where a step cost is asked for
    from specdec.research.cost_model import CostModel

FILE_NAME = "step-costs.json"
SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
CONTEXTS = (64, 512)
REPEATS = 5
STEP_VERSION = " | rows padded"  # bumped when the engine's step cost changes: 1-2 row products run padded (session 14)
AUTO = "auto"  # a cost-model argument naming this measured, cached model (``--cost-model auto``, ``steps=auto``)


def model_key(target: TargetModel) -> str:
    """What the step cost depends on: torch, processor, threads, device, dtype and the model's shape."""
    cfg = target.model.config
    shape = "x".join(str(getattr(cfg, k, "?")) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                         "num_attention_heads", "num_key_value_heads", "vocab_size"))
    device = str(target.device)
    where = processor() if device == "cpu" else torch.cuda.get_device_name(target.device)
    return (f"torch {torch.__version__} | {where} | {torch.get_num_threads()} threads | {device} | "
            f"{cfg.model_type} {shape} {target.dtype} | packed {target.packed_linears}{STEP_VERSION}")


def contexts(target: TargetModel) -> tuple[int, ...]:
    """``CONTEXTS``, the longest lowered to what the model's context leaves beside the measurement's own tokens
    (:func:`~specdec.research.cost_measure.measure_step` sizes its request for every node accepted)."""
    limit = getattr(target.model.config, "max_position_embeddings", None)
    if not limit:
        return CONTEXTS
    room = limit - ((REPEATS + 1) * len(SIZES) + 1) * max(SIZES) - 1 - max(SIZES)
    return tuple(sorted({max(1, min(c, room)) for c in CONTEXTS}))


def machine_cost_model(target: TargetModel, measure: bool = True) -> CostModel | None:
    """The step-cost model of ``target`` on this machine: read from the cache, else measured now and kept (see
    the module docstring); ``measure=False`` only reads (``None`` if not cached)."""
    from specdec.research.cost_measure import measure_step
    from specdec.research.cost_model import CostModel, fit_verify

    key = model_key(target)
    saved = read_keyed(FILE_NAME).get(key)
    if saved and saved.get("grid"):
        grid, meta = [tuple(g) for g in saved["grid"]], saved.get("meta", {})
    elif not measure:
        return None
    else:
        print(f"specdec: timing verification steps by tree size, once on this machine (kept in "
              f"{cache_root() / FILE_NAME})", file=sys.stderr, flush=True)
        grid = measure_step(target, SIZES, contexts(target), REPEATS, statistic="min")
        meta = {"measured_at": time.time(), "timing": "step", "statistic": "min", "repeats": REPEATS}
        write_keyed(FILE_NAME, key, {"grid": [list(g) for g in grid], "meta": meta})
    return CostModel(fit_verify(grid), grid=grid, from_grid=True, meta={**meta, "key": key})


def load_cost_model(value: str, target: TargetModel) -> CostModel:
    """A cost model named on the command line: ``auto`` (this machine's step cost, :func:`machine_cost_model`:
    read from the cache, measured once if missing) or a cost-model JSON from ``specdec calibrate``."""
    if value == AUTO:
        return machine_cost_model(target)
    from specdec.research.cost_model import CostModel

    return CostModel.load(value)


def step_cost_option(value: str | None, target: TargetModel) -> Callable[[int, int], float] | None:
    """A drafter's ``steps`` option: ``auto`` (this machine's cached step cost), a cost-model JSON from ``specdec
    calibrate``, or ``None`` (no measured cost); the result is ``relative_step(nodes, context)``."""
    return None if value is None else load_cost_model(value, target).relative_step

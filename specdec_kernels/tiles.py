"""Launch shapes of the tree-attention kernel, all derived from static shapes (so a captured graph stays valid).

* :func:`tile_config`: the query tile grows with the tree (``max_q x group`` rows packed into M, 16..128 rows), so
  a big tree streams the committed prefix fewer times; ``num_warps`` follows the tile.
* :func:`choose_num_splits`: the split-KV factor (flash-decoding). When ``B x Hkv x q-blocks`` programs cannot fill
  the GPU's SMs, the committed prefix is cut into ``num_splits`` chunks handled by separate programs and merged by
  log-sum-exp. It reads only static quantities: batch size, head counts, the tree-size bound ``max_q``, a context
  bound (e.g. ``block_table.shape[1] * block_size``) and the SM count; never a context length held on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

MIN_TILE_ROWS = 16  # tl.dot needs M >= 16
MAX_TILE_ROWS = 128
MIN_CHUNK = 256  # fewest prefix keys worth a split (below this the merge costs more than it saves)
MAX_AUTO_SPLITS = 16


@dataclass(frozen=True)
class TileConfig:
    """``block_q`` tree nodes x ``group`` query heads in ``block_m`` rows; ``block_n`` keys per step."""

    block_q: int
    block_m: int
    block_n: int
    block_d: int
    num_warps: int


def tile_config(max_q: int, group: int, head_dim: int) -> TileConfig:
    """Tile for trees of up to ``max_q`` nodes with ``group = Hq // Hkv`` query heads per kv head.

    Rows = next power of two of ``max_q * group`` clamped to [16, 128] (at least ``group``): 1-node decode uses a
    16-row tile, a 64-node tree with GQA 4 two 128-row tiles. 8 warps for 128-row tiles, else 4.
    """
    need = max(1, max_q) * group
    block_m = max(MIN_TILE_ROWS, min(MAX_TILE_ROWS, triton.next_power_of_2(need)), triton.next_power_of_2(group))
    block_q = max(1, min(max(1, max_q), block_m // group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m >= 128 or block_d > 128 else 4
    return TileConfig(block_q, block_m, block_n, block_d, num_warps)


@functools.cache
def sm_count(device_index: int = 0) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: no query per call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, num_q_heads: int, max_q: int, max_context: int,
                      num_sms: int, head_dim: int = 128) -> int:
    """Split-KV factor from static shapes: 1 when the unsplit grid fills ``num_sms``, else a power of two.

    The grid has ``batch_size x num_kv_heads x q_blocks`` programs. With fewer than ``num_sms`` of them the factor
    is the power of two nearest below ``num_sms / programs``, capped so each split keeps at least
    ``MIN_CHUNK`` (256) of the ``max_context`` keys, and at ``MAX_AUTO_SPLITS`` (16).
    """
    for name, val in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("num_q_heads", num_q_heads),
                      ("num_sms", num_sms)):
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if max_q < 0 or max_context < 0:
        raise ValueError(f"max_q and max_context must be >= 0, got {max_q} and {max_context}")
    cfg = tile_config(max_q, num_q_heads // num_kv_heads, head_dim)
    programs = batch_size * num_kv_heads * triton.cdiv(max(1, max_q), cfg.block_q)
    if programs >= num_sms:
        return 1
    want = min(num_sms // programs, max_context // MIN_CHUNK, MAX_AUTO_SPLITS)
    if want < 2:
        return 1
    return 1 << (want.bit_length() - 1)

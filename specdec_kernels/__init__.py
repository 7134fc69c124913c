"""Triton kernels for paged tree verification, each with a pure PyTorch reference.

On a machine without a GPU the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before this package is first imported (Triton picks the interpreter when the kernels are decorated).
"""

from .commit import commit_kv, commit_kv_reference
from .split_kv import merge_splits
from .tiles import choose_num_splits, tile_config
from .tree_attention import paged_tree_attention
from .tree_attention_reference import merge_splits_reference, paged_tree_attention_reference
from .write_kv import write_kv, write_kv_reference

__all__ = [
    "choose_num_splits",
    "commit_kv",
    "commit_kv_reference",
    "merge_splits",
    "merge_splits_reference",
    "paged_tree_attention",
    "paged_tree_attention_reference",
    "tile_config",
    "write_kv",
    "write_kv_reference",
]

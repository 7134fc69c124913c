"""Triton kernels for paged tree verification, each with a pure PyTorch reference.

On a machine without a GPU the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before this package is first imported (Triton picks the interpreter when the kernels are decorated).
"""

from .commit import commit_kv, commit_kv_reference
from .tree_attention import paged_tree_attention, paged_tree_attention_reference

__all__ = [
    "commit_kv",
    "commit_kv_reference",
    "paged_tree_attention",
    "paged_tree_attention_reference",
]

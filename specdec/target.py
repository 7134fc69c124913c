"""The target model: any Hugging Face causal LM, verifying token trees over the paged KV cache.

The HF model is used unmodified: the target runs a *view* of it (new module objects sharing every parameter and
buffer, with their own copy of the config) whose attention implementation is set once to ``specdec_paged`` (see
:mod:`specdec.attention`). Nothing is flipped per call, so the caller's model keeps working with ``model.generate``
(from any thread) and compiled code sees one fixed attention function.
Positions are passed as ``position_ids`` (RoPE = committed length + depth); K/V go
into the paged cache at committed length + node index.

Tested architectures: Llama (SmolLM2-135M-Instruct, tiny random ``LlamaConfig`` models). Any model whose attention
modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and carry ``layer_idx`` should work.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.attention import (
    ATTENTION_NAME,
    AttentionBackend,
    ForwardContext,
    TreeBatch,
    build_tree_batch,
    select_backend,
)
from specdec.compiled_step import CompiledVerifier
from specdec.kv_cache import PagedKVCache
from specdec.packed_linear import AUTO_LIMIT_BYTES as AUTO_PACK_LIMIT
from specdec.packed_linear import pack_linears
from specdec.split_gemv import SplitGemvMode
from specdec.tree import TokenTree


@dataclass(frozen=True)
class TargetOutput:
    """Result of one verification forward.

    Attributes:
        logits: ``[T, V]`` float, next-token logits of every tree node (or of the kept rows, see ``forward``).
        batch: the :class:`TreeBatch` that was verified.
        hidden: ``[T, H]`` the model's last hidden state (after the final norm: what the LM head reads) for every
            token, when asked for; ``None`` otherwise. Same forward pass, no extra compute.
    """

    logits: torch.Tensor
    batch: TreeBatch
    hidden: torch.Tensor | None = None


def attention_view(model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    """``model`` as new module objects sharing all parameters and buffers, whose config (a deep copy, sub-configs
    included) uses ``attn_implementation``. The original model and its config are left untouched."""
    memo: dict[int, object] = {}
    config = copy.deepcopy(model.config, memo)
    for cfg in (config, *(c for c in memo.values() if type(c).__name__.endswith("Config"))):
        if hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = attn_implementation

    def clone(module: torch.nn.Module) -> torch.nn.Module:
        new = copy.copy(module)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        for name, value in module.__dict__.items():  # own hook dicts: hooks installed on the view stay there
            if "hooks" in name and isinstance(value, dict):
                new.__dict__[name] = type(value)(value)
        new._modules = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        own = module.__dict__.get("config")
        if own is not None and id(own) in memo:
            new.__dict__["config"] = memo[id(own)]
        return new

    return clone(model)


class TargetModel:
    """Wraps an HF causal LM for tree verification.

    Args:
        model: a causal LM (``PreTrainedModel``); put in eval mode by the caller.
        backend: attention backend (default: :func:`specdec.attention.select_backend` for the model's device).
        split_gemv: run small-batch linears through :class:`specdec.split_gemv.SplitGemvMode` (default: off. With
            torch 2.13 on this project's 2-core CPU it made a SmolLM2 decode step slower, 59.6 ms against 47.5 ms
            without; it paid with older builds, whose GEMV used one thread).
        compile: run every step that fits a bucket through :class:`specdec.compiled_step.CompiledVerifier`
            (``torch.compile``, one graph per padded shape; CUDA graphs on CUDA). The others run eagerly. A string
            names the ``torch.compile`` backend (``"aot_eager"`` in fast tests); ``True`` is inductor.
        buckets: ``(token_buckets, batch_buckets)`` for ``compile`` (default: see
            :class:`specdec.compiled_step.CompiledVerifier`).
        graphs: how ``compile`` captures CUDA graphs: ``"manual"`` (default on CUDA), ``"trees"`` or ``"none"``
            (see :mod:`specdec.compiled_step`).
        packed: run the view's float32 CPU linears by the kernel this machine measured fastest per shape and row
            count, on weights reordered once (:mod:`specdec.packed_linear`, :mod:`specdec.linear_kernels`: on a
            2-core AMD EPYC a SmolLM2 step of 1 / 2 / 4 / 16 nodes took 53 / 54 / 62 / 82 ms against 72 / 89 / 96 /
            122 ms with ``F.linear``; up to one extra copy of the linear weights per kernel in use). ``None``
            (default): on for float32 CPU models with up to 4 GiB of linear weights when neither ``compile`` nor
            ``split_gemv`` is asked; ``True``: whatever their size; ``False``: off.
    """

    def __init__(
        self, model: PreTrainedModel, backend: AttentionBackend | None = None, split_gemv: bool | None = None,
        compile: bool | str = False, buckets: tuple[Sequence[int], Sequence[int]] | None = None,
        graphs: str | None = None, packed: bool | None = None,
    ) -> None:
        self.model = model  # the caller's model, untouched (HF ``generate`` keeps working on it)
        self.verifier = attention_view(model, ATTENTION_NAME)  # the same weights, specdec attention set once
        cfg = model.config.get_text_config()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.backend = backend or select_backend(device=self.device)
        layers = getattr(model.get_decoder(), "layers", None)  # a truncated view may run fewer than the config's
        self.num_layers: int = len(layers) if isinstance(layers, torch.nn.ModuleList) else cfg.num_hidden_layers
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size: int = cfg.vocab_size
        self.max_positions: int = getattr(cfg, "max_position_embeddings", None) or 2**31
        self.split_gemv = bool(split_gemv)
        wanted = packed if packed is not None else not (compile or self.split_gemv)
        self.packed_linears = pack_linears(self.verifier, None if packed else AUTO_PACK_LIMIT) if wanted else 0
        if packed and not self.packed_linears:
            mkl = torch.backends.mkl.is_available()
            raise ValueError(f"packed linears need a float32 model on the CPU and a torch build with MKL or oneDNN; "
                             f"this model is {self.dtype} on {self.device.type} (mkl available: {mkl})")
        backend = compile if isinstance(compile, str) else "inductor"
        self.compiled = (CompiledVerifier(self.verifier, *(buckets or ()), graphs=graphs, backend=backend)
                         if compile else None)

    def warmup(self, cache: PagedKVCache, max_batch: int, max_tokens: int, return_hidden: bool = False,
               hidden_layers: Sequence[int] | None = None, log=None) -> list[tuple[int, int]]:
        """Compile (and capture) now every step bucket :meth:`run` with these outputs can use for steps of at most
        ``max_batch`` sequences and ``max_tokens`` tokens (:meth:`CompiledVerifier.warmup`); ``[]`` when not
        compiling."""
        if self.compiled is None:
            return []
        return self.compiled.warmup(cache, max_batch, max_tokens, (_output_layers(return_hidden, hidden_layers),),
                                    log)

    def new_cache(self, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None) -> PagedKVCache:
        """A paged cache shaped for this model, using this backend's commit."""
        return PagedKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, num_blocks, block_size,
            dtype=dtype or self.dtype, device=self.device, move_kv=self.backend.move_kv,
        )

    @torch.inference_mode()
    def forward(
        self,
        cache: PagedKVCache,
        seq_ids: Sequence[int],
        trees: Sequence[TokenTree],
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> TargetOutput:
        """Verify ``trees[b]`` on top of sequence ``seq_ids[b]``; blocks must already be reserved.

        Writes every node's K/V into ``cache`` (at committed length + node index); commits nothing.
        ``last_only`` keeps only the logits of each tree's last node (prefill of a chain): ``logits [B, V]``.
        ``return_hidden`` also returns the last hidden state of every token (``hidden [T, H]``).
        """
        batch = build_tree_batch(cache, seq_ids, trees)
        keep = (batch.cu_q[1:].long() - 1) if last_only else None
        return self.run(cache, batch, keep, return_hidden)

    @torch.inference_mode()
    def run(self, cache: PagedKVCache, batch: TreeBatch, keep: torch.Tensor | None = None,
            return_hidden: bool = False, hidden_layers: Sequence[int] | None = None) -> TargetOutput:
        """One forward over a prepared :class:`TreeBatch`; ``keep [K]`` int64 selects the rows whose logits are
        computed (``None``: all ``T``). ``cache`` is anything with ``write(layer, slots, k, v)`` and
        ``layer_kv(layer) -> (k, v)`` (a :class:`PagedKVCache`, or a server's own cache, see
        :mod:`specdec.verify`). Writes every node's K/V; commits nothing. ``hidden_layers`` (with
        ``return_hidden``): indices into HF ``hidden_states`` whose rows are concatenated instead of the last
        hidden state (``[T, len * H]``; EAGLE-3 fuses low, middle and high layers), from the same forward."""
        if self.compiled is not None and self.compiled.fits(cache, batch):
            logits, hidden = self.compiled.run(cache, batch, keep, _output_layers(return_hidden, hidden_layers))
            return TargetOutput(logits, batch, hidden)
        if self.compiled is not None:
            self.compiled.eager_steps += 1
        ctx = ForwardContext(cache, batch, self.backend, self.backend.plan(batch, cache.block_size))
        linear_mode = SplitGemvMode() if self.split_gemv else contextlib.nullcontext()
        with linear_mode:
            out = self.verifier(
                input_ids=batch.input_ids.unsqueeze(0),
                position_ids=batch.positions.unsqueeze(0),
                use_cache=False,
                logits_to_keep=0 if keep is None else keep,
                output_hidden_states=return_hidden,
                specdec=ctx,
            )
        hidden = None
        if return_hidden:
            layers = [-1] if hidden_layers is None else list(hidden_layers)
            hidden = torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)
        return TargetOutput(out.logits[0], batch, hidden)


def _output_layers(return_hidden: bool, hidden_layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """The hidden-state layers a compiled step returns (``None``: logits only; the last layer by default)."""
    return tuple(hidden_layers or (-1,)) if return_hidden else None


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer (the set HF ``generate`` stops on)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

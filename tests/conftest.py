"""Shared fixtures: tiny random-weight Llama models built in code, and the embedded SmolLM2 (loaded once)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (transformers imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from specdec.target import TargetModel  # noqa: E402


def tiny_llama(vocab: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """A random-weight Llama small enough for exhaustive CPU tests (GQA 4/2, head_dim 8)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture()
def tiny_target(tiny_model) -> TargetModel:
    return TargetModel(tiny_model)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32, loaded once per session."""
    from specdec.target import load_model_and_tokenizer

    return load_model_and_tokenizer(None, torch.float32)

"""The verifier API driven by a minimal scheduler written here, with its own cache tensors and layouts."""

import pytest
import torch

from specdec.drafters import NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.verify import ServerCache, Verifier, apply_kv_moves
from tests.conftest import inputs

BLOCK, BLOCKS_PER_SEQ = 4, 24


def _layers(target, layout: str, num_blocks: int):
    """Per-layer (k, v) views of a server's cache: vLLM ``[2, NB, BS, H, D]`` or FlashInfer ``[NB, 2, BS, H, D]``."""
    shape = (num_blocks, BLOCK, target.num_kv_heads, target.head_dim)
    out = []
    for _ in range(target.num_layers):
        if layout == "vllm":
            kv = torch.zeros(2, *shape, dtype=target.dtype)
            out.append((kv[0], kv[1]))
        else:
            kv = torch.zeros(shape[0], 2, *shape[1:], dtype=target.dtype)
            out.append((kv[:, 0], kv[:, 1]))
    return out


@pytest.mark.parametrize("layout", ["vllm", "flashinfer"])
def test_an_external_scheduler_gets_greedy_outputs_identical_to_the_engine(tiny_target, layout):
    prompts = [[3, 4, 5, 6, 3, 4, 5], [9, 8, 7], [1, 2, 1, 2, 1, 2, 1, 2]]
    engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(128, BLOCK), NgramDrafter())
    expected = [engine.generate(p, 16).tokens for p in prompts]

    b = len(prompts)
    layers = _layers(tiny_target, layout, b * BLOCKS_PER_SEQ)
    cache = ServerCache(layers, BLOCK)
    tables = torch.arange(b * BLOCKS_PER_SEQ, dtype=torch.int32).view(b, BLOCKS_PER_SEQ)  # the server's own blocks
    verifier, drafter = Verifier(tiny_target), NgramDrafter(min_ngram=1)
    ctx = torch.zeros(b, dtype=torch.long)
    flat = torch.tensor([t for p in prompts for t in p])
    cu = torch.tensor([0, *torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()])
    first = verifier.prefill(cache, tables, ctx, flat, cu).argmax(-1)
    ctx += torch.tensor([len(p) for p in prompts])
    histories = [torch.tensor(p + [int(t)]) for p, t in zip(prompts, first, strict=True)]
    outputs = [[int(t)] for t in first]
    accepted_any = False
    while min(len(o) for o in outputs) < 16:
        drafts = drafter.propose(inputs(range(b), histories))
        tokens = torch.cat([d.tree.tokens for d in drafts])
        parents = torch.cat([d.tree.parents for d in drafts])
        cu_q = torch.tensor([0, *torch.tensor([d.tree.num_nodes for d in drafts]).cumsum(0).tolist()])
        out = verifier.verify(cache, tables, ctx, tokens, parents, cu_q)
        apply_kv_moves(layers, out.moves)
        ctx += out.accept_len + 1
        accepted_any |= bool((out.accept_len > 0).any())
        for i in range(b):
            new = out.tokens[i, : int(out.accept_len[i]) + 1].tolist()
            assert out.path[i, 0] == 0 and (out.path[i, int(out.accept_len[i]) + 1 :] == -1).all()
            outputs[i] += new
            histories[i] = torch.cat([histories[i], torch.tensor(new)])
            drafter.accept(i, torch.tensor(new))
    assert [o[:16] for o in outputs] == expected
    assert accepted_any


def test_server_cache_refuses_layouts_the_kernels_cannot_read(tiny_target):
    k = torch.zeros(8, BLOCK, tiny_target.num_kv_heads, tiny_target.head_dim)
    with pytest.raises(ValueError, match="equal strides and a unit last stride"):
        ServerCache([(k, k.transpose(0, 1).contiguous().transpose(0, 1))], BLOCK)
    with pytest.raises(ValueError, match="block size 4 differs from block_size=16"):
        ServerCache([(k, k.clone())], 16)

"""Public checkpoint formats: EAGLE-1/2, EAGLE-3 and Medusa heads written by the test in the published layouts load
onto specdec's drafters, propose what the same weights propose natively / in a dense re-implementation of the
published architecture, and mismatched checkpoints fail with errors naming both sizes."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.drafters.eagle3 import Eagle3Drafter, fused_features, fused_layers
from specdec.drafters.formats import detect_format, load_drafter, load_eagle_head, resolve_folder
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.target import TargetModel

from .conftest import inputs, tiny_llama

H, V, HEADS, KV = 32, 64, 4, 2
THETA = 10000.0  # RoPE base of the synthetic heads (published heads copy their target's)
OPTIONS = {"depth": 3, "budget": 8, "topk": 2, "num_blocks": 32, "block_size": 4}


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=3))


@pytest.fixture(scope="module")
def deep_target() -> TargetModel:
    """Seven layers: the fewest for which EAGLE-3's low / middle / high layers (2, 3, 4) are distinct."""
    return TargetModel(tiny_llama(layers=7, seed=4))


def _hidden_states(target, tokens):
    with torch.inference_mode():
        return target.model(tokens[None], output_hidden_states=True).hidden_states


def _random(shape, gen, scale=0.3):
    return scale * torch.randn(shape, generator=gen, dtype=torch.float64)


def _llama_config(**extra):
    """A config.json as the EAGLE repository ships it (a Llama config with one layer), tiny."""
    return {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": H, "intermediate_size": 64,
            "max_position_embeddings": 1024, "model_type": "llama", "num_attention_heads": HEADS,
            "num_hidden_layers": 1, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_scaling": None,
            "rope_theta": THETA, "torch_dtype": "float16", "transformers_version": "4.28.1", "vocab_size": V,
            **extra}


def _layer_weights(prefix, gen, q_in=H):
    w = {f"{prefix}self_attn.{p}_proj.weight": _random((n * 8, q_in), gen)
         for p, n in (("q", HEADS), ("k", KV), ("v", KV))}
    w[f"{prefix}self_attn.o_proj.weight"] = _random((H, HEADS * 8), gen)
    w |= {f"{prefix}mlp.gate_proj.weight": _random((64, H), gen), f"{prefix}mlp.up_proj.weight": _random((64, H), gen),
          f"{prefix}mlp.down_proj.weight": _random((H, 64), gen)}
    w[f"{prefix}post_attention_layernorm.weight"] = 1 + _random((H,), gen, 0.1)
    return w


def _write(folder, config, state, file):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(folder / file)) if file.endswith(".safetensors") else torch.save(state, folder / file)
    return folder


def _eagle1_state(target, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    state = {"fc.weight": _random((H, 2 * H), gen), **_layer_weights("layers.0.", gen),
             "embed_tokens.weight": target.model.get_input_embeddings().weight.detach().clone()}
    if bias:
        state["fc.bias"] = _random((H,), gen)
    return state


# ------------------------------------------------------------------ dense re-implementation of the published heads
def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta=THETA):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    ang = torch.cat([pos.float()[:, None] * inv[None]] * 2, dim=-1)
    cos, sin = ang.cos().double()[:, None], ang.sin().double()[:, None]
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * sin


def _attention(x, w, prefix):
    """Causal GQA attention with RoPE at positions ``0..T-1``, ``x [T, in]`` -> ``[T, H]``."""
    t = x.shape[0]
    pos = torch.arange(t)
    q = _rope((x @ w[prefix + "q_proj.weight"].T).view(t, HEADS, 8), pos)
    k = _rope((x @ w[prefix + "k_proj.weight"].T).view(t, KV, 8), pos).repeat_interleave(HEADS // KV, dim=1)
    v = (x @ w[prefix + "v_proj.weight"].T).view(t, KV, 8).repeat_interleave(HEADS // KV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, HEADS * 8)
    return out @ w[prefix + "o_proj.weight"].T


def _mlp(x, w, prefix):
    gate = torch.nn.functional.silu(x @ w[prefix + "gate_proj.weight"].T)
    return (gate * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T


def _reference_chain(step, feats, tokens, depth):
    """Greedy chain drafting by full recomputation: ``step(feats [T, H], tokens [T]) -> (out [T, H], logits [V])``
    of the last pair; each drafted token is paired with its parent's output."""
    drafted = []
    for _ in range(depth):
        out, logits = step(torch.stack(feats), torch.tensor(tokens))
        drafted.append(int(logits.argmax()))
        feats, tokens = feats + [out[-1]], tokens + [drafted[-1]]
    return drafted


def test_eagle1_head_reproduces_the_published_architecture_step_by_step(target, tmp_path):
    state = _eagle1_state(target)
    folder = _write(tmp_path / "eagle", _llama_config(bias=True), state, "pytorch_model.bin")
    drafter = load_drafter(folder, target, tree="chain", **OPTIONS)
    assert isinstance(drafter, EagleDrafter) and detect_format(folder) == "eagle"
    history = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(1))
    h = _hidden_states(target, history)[-1][0]
    drafter.accept(0, history[-1:], h[:-1])
    [draft] = drafter.propose(inputs([0], [history]))
    embed, lm_head = state["embed_tokens.weight"], target.model.get_output_embeddings().weight.detach()

    def step(feats, tokens):  # cnets1: fc(cat(emb, h)), layer 0 without input norm, target LM head
        x = torch.cat([embed[tokens], feats], dim=-1) @ state["fc.weight"].T + state["fc.bias"]
        x = x + _attention(x, state, "layers.0.self_attn.")
        x = x + _mlp(_rms(x, state["layers.0.post_attention_layernorm.weight"]), state, "layers.0.mlp.")
        return x, x[-1] @ lm_head.T

    expected = _reference_chain(step, list(h[:-1]), history[1:].tolist(), OPTIONS["depth"])
    assert draft.tree.tokens[1:].tolist() == expected


@pytest.mark.parametrize(("file", "bias"), [("pytorch_model.bin", True), ("model.safetensors", False)])
def test_eagle1_checkpoint_proposes_what_the_same_weights_propose_natively(target, tmp_path, file, bias):
    state = _eagle1_state(target, seed=2, bias=bias)
    theta = target.model.config.rope_parameters["rope_theta"]  # the native head uses the target's RoPE
    folder = _write(tmp_path / "eagle", _llama_config(bias=bias, rope_theta=theta), state, file)
    loaded = load_drafter(folder, target, tree="dynamic", **OPTIONS)
    native_head = EagleHead(EagleConfig.from_target(target), target)
    native_head.layer.input_layernorm = torch.nn.Identity()  # EAGLE-1's layer 0 has none
    with torch.no_grad():
        native_head.fc.weight.copy_(state["fc.weight"])
        native_head.fc.bias.copy_(state.get("fc.bias", torch.zeros(H)))
        for key, value in state.items():
            if key.startswith("layers.0."):
                native_head.layer.get_parameter(key.removeprefix("layers.0.")).copy_(value)
    native = EagleDrafter(native_head, tree="dynamic", **OPTIONS)
    history = torch.randint(0, V, (11,), generator=torch.Generator().manual_seed(3))
    h = _hidden_states(target, history)[-1][0]
    for d in (loaded, native):
        d.accept(0, history[-1:], h[:-1])
    [a], [b] = loaded.propose(inputs([0], [history])), native.propose(inputs([0], [history]))
    assert a.tree.num_nodes == OPTIONS["budget"]
    assert a.tree.tokens.tolist() == b.tree.tokens.tolist() and a.tree.parents.tolist() == b.tree.parents.tolist()


def _eagle3_checkpoint(tmp_path, deep_target, draft_ids, t2d=None):
    gen = torch.Generator().manual_seed(5)
    state = {"fc.weight": _random((H, 3 * H), gen), **_layer_weights("midlayer.", gen, q_in=2 * H),
             "midlayer.hidden_norm.weight": 1 + _random((H,), gen, 0.1),
             "midlayer.input_layernorm.weight": 1 + _random((H,), gen, 0.1),
             "norm.weight": 1 + _random((H,), gen, 0.1), "lm_head.weight": _random((draft_ids.numel(), H), gen, 1.0),
             "d2t": draft_ids - torch.arange(draft_ids.numel())}
    mask = torch.zeros(V, dtype=torch.bool)
    mask[draft_ids] = True
    state["t2d"] = mask if t2d is None else t2d
    config = _llama_config(draft_vocab_size=draft_ids.numel())
    return _write(tmp_path / "eagle3", config, state, "model.safetensors"), state


def test_eagle3_head_with_its_vocabulary_maps_reproduces_the_published_architecture(deep_target, tmp_path):
    draft_ids = torch.randperm(V, generator=torch.Generator().manual_seed(6))[:24].sort().values
    folder, state = _eagle3_checkpoint(tmp_path, deep_target, draft_ids)
    drafter = load_drafter(folder, deep_target, tree="chain", **OPTIONS)
    assert isinstance(drafter, Eagle3Drafter) and detect_format(folder) == "eagle3"
    history = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(7))
    hs = _hidden_states(deep_target, history)
    fused = fused_features(hs)[0]
    assert fused_layers(7) == (2, 3, 4) and torch.equal(fused[:, H : 2 * H], hs[3][0])
    drafter.accept(0, history[-1:], fused[:-1])
    [draft] = drafter.propose(inputs([0], [history]))
    embed = deep_target.model.get_input_embeddings().weight.detach()

    def step(feats, tokens):  # cnets: midlayer(cat(input_layernorm(emb), hidden_norm(h))), lm_head(norm(.)), d2t
        x = feats
        both = torch.cat([_rms(embed[tokens], state["midlayer.input_layernorm.weight"]),
                          _rms(x, state["midlayer.hidden_norm.weight"])], dim=-1)
        x = x + _attention(both, state, "midlayer.self_attn.")
        x = x + _mlp(_rms(x, state["midlayer.post_attention_layernorm.weight"]), state, "midlayer.mlp.")
        logits = torch.full((V,), float("-inf"), dtype=x.dtype)
        logits[draft_ids] = _rms(x[-1], state["norm.weight"]) @ state["lm_head.weight"].T
        return x, logits

    feats = list(fused[:-1] @ state["fc.weight"].T)
    expected = _reference_chain(step, feats, history[1:].tolist(), OPTIONS["depth"])
    assert draft.tree.tokens[1:].tolist() == expected and set(expected) <= set(draft_ids.tolist())
    with pytest.raises(ValueError, match=r"fused low/mid/high target features \[S, 96\].*got \[9, 32\]"):
        drafter.accept(1, history[-1:], hs[-1][0][:-1])  # what the engine passes today: the last hidden state


@pytest.mark.parametrize("file", ["medusa_lm_head.pt", "medusa_lm_head.safetensors"])
def test_medusa_checkpoint_proposes_what_the_same_weights_propose_natively(target, tmp_path, file):
    lm_head = target.model.get_output_embeddings()
    native = MedusaHeads(MedusaConfig(H, V, 3, 1), lm_head)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in native.parameters():
            p.add_(_random(p.shape, gen))
    published = {k.removeprefix("heads."): v.detach().clone() for k, v in native.state_dict().items()}
    assert sorted(published)[:3] == ["0.0.linear.bias", "0.0.linear.weight", "0.1.weight"]
    config = {"medusa_num_heads": 3, "medusa_num_layers": 1, "base_model_name_or_path": "tiny-llama"}
    folder = _write(tmp_path / "medusa", config, published, file)
    loaded = load_drafter(folder, target, budget=10, topk=3)
    assert isinstance(loaded, MedusaDrafter) and detect_format(folder) == "medusa"
    hidden = _hidden_states(target, torch.arange(10))[-1][0]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.heads(hidden), native(hidden), rtol=0, atol=0)
    ours = MedusaDrafter(native, budget=10, topk=3)
    for d in (loaded, ours):
        d.accept(0, torch.tensor([9]), hidden)
    [a], [b] = loaded.propose(inputs([0], [torch.arange(10)])), ours.propose(inputs([0], [torch.arange(10)]))
    assert a.tree.tokens.tolist() == b.tree.tokens.tolist() and a.tree.num_nodes == 10


def _medusa_state(vocab=V, hidden=H):
    return {"0.0.linear.weight": torch.zeros(hidden, hidden), "0.0.linear.bias": torch.zeros(hidden),
            "0.1.weight": torch.zeros(vocab, hidden)}


MEDUSA = {"medusa_num_heads": 1, "medusa_num_layers": 1}
MISMATCHES = [
    ("eagle hidden size", "eagle", _llama_config(hidden_size=48), None, "hidden size is 48, the target's is 32"),
    ("eagle vocabulary", "eagle", _llama_config(vocab_size=100), None, "vocabulary is 100, the target's is 64"),
    ("medusa vocab", "medusa", MEDUSA, _medusa_state(vocab=100), r"vocabulary \(head 0\) is 100, the target's is 64"),
    ("medusa hidden", "medusa", MEDUSA, _medusa_state(hidden=48), r"hidden size \(head 0\) is 48, the target's is 32"),
    ("medusa layers", "medusa", {**MEDUSA, "medusa_num_layers": 2}, _medusa_state(), r"missing weight '0\.2\.weight'"),
    ("eagle3 2 layers", "eagle3", _llama_config(draft_vocab_size=V), None, "L >= 7; the target has 2 layers"),
]


@pytest.mark.parametrize(("case", "fmt", "config", "state", "message"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_checkpoints_name_both_sizes(target, tmp_path, case, fmt, config, state, message):
    if state is None:
        state = _eagle1_state(target) if fmt == "eagle" else {"fc.weight": torch.zeros(H, 3 * H)}
    file = "medusa_lm_head.safetensors" if fmt == "medusa" else "model.safetensors"
    folder = _write(tmp_path / fmt, config, state, file)
    with pytest.raises(ValueError, match=message):
        load_drafter(folder, target, fmt)


def test_bad_folders_and_vocabulary_maps_give_clear_errors(target, deep_target, tmp_path):
    with pytest.raises(ValueError, match="holds no EAGLE"):
        load_drafter(_write(tmp_path / "empty", _llama_config(), {}, "other.safetensors"), target)
    EagleDrafter.untrained(target).head.save_pretrained(tmp_path / "native")
    with pytest.raises(ValueError, match="is a specdec eagle checkpoint, not a published one: use eagle:path="):
        load_drafter(tmp_path / "native", target)
    with pytest.raises(ValueError, match="is an EAGLE-3 head"):
        load_eagle_head(_write(tmp_path / "e3", _llama_config(), {"midlayer.x": torch.zeros(1)}, "model.safetensors"),
                        target)
    bad_t2d = torch.zeros(V, dtype=torch.bool)
    folder, _ = _eagle3_checkpoint(tmp_path, deep_target, torch.arange(0, 48, 2), t2d=bad_t2d)
    with pytest.raises(ValueError, match="t2d .* does not mark exactly the 24 tokens"):
        load_drafter(folder, deep_target)
    with pytest.raises(ValueError, match="neither a local folder nor in the local Hugging Face cache"):
        resolve_folder("specdec-tests/not-downloaded", cache_dir=tmp_path / "hf")


def test_a_hugging_face_id_resolves_to_its_snapshot_in_the_local_cache(target, tmp_path):
    snapshot = tmp_path / "hf" / "models--org--eagle-tiny" / "snapshots" / ("a" * 40)
    _write(snapshot, _llama_config(), _eagle1_state(target), "model.safetensors")
    (tmp_path / "hf" / "models--org--eagle-tiny" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--eagle-tiny" / "refs" / "main").write_text("a" * 40)
    assert resolve_folder("org/eagle-tiny", cache_dir=tmp_path / "hf") == snapshot


def test_the_published_drafter_is_registered_with_its_options(target, deep_target, tmp_path):
    from specdec.drafters.registry import DrafterSpec, build_drafter

    eagle = _write(tmp_path / "eagle", _llama_config(), _eagle1_state(target), "model.safetensors")
    drafter = build_drafter(DrafterSpec.parse(f"published:path={eagle},tree=dynamic,budget=6"), target)
    assert isinstance(drafter, EagleDrafter) and (drafter.tree, drafter.budget) == ("dynamic", 6)
    medusa = _write(tmp_path / "medusa", MEDUSA, _medusa_state(), "medusa_lm_head.safetensors")
    drafter = build_drafter(DrafterSpec.parse(f"published:path={medusa},tree=chain,depth=1"), target)
    assert isinstance(drafter, MedusaDrafter) and drafter.choices == [(0,)]
    folder, _ = _eagle3_checkpoint(tmp_path, deep_target, torch.arange(V))
    drafter = build_drafter(DrafterSpec.parse(f"published:path={folder},tree=dynamic,budget=6"), deep_target)
    assert isinstance(drafter, Eagle3Drafter) and drafter.feature_layers == fused_layers(deep_target.num_layers)
    with pytest.raises(ValueError, match="needs a checkpoint: published:path="):
        build_drafter(DrafterSpec.parse("published"), target)


def test_a_published_eagle3_head_runs_in_the_engine_on_fused_features(deep_target, tmp_path):
    """The engine hands EAGLE-3 the concatenated low/mid/high layers of the verification pass; greedy output
    equals autoregressive decoding, for a chain and a dynamic tree."""
    from specdec.drafters.formats import load_drafter
    from specdec.engine import SpeculativeEngine

    folder, _ = _eagle3_checkpoint(tmp_path, deep_target, torch.arange(0, V, 2))
    prompt = torch.arange(3, 12)
    cache = deep_target.new_cache(64, 4)
    ar = SpeculativeEngine(deep_target, cache).generate(prompt, 12)
    for shape in ({"tree": "chain", "depth": 3}, {"tree": "dynamic", "budget": 6, "topk": 2}):
        drafter = load_drafter(folder, deep_target, **shape, num_blocks=32, block_size=4)
        spec = SpeculativeEngine(deep_target, cache, drafter, max_tree_nodes=8).generate(prompt, 12)
        assert spec.tokens == ar.tokens and spec.stats.steps > 0
        assert cache.allocator.num_free == 64 and drafter.cache.allocator.num_free == 32

"""Self-written instructions (pre-query sampling): filtering, resume without duplicates; the store built from them."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import decoders

from specdec.train import data as D
from specdec.train import selfprompts as S
from specdec.train.build_store import build_store

from .conftest import tiny_llama
from .test_train_data import char_tokenizer, config


@pytest.fixture(scope="module")
def tok_model():
    """The data tests' character tokenizer, decoding without separators (so words can be counted)."""
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tiny_llama(vocab=len(tokenizer), dtype=torch.float64), tokenizer


def test_the_pre_query_is_the_template_up_to_the_user_text(tok_model):
    _, tokenizer = tok_model
    assert tokenizer.decode(S.pre_query_ids(tokenizer)) == "<|im_start|>user\n"


def test_instructions_are_filtered_deduplicated_and_resume_without_duplicates(tok_model, tmp_path, monkeypatch):
    """Unfinished, too short and repeated instructions are dropped; an interrupted run resumes at the chunk it was
    writing, answers every instruction once, and the store reads the answers."""
    model, tokenizer = tok_model
    eos = tokenizer.eos_token_id

    def enc(text, end=True):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if end else [])

    calls = []
    script = iter([
        [enc("Tell me about the sea please."), enc("Hi there"), enc("Tell me  about the sea please."),
         enc("Write a poem about cats now.", end=False)],  # kept, too short, duplicate, unfinished
        [enc("Name three colours for me."), enc("Explain rain to a child.")],
        [enc("INTERRUPT")],
        [enc("Tell me about the sea please."), enc("How do birds fly so far?")],  # a duplicate of chunk 0
        [enc("Explain rain to a child."), enc("Never asked for.")],
    ])

    def sample(m, t, ids, cfg):
        assert cfg.temperature == 1.0 and all(list(i) == S.pre_query_ids(tokenizer) for i in ids)
        out = next(script)
        if out == [enc("INTERRUPT")]:
            raise RuntimeError("interrupted")
        calls.append(len(ids))
        return out

    monkeypatch.setattr(S, "generate_batch", sample)
    cfg = config(tmp_path, out_dir=str(tmp_path / "self"), batch_size=2, shard_size=2, sources=("selfprompts",))
    with pytest.raises(RuntimeError, match="interrupted"):
        S.generate_selfprompts(model, tokenizer, 4, cfg)
    out = S.generate_selfprompts(model, tokenizer, 4, cfg)
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["index"] for q in questions] == [0, 1, 2, 3]
    assert [q["question"] for q in questions] == ["Tell me about the sea please.", "Name three colours for me.",
                                                  "How do birds fly so far?", "Explain rain to a child."]
    rows = list(D.load_distillation_data(out))
    assert [r["prompt"] for r in rows] == [q["question"] for q in questions]  # each answered once, in order
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 2
    store = build_store([str(out)], len(tokenizer))
    assert store.num_tokens == sum(len(r["response_ids"]) for r in rows)
    assert S.generate_selfprompts(model, tokenizer, 4, cfg) == out and len(calls) == 4  # done: nothing sampled


def test_a_model_that_never_closes_its_turn_is_one_clear_error(tok_model, tmp_path, monkeypatch):
    model, tokenizer = tok_model
    monkeypatch.setattr(S, "generate_batch", lambda m, t, ids, cfg: [[5, 6, 7]] * len(ids))
    with pytest.raises(ValueError, match="does not write usable user turns"):
        S.generate_selfprompts(model, tokenizer, 2, config(tmp_path, batch_size=2, shard_size=2))
    with pytest.raises(ValueError, match="--num must be >= 1"):
        S.generate_selfprompts(model, tokenizer, 0, config(tmp_path))

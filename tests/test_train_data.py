"""Self-distillation data generator: columns, shapes, dtypes, resume, batched == one-at-a-time, real prompt files."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from specdec.train import data as D
from specdec.train import prompt_sources as P
from specdec.train.__main__ import main as train_main
from tests.conftest import tiny_llama

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["Hi", "Write a long poem about the sea and the sky.", "2+2?", "Name three colours, please."]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Offline character-level tokenizer with a ChatML template and no pad token (EOS = <|im_end|>)."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tok_model():
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), dtype=torch.float64)
    return model, tokenizer


def config(tmp_path: Path, **kw) -> D.DataConfig:
    base = {"max_new_tokens": 6, "batch_size": 2, "out_dir": str(tmp_path / "out")}
    return D.DataConfig(**{**base, **kw})


def test_generate_columns_shapes_dtypes(tok_model, tmp_path):
    model, tokenizer = tok_model
    cfg = config(tmp_path, store_hidden=True, topk_logits=3)
    out = D.generate_distillation_data(model, tokenizer, PROMPTS, cfg)
    ds = D.load_distillation_data(out)
    assert len(ds) == 4
    assert set(ds.column_names) == {"index", "prompt", "prompt_ids", "response_ids", "hidden", "topk_values",
                                    "topk_indices"}
    assert ds.features["hidden"].dtype == "float16" and ds.features["topk_values"].dtype == "float16"
    assert ds.features["topk_indices"].dtype == "int32"
    eos = tokenizer.eos_token_id
    rows = ds.with_format("numpy", dtype=None)  # dtype=None: keep the stored float16 (the default upcasts)
    for i, row in enumerate(rows):
        assert row["index"] == i and row["prompt"] == PROMPTS[i]
        assert row["prompt_ids"].tolist() == D.encode_prompt(tokenizer, PROMPTS[i]).tolist()
        r = row["response_ids"].tolist()
        assert 1 <= len(r) <= 6 and eos not in r[:-1]
        assert row["hidden"].shape == (len(r), 32) and row["hidden"].dtype == np.float16
        assert row["topk_values"].shape == (len(r), 3) and row["topk_values"].dtype == np.float16
        assert row["topk_indices"].shape == (len(r), 3) and row["topk_indices"].dtype == np.int32
        # greedy: the top-1 at the position predicting token i is token i (checks the alignment)
        assert row["topk_indices"][:, 0].tolist() == r
        assert np.all(np.diff(row["topk_values"].astype(np.float32), axis=1) <= 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_examples"] == 4 and manifest["hidden_size"] == 32
    assert manifest["total_bytes"] > 0 and manifest["bytes_per_example"] == manifest["total_bytes"] / 4
    assert manifest["config"]["topk_logits"] == 3


def test_hidden_matches_full_precision_forward(tok_model, tmp_path):
    model, tokenizer = tok_model
    out = D.generate_distillation_data(model, tokenizer, PROMPTS[:2], config(tmp_path, store_hidden=True))
    row = D.load_distillation_data(out).with_format("numpy")[1]
    seq = torch.tensor([row["prompt_ids"].tolist() + row["response_ids"].tolist()])
    with torch.no_grad():
        ref = model(seq, output_hidden_states=True).hidden_states[-1][0]
    p, r = len(row["prompt_ids"]), len(row["response_ids"])
    np.testing.assert_allclose(row["hidden"].astype(np.float64), ref[p - 1: p + r - 1].numpy(), atol=2e-3,
                               rtol=2e-3)


def test_resume_generates_only_new_prompts(tok_model, tmp_path, monkeypatch):
    model, tokenizer = tok_model
    calls: list[int] = []
    real = D.generate_batch

    def spy(model, tokenizer, prompt_ids, cfg):
        calls.append(len(prompt_ids))
        return real(model, tokenizer, prompt_ids, cfg)

    monkeypatch.setattr(D, "generate_batch", spy)
    D.generate_distillation_data(model, tokenizer, PROMPTS[:2], config(tmp_path, limit=2))
    assert calls == [2]
    out = D.generate_distillation_data(model, tokenizer, PROMPTS, config(tmp_path, limit=4))
    assert calls == [2, 2]
    D.generate_distillation_data(model, tokenizer, PROMPTS, config(tmp_path, limit=4))
    assert calls == [2, 2]  # nothing left to do
    D.generate_distillation_data(model, tokenizer, PROMPTS[:2], config(tmp_path, limit=2))
    assert calls == [2, 2]  # a smaller limit is already covered
    ds = D.load_distillation_data(out)
    assert ds["prompt"] == PROMPTS and ds["index"] == [0, 1, 2, 3]
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 2
    with pytest.raises(ValueError, match="different settings"):
        D.generate_distillation_data(model, tokenizer, PROMPTS, config(tmp_path, max_new_tokens=7))
    with pytest.raises(ValueError, match="other prompts"):
        D.generate_distillation_data(model, tokenizer, PROMPTS[::-1], config(tmp_path))


def test_batched_equals_one_at_a_time(tok_model, tmp_path):
    model, tokenizer = tok_model
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2]]  # different lengths within each batch of 2
    batched = D.load_distillation_data(
        D.generate_distillation_data(model, tokenizer, prompts, config(tmp_path / "b", max_new_tokens=8)))
    single = D.load_distillation_data(D.generate_distillation_data(
        model, tokenizer, prompts, config(tmp_path / "s", max_new_tokens=8, batch_size=1)))
    assert batched["response_ids"] == single["response_ids"]
    assert len({len(p) for p in batched["prompt_ids"]}) == 4


def test_trim_response():
    assert D.trim_response([5, 6, 2, 2, 2], [2]) == [5, 6, 2]
    assert D.trim_response([5, 6, 7], [2]) == [5, 6, 7]
    assert D.trim_response([3, 5], [2, 3]) == [3]


def test_local_jsonl_source_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"prompt {i}", "other": i}) for i in range(5)) + "\n")
    got = P.load_instruction_prompts(D.DataConfig(sources=(str(path),), field="text", seed=1, limit=3))
    assert len(got) == 3 and set(got) <= {f"prompt {i}" for i in range(5)}
    assert sorted(P.load_instruction_prompts(D.DataConfig(sources=(str(path),)))) == [f"prompt {i}" for i in range(5)]
    with pytest.raises(ValueError, match="no field 'nope'"):
        P.load_instruction_prompts(D.DataConfig(sources=(str(path),), field="nope"))
    with pytest.raises(ValueError, match="unknown source"):
        P.load_instruction_prompts(D.DataConfig(sources=("alpaca",)))
    with pytest.raises(ValueError, match="data file not found"):
        P.load_instruction_prompts(D.DataConfig(sources=("gsm8k",), data_dir=str(tmp_path)))


@pytest.mark.parametrize("argv, message", [
    (["data", "--source", "nonexistent-source"], "unknown source"),
    (["data", "--source", "gsm8k", "--data-dir", "/nonexistent"], "data file not found"),
])
def test_cli_errors(argv, message, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specdec.train: error:") and message in err[0]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder missing")
def test_load_real_prompts():
    cfg = D.DataConfig(data_dir=str(SHARED_DATA), seed=0)
    everything = P.load_instruction_prompts(cfg)
    seeds = [json.loads(line) for line in (SHARED_DATA / "self-instruct/seed_tasks.jsonl").open()]
    gsm = [json.loads(line)["question"] for line in (SHARED_DATA / "gsm8k/train.jsonl").open()]
    assert len(everything) == len(seeds) + len(gsm)
    assert set(gsm) <= set(everything)
    assert P._self_instruct_text(seeds[0]) in everything
    with_input = next(s for s in seeds if s["instances"][0]["input"].strip())
    assert with_input["instances"][0]["input"].strip() in P._self_instruct_text(with_input)
    user = [json.loads(line) for line in (SHARED_DATA / "self-instruct/user_oriented_instructions.jsonl").open()]
    assert not {P._self_instruct_text(u) for u in user} & set(everything)
    assert P.load_instruction_prompts(D.DataConfig(data_dir=str(SHARED_DATA), limit=5)) == everything[:5]
    assert P.load_instruction_prompts(D.DataConfig(data_dir=str(SHARED_DATA), seed=1))[:5] != everything[:5]
    assert (P.resolve_data_dir("../shared/data") / "gsm8k" / "train.jsonl").is_file()  # default, from cwd or root


def test_a_fresh_clone_reads_the_seed_tasks_shipped_in_the_package():
    shipped = P.load_instruction_prompts(D.DataConfig(sources=("self-instruct",)))
    assert len(shipped) == 175 and all(p.strip() for p in shipped)
    if SHARED_DATA.is_dir():  # the shipped file is the same upstream file as the team's copy
        local = P.load_instruction_prompts(D.DataConfig(sources=("self-instruct",), data_dir=str(SHARED_DATA)))
        assert shipped == local


def test_gsm8k_from_the_hub_offline_is_one_error_naming_a_local_source(monkeypatch, capsys):
    import specdec.app.loaders as loaders

    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=2.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match=r"hub \(openai/gsm8k\) cannot be reached \(offline\); use a local copy: "
                                         r"--source FILE\.jsonl --field question"):
        P.load_instruction_prompts(D.DataConfig(sources=("gsm8k",)))
    assert train_main(["data", "--max-per-source", "4"]) == 2  # the README's first step, offline: no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--source FILE.jsonl" in err[0]


def test_every_training_flag_has_help_that_states_its_default():
    from specdec.train.__main__ import build_parser

    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                text = formatter._expand_help(action) if action.help else ""
                assert "default" in text, f"python -m specdec.train {name} {action.option_strings[0]}: {text!r}"


def test_followups_ask_and_answer_a_second_turn_and_resume_without_duplicates(tok_model, tmp_path, monkeypatch):
    """Multi-turn data: the target's follow-up question to each finished answer becomes the second user turn and
    its answer the response; an unfinished answer (no EOS) gets none; an interrupted question stage resumes after
    the last question written, and the rows are read like single-turn data."""
    from specdec.app.prompts import encode_conversation
    from specdec.train import followups as F

    model, tokenizer = tok_model
    eos = tokenizer.eos_token_id

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    answers = {p: enc(a) + ([eos] if a != "no end" else []) for p, a in zip(PROMPTS, ["Sea.", "no end", "4", "Red."],
                                                                           strict=True)}
    firsts = {tuple(D.encode_prompt(tokenizer, p).tolist()): answers[p] for p in PROMPTS}
    real = D.generate_batch
    monkeypatch.setattr(D, "generate_batch", lambda m, t, ids, cfg: [
        firsts[tuple(i)] if tuple(i) in firsts else real(m, t, [i], cfg)[0] for i in ids])
    source = D.generate_distillation_data(model, tokenizer, PROMPTS, config(tmp_path, out_dir=str(tmp_path / "src")))

    asked = []

    def ask(m, t, ids, cfg, fail_at=None):
        asked.append([list(i) for i in ids])
        if fail_at is not None and len(asked) == fail_at:
            raise RuntimeError("interrupted")
        return [enc(f"Why {len(asked)}?") + [eos] for _ in ids]

    monkeypatch.setattr(F, "generate_batch", lambda *a: ask(*a, fail_at=2))
    cfg = config(tmp_path, out_dir=str(tmp_path / "fu"), batch_size=2, sources=("followups",))
    with pytest.raises(RuntimeError, match="interrupted"):
        F.generate_followups(model, tokenizer, source, cfg)
    monkeypatch.setattr(F, "generate_batch", lambda *a: ask(*a))
    out = F.generate_followups(model, tokenizer, source, cfg)
    assert [len(b) for b in asked] == [2, 2, 2]  # the failed batch is asked again, the first one is not
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["index"] for q in questions] == [0, 1, 2, 3]  # no duplicates
    order = list(D.load_distillation_data(source)["prompt"])
    for q in questions:
        p = order[q["index"]]
        want = encode_conversation(tokenizer, [p, F.ASK], [tokenizer.decode(answers[p], skip_special_tokens=True)])
        assert want.tolist() in asked[0] + asked[2]
        assert (q["question"] == "") == (p == PROMPTS[1])  # the unfinished answer gets no follow-up
    rows = list(D.load_distillation_data(out))
    assert len(rows) == 3
    for row in rows:
        conv = json.loads(row["prompt"])
        assert len(conv["turns"]) == 2 and len(conv["answers"]) == 1
        assert conv["turns"][1].replace(" ", "").startswith("Why")  # (the test tokenizer decodes with spaces)
        assert list(row["prompt_ids"]) == encode_conversation(tokenizer, conv["turns"], conv["answers"]).tolist()
        assert 1 <= len(row["response_ids"]) <= 6

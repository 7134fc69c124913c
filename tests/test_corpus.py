"""``python -m specdec.train corpus``: data folders pack into a small committable corpus and unpack into a data
folder that the trainers, ``features`` and ``store`` read, losslessly."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from specdec.train.__main__ import main as train_main
from specdec.train.build_store import build_store
from specdec.train.corpus import load_corpus, pack_corpus, unpack_corpus
from specdec.train.data import load_distillation_data

VOCAB = 300


def _data_folder(path, examples, shard_size=2):
    """A data folder in the ``data`` layout (shards + manifest) holding ``examples`` ``(prompt, ids, ids)``."""
    path.mkdir(parents=True)
    shards = []
    for start in range(0, len(examples), shard_size):
        part = examples[start: start + shard_size]
        name = f"shard_{len(shards):05d}"
        Dataset.from_dict({"index": list(range(start, start + len(part))), "prompt": [p for p, _, _ in part],
                           "prompt_ids": [q for _, q, _ in part], "response_ids": [r for _, _, r in part],
                           "hidden": [[[0.5] * 4] * len(r) for _, _, r in part]}).save_to_disk(str(path / name))
        shards.append({"name": name, "start": start, "rows": len(part),
                       "response_tokens": sum(len(r) for _, _, r in part)})
    (path / "manifest.json").write_text(json.dumps({"config": {"sources": ["test"]}, "shards": shards}))
    return path


def _examples(seed, n):
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()

    return [(f"prompt {seed}-{i} \u00e9\u4e2d", ids(1, 9), ids(0, 30)) for i in range(n)]


def test_packing_two_folders_and_unpacking_gives_back_every_prompt_and_id_in_order(tmp_path):
    first, second = _examples(0, 5), _examples(1, 3)
    data = [_data_folder(tmp_path / "a", first), _data_folder(tmp_path / "b", second, shard_size=3)]
    corpus = pack_corpus(data, tmp_path / "corpus", VOCAB)
    prompts, prompt_ids, response_ids, config = load_corpus(corpus)
    assert list(zip(prompts, prompt_ids, response_ids, strict=True)) == first + second
    assert config["num_examples"] == 8 and config["response_tokens"] == sum(len(r) for _, _, r in first + second)
    assert config["sources"][0].startswith("a: 5 examples") and config["sources"][1].startswith("b: 3 examples")
    assert not any(f.name.endswith(".arrow") for f in corpus.iterdir())  # ids only, no hidden states

    rows = load_distillation_data(unpack_corpus(corpus, tmp_path / "restored", shard_size=3))
    assert len(json.loads((tmp_path / "restored" / "manifest.json").read_text())["shards"]) == 3
    assert [(r["prompt"], list(r["prompt_ids"]), list(r["response_ids"])) for r in rows] == first + second
    assert rows["index"] == list(range(8))
    store = build_store([str(tmp_path / "restored")], VOCAB)  # the store (and the trainers) read what unpack wrote
    assert store.num_tokens == config["response_tokens"]


def test_bad_ids_a_damaged_corpus_and_an_occupied_output_are_refused_with_the_reason(tmp_path):
    data = _data_folder(tmp_path / "a", [("p", [1, 2], [3, VOCAB])])
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
        pack_corpus([data], tmp_path / "c", VOCAB)
    with pytest.raises(ValueError, match="not a corpus"):
        load_corpus(tmp_path / "a")
    corpus = pack_corpus([_data_folder(tmp_path / "b", _examples(2, 4))], tmp_path / "c", VOCAB)
    config = json.loads((corpus / "config.json").read_text())
    (corpus / "config.json").write_text(json.dumps({**config, "num_examples": 5}))
    with pytest.raises(ValueError, match="config says 5 examples"):
        load_corpus(corpus)
    (corpus / "config.json").write_text(json.dumps(config))
    unpack_corpus(corpus, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds data"):
        unpack_corpus(corpus, tmp_path / "out")


def test_the_command_unpacks_and_reports_a_missing_corpus_as_one_error_line(tmp_path, capsys):
    corpus = pack_corpus([_data_folder(tmp_path / "a", _examples(3, 3))], tmp_path / "c", VOCAB)
    assert train_main(["corpus", "unpack", str(corpus), "--out", str(tmp_path / "d")]) == 0
    assert "3 examples" in capsys.readouterr().out
    assert train_main(["corpus", "unpack", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "is not a corpus" in capsys.readouterr().err

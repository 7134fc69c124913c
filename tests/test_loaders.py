"""The embedded GGUF converted once into a cached folder: built once, reused, rebuilt when the source or the specdec
version changes, and holding the same model (same logits, same tokenizer) as the GGUF itself."""

from __future__ import annotations

import pytest
import torch

from specdec.app import model_cache
from specdec.app.model_cache import cached_folder


def _converter(calls: list):
    def convert(folder):
        calls.append(folder)
        (folder / "weights.bin").write_text("converted")

    return convert


def test_the_source_is_converted_once_and_then_reused(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf v1")
    calls: list = []
    first = cached_folder("m", source, _converter(calls), root=tmp_path / "cache")
    again = cached_folder("m", source, _converter(calls), root=tmp_path / "cache")
    assert first == again and len(calls) == 1
    assert (first / "weights.bin").read_text() == "converted"
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # the temporary folder was renamed


def test_a_changed_source_is_rebuilt_and_the_stale_folder_removed(tmp_path):
    source, root, calls = tmp_path / "model.gguf", tmp_path / "cache", []
    source.write_bytes(b"gguf v1")
    old = cached_folder("m", source, _converter(calls), root=root)
    source.write_bytes(b"gguf v2")
    new = cached_folder("m", source, _converter(calls), root=root)
    assert new != old and len(calls) == 2 and not old.exists() and new.is_dir()


def test_a_new_specdec_version_is_rebuilt(tmp_path, monkeypatch):
    source, root, calls = tmp_path / "model.gguf", tmp_path / "cache", []
    source.write_bytes(b"gguf")
    monkeypatch.setattr(model_cache, "package_version", lambda: "1.0")
    old = cached_folder("m", source, _converter(calls), root=root)
    monkeypatch.setattr(model_cache, "package_version", lambda: "1.1")
    new = cached_folder("m", source, _converter(calls), root=root)
    assert "-1.0-" in old.name and "-1.1-" in new.name and len(calls) == 2


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    source, root = tmp_path / "model.gguf", tmp_path / "cache"
    source.write_bytes(b"gguf")

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        cached_folder("m", source, broken, root=root)
    assert list(root.iterdir()) == []
    calls: list = []
    assert (cached_folder("m", source, _converter(calls), root=root) / "weights.bin").is_file() and calls


@pytest.mark.slow
def test_the_cached_folder_holds_the_same_model_as_the_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.app.loaders import _GGUF_FILE, embedded_model_dir, load_model_and_tokenizer

    cached, tokenizer = load_model_and_tokenizer(None)
    gguf_dir = str(embedded_model_dir())
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    text = "Write a haiku about caches. Ünïcödé, code: def f(x): return x * 2"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, direct_tok(text, return_tensors="pt")["input_ids"])
    assert tokenizer.chat_template == direct_tok.chat_template and tokenizer.eos_token_id == direct_tok.eos_token_id
    with torch.inference_mode():
        assert torch.equal(cached(ids).logits, direct(ids).logits)

"""Incremental detokenization with the SmolLM2 byte-level BPE tokenizer: streamed pieces never split a multi-byte
character, join to the one-shot decode, and stop strings cut exactly (also across tokens and inside a random
token soup)."""

from __future__ import annotations

import random

import pytest

from specdec.server.detok import REPLACEMENT, IncrementalDetokenizer

from .test_server import tiny_parts  # noqa: F401 - fixture

TEXT = "Hello wörld! 😀 Ça va? 世界 and 🎉🎉 done, naïve café."


@pytest.fixture(scope="module")
def tokenizer(tiny_parts):  # noqa: F811
    return tiny_parts[1]


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.finish())
    return [p for p in pieces if p], detok


def test_pieces_never_split_a_character_and_join_to_the_one_shot_decode(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids), "no token splits a character: weak test"
    pieces, detok = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert all(REPLACEMENT not in p for p in pieces)
    assert detok.tokens_used == len(ids) and not detok.stopped


def test_a_stop_string_cuts_before_its_first_match_across_tokens_and_characters(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    for stop in ("😀 Ç", "世", "ö", "done", "é."):
        pieces, detok = stream(tokenizer, ids, ("never-there", stop))
        assert "".join(pieces) == TEXT[: TEXT.find(stop)], stop
        assert detok.stopped
        # the tokens used are the shortest prefix whose text holds the stop string
        assert stop in tokenizer.decode(ids[: detok.tokens_used])
        assert stop not in tokenizer.decode(ids[: detok.tokens_used - 1])


def test_text_that_could_start_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    ids = tokenizer("abc abd abe")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, ("abf",))
    released = ""
    for t in ids:
        released += detok.add(t)
        assert not released.endswith("ab"), "a possible stop-string start was released too early"
    released += detok.finish()
    assert released == "abc abd abe" and not detok.stopped


def test_random_token_soup_streams_exactly_with_random_stop_strings(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == full
        if len(full) >= 3:
            start = rng.randrange(len(full) - 2)
            stop = full[start : start + rng.randrange(1, 3)]
            if REPLACEMENT in stop:
                continue  # an incomplete character is never released, so it cannot be matched mid-stream
            cut, _ = stream(tokenizer, ids, (stop,))
            assert "".join(cut) == full[: full.find(stop)]


def test_empty_stop_strings_are_refused(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, ("",))

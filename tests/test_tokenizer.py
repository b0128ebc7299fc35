import random
import socket

import numpy as np
import pytest

from gptmini.tokenizer import EOT_ID, Tokenizer

TEXTS = [
    "Hello world",
    "To be, or not to be, that is the question:",
    "你好，世界！机器学习很有趣。",
    "emoji 🎉👨‍👩‍👧 and café, naïve, Ελληνικά, русский",
    "  leading spaces\n\ttabs\r\nand CRLF  ",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("ChatGPT is") == [30820, 38, 11571, 318]
    assert tok.eot_id == EOT_ID == 50256


def test_special_tokens_only_when_allowed(tok):
    assert tok.encode("<|endoftext|>", allow_special=True) == [50256]
    assert 50256 not in tok.encode("<|endoftext|>")  # user text cannot smuggle in control tokens


def test_matches_tiktoken_reference_ranks(tok):
    # The same ranks as published for GPT-2: every byte is a token, and id 50255 is the last merge.
    assert len({tok.token_bytes(i) for i in range(50256)}) == 50256
    assert all(len(tok.encode(bytes([b]).decode("latin-1"))) >= 1 for b in range(256))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_one_shot(tok, text):
    ids = tok.encode(text)
    decoder = tok.stream_decoder()
    pieces = list(decoder.push_many(ids)) + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_random_ids_equals_one_shot(tok):
    # Arbitrary id sequences (as a model may emit) split and break UTF-8 anywhere; the streamed text must still
    # equal the one-shot decode, replacement characters included.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(50256) for _ in range(rng.randrange(1, 20))]
        decoder = tok.stream_decoder()
        assert "".join(decoder.push_many(ids)) + decoder.flush() == tok.decode(ids)


def test_never_touches_the_network(monkeypatch):
    import gptmini.tokenizer as module

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    module._gpt2_encoding.cache_clear()
    assert Tokenizer().encode("Hello world") == [15496, 995]


# ---- compact vocabulary (merge fallback) ------------------------------------------------------------------------

SHAKESPEARE = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def compact(tok):
    return Tokenizer.for_text_tokens(np.array(tok.encode(SHAKESPEARE)))


def test_compact_vocabulary_is_the_text_tokens_plus_bytes_and_eot(tok, compact):
    gpt2_ids = set(tok.encode(SHAKESPEARE))
    byte_ids = {tok.encoding.encode_single_token(bytes([b])) for b in range(256)}
    assert set(compact.vocabulary.tolist()) == gpt2_ids | byte_ids | {EOT_ID}
    assert compact.n_vocab == len(gpt2_ids | byte_ids | {EOT_ID})
    assert compact.eot_id == compact.n_vocab - 1  # 50256 is the largest GPT-2 id
    assert list(compact.special_ids.values())[1:] == list(range(compact.n_vocab, compact.n_vocab + 4))


def test_compact_text_keeps_gpt2_tokens_it_knows(tok, compact):
    ids = compact.encode(SHAKESPEARE)
    assert [int(compact.vocabulary[i]) for i in ids] == tok.encode(SHAKESPEARE)


@pytest.mark.parametrize("text", TEXTS)
def test_compact_round_trip_and_byte_counts(compact, text):
    """Unknown tokens are spelled with smaller tokens: same text, same byte count (so bits per byte compare)."""
    ids = compact.encode(text)
    assert all(0 <= i < compact.n_vocab for i in ids)
    assert compact.decode(ids) == text
    assert sum(len(compact.token_bytes(i)) for i in ids) == len(text.encode("utf-8"))
    decoder = compact.stream_decoder()
    assert "".join(decoder.push_many(ids)) + decoder.flush() == text


@pytest.mark.parametrize("word", [" question", " Romeo", "Hello", " suffer", " kingdom"])
def test_a_missing_token_is_spelled_as_gpt2_bpe_would_without_it(tok, word):
    """Reference: tiktoken's own BPE over GPT-2's merges with that one token removed."""
    import tiktoken

    from gptmini.tokenizer import GPT2_PATTERN, _gpt2_ranks

    (missing,) = tok.encode(word)
    ranks = {b: r for b, r in _gpt2_ranks().items() if r != missing}
    reference = tiktoken.Encoding(name="ref", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    trimmed = Tokenizer([i for i in range(EOT_ID + 1) if i != missing])
    expected = reference.encode_ordinary(word)
    assert len(expected) >= 2
    assert [int(trimmed.vocabulary[i]) for i in trimmed.encode(word)] == expected


def test_vocabulary_limited_to_the_most_frequent_tokens(tok):
    text = " ".join(TEXTS) + " the the the question question"
    gpt2_ids = tok.encode(text)
    limited = Tokenizer.for_text_tokens(np.array(gpt2_ids), max_size=259)
    assert limited.n_vocab == 259  # 256 bytes, <|endoftext|> and the two most frequent other tokens
    byte_ids = {tok.encoding.encode_single_token(bytes([b])) for b in range(256)}
    others = {t: gpt2_ids.count(t) for t in set(gpt2_ids) - byte_ids}
    top_two = sorted(others, key=lambda t: (-others[t], t))[:2]
    assert set(limited.vocabulary.tolist()) == byte_ids | {EOT_ID} | set(top_two)
    for t in TEXTS:
        ids = limited.encode(t)
        assert limited.decode(ids) == t
        assert sum(len(limited.token_bytes(i)) for i in ids) == len(t.encode("utf-8"))


def test_bytes_only_vocabulary_spells_everything_in_bytes(tok):
    only_bytes = Tokenizer.for_text_tokens(np.array([EOT_ID]), max_size=258)  # no other token used
    for text in TEXTS:
        expected = [tok.encoding.encode_single_token(bytes([b])) for b in text.encode("utf-8")]
        assert [int(only_bytes.vocabulary[i]) for i in only_bytes.encode(text)] == expected


def test_compact_special_tokens(compact):
    ids = compact.encode("<|user|>hi<|end|><|endoftext|>", allow_special=True)
    special = compact.special_ids
    assert ids[0] == special["<|user|>"] and ids[-2:] == [special["<|end|>"], compact.eot_id]
    assert compact.decode(ids) == "<|user|>hi<|end|><|endoftext|>"


def test_damaged_vocabulary_is_a_clear_error():
    from gptmini.errors import UserError

    with pytest.raises(UserError, match="vocabulary is malformed"):
        Tokenizer([1, 2, 3])

import random
import socket

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

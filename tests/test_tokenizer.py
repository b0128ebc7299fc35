import random
import socket
from pathlib import Path

import numpy as np
import pytest

from gptmini.tokenizer import EOT_ID, Tokenizer

ROOT = Path(__file__).resolve().parent.parent

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


# GPT-2 ids as published (OpenAI's encoder.json, quoted throughout the GPT-2 literature), written out by hand.
PUBLISHED_IDS = {
    "Hello world": [15496, 995],
    "hello world": [31373, 995],
    "ChatGPT is": [30820, 38, 11571, 318],
    "The": [464],
    " The": [383],
    " the": [262],
    " and": [290],
    " of": [286],
    " to": [284],
    " a": [257],
    " is": [318],
    ",": [11],
    ".": [13],
    "!": [0],  # the first printable byte is token 0
    " ": [220],
    "\n": [198],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # as text, not the control token
}
# tiktoken publishes this SHA-256 for GPT-2's ranks file (r50k_base.tiktoken, tiktoken_ext/openai_public.py).
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@pytest.mark.parametrize("text", PUBLISHED_IDS)
def test_known_ids(tok, text):
    assert tok.encode(text) == PUBLISHED_IDS[text]
    assert tok.eot_id == EOT_ID == 50256


def test_special_tokens_only_when_allowed(tok):
    assert tok.encode("<|endoftext|>", allow_special=True) == [50256]
    assert 50256 not in tok.encode("<|endoftext|>")  # user text cannot smuggle in control tokens


def test_shipped_ranks_are_the_published_file():
    import hashlib

    from gptmini.tokenizer import GPT2_RANKS_FILE

    assert hashlib.sha256(GPT2_RANKS_FILE.read_bytes()).hexdigest() == R50K_SHA256


@pytest.fixture(scope="module")
def published_gpt2(tmp_path_factory):
    """tiktoken's own GPT-2 encoding (r50k_base: its split pattern, <|endoftext|>, the hash it checks), built from the
    shipped ranks file instead of the download; tiktoken itself refuses a file whose SHA-256 differs."""
    import tiktoken
    import tiktoken_ext.openai_public as published
    from tiktoken.load import load_tiktoken_bpe

    from gptmini.tokenizer import GPT2_RANKS_FILE

    hashes = []

    def from_the_shipped_file(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        hashes.append(expected_hash)
        return load_tiktoken_bpe(str(GPT2_RANKS_FILE), expected_hash)

    with pytest.MonkeyPatch.context() as mp:
        # An empty cache of its own: tiktoken reads the file and checks its hash (it skips the check with no cache)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.setattr(published, "load_tiktoken_bpe", from_the_shipped_file)
        spec = published.r50k_base()
    assert hashes == [R50K_SHA256]
    return tiktoken.Encoding(**spec)


def test_matches_tiktoken_reference_ranks(tok, published_gpt2):
    rng = random.Random(0)
    shakespeare = (ROOT / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000]
    randoms = ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(200)) for _ in range(5)]
    for text in [*TEXTS, *PUBLISHED_IDS, shakespeare, *randoms]:
        assert tok.encode(text) == published_gpt2.encode_ordinary(text), text[:40]
    assert tok.encode("a<|endoftext|>b", allow_special=True) == published_gpt2.encode(
        "a<|endoftext|>b", allowed_special="all"
    )
    ids = [rng.randrange(50257) for _ in range(2000)]
    assert tok.decode(ids) == published_gpt2.decode(ids)
    assert all(tok.token_bytes(i) == published_gpt2.decode_single_token_bytes(i) for i in range(50257))


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

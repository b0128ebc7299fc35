"""Token cache, chunked tokenisation, UTF-8 checks and the deterministic batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptmini import data
from gptmini.data import RandomWindows, load_corpus, split_for_tokenizer, token_byte_lengths
from gptmini.errors import UserError
from gptmini.tokenizer import Tokenizer

TRICKY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\nAll:\n  Speak, speak.\n"
    "x\n\ny \n z\t\nq\r\nr  \n\n  s\n'tis\n'll 12\n345 ok\n¿Qué?\n中文字符\n😀 emoji\n\n" * 7
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.mark.parametrize("size", [7, 20, 64, 1000])
def test_pieces_tokenise_exactly_like_the_whole_text(tok, size):
    pieces, tail = split_for_tokenizer(TRICKY, size)
    assert "".join(pieces) + tail == TRICKY
    ids = [i for p in [*pieces, tail] for i in tok.encode(p)]
    assert ids == tok.encode(TRICKY)


def test_files_are_joined_by_endoftext_and_cached(tmp_path, tok, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TRICKY, encoding="utf-8")
    b.write_text("Second file.\n", encoding="utf-8")
    monkeypatch.setattr(data, "READ_BLOCK", 100)  # many blocks, characters split across them
    monkeypatch.setattr(data, "PIECE", 30)
    corpus = load_corpus([a, b], tok)
    expected = tok.encode(TRICKY) + [tok.eot_id] + tok.encode("Second file.\n")
    assert corpus.tokens.dtype == np.uint16 and corpus.tokens.tolist() == expected
    assert corpus.n_bytes == len(TRICKY.encode()) + len(b"Second file.\n")
    # Bytes per token add up to the text's UTF-8 bytes (the denominator of bits per byte).
    assert token_byte_lengths(tok, 50257)[corpus.tokens].sum() == corpus.n_bytes

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenised a cached corpus")

    original = data._tokenise_into
    monkeypatch.setattr(data, "_tokenise_into", boom)
    again = load_corpus([a, b], tok)
    assert again.key == corpus.key and again.tokens.tolist() == expected
    b.write_text("Changed.\n", encoding="utf-8")  # new content, new key
    monkeypatch.setattr(data, "_tokenise_into", original)
    assert load_corpus([a, b], tok).key != corpus.key


def test_directory_contributes_its_txt_files_sorted(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "skip.md").write_text("not me\n")
    corpus = load_corpus([tmp_path], tok)
    eot = tok.eot_id
    assert corpus.tokens.tolist() == [
        *tok.encode("ay\n"),
        eot,
        *tok.encode("bee\n"),
        eot,
        *tok.encode("sea\n"),
    ]


def test_invalid_utf8_names_file_and_byte_offset(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "READ_BLOCK", 64)
    bad = tmp_path / "bad.txt"
    prefix = ("é" * 100).encode()  # 200 bytes of two-byte characters: blocks cut through them
    bad.write_bytes(prefix + b"ok \xff tail")
    with pytest.raises(UserError, match=rf"bad\.txt is not valid UTF-8 \(byte offset {len(prefix) + 3}\)"):
        load_corpus([bad], tok)
    corpus = load_corpus([bad], tok, encoding_errors="replace")
    assert tok.decode(corpus.tokens.tolist()) == "é" * 100 + "ok \ufffd tail"


@pytest.mark.parametrize(
    "content,message",
    [(None, "does not exist"), (b"", "corpus is empty"), (b"abc\x00\x01\x02", "looks binary")],
)
def test_bad_corpora(tmp_path, tok, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_corpus([path], tok)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    a = RandomWindows(tokens, 16, 4, seed=3, grad_accum=2)
    b = RandomWindows(tokens, 16, 4, seed=3, grad_accum=2)
    for step in (0, 7, 123):
        for micro in (0, 1):
            xa, ya = a.batch(step, micro)
            xb, yb = b.batch(step, micro)
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
            assert xa.shape == (4, 16) and np.array_equal(ya, xa + 1)  # targets = next tokens
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0])
    assert not np.array_equal(a.batch(0)[0], RandomWindows(tokens, 16, 4, seed=4, grad_accum=2).batch(0)[0])


def test_ranks_take_their_slice_of_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    single = RandomWindows(tokens, 16, 4, seed=0, grad_accum=4)
    for rank in range(2):
        ddp = RandomWindows(tokens, 16, 4, seed=0, grad_accum=2, rank=rank, world_size=2)
        for micro in range(2):
            assert np.array_equal(ddp.batch(5, micro)[0], single.batch(5, rank * 2 + micro)[0])


def test_streamed_vocabulary_and_remap_equal_the_in_memory_ones(tmp_path, tok, monkeypatch):
    text = (Path(__file__).parent.parent / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:40_000]
    text += TRICKY  # Chinese and emoji: tokens a small vocabulary spells with byte tokens
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus([path], tok)
    train, val = (np.asarray(part) for part in corpus.split(0.1))
    monkeypatch.setattr(data, "TOKEN_CHUNK", 1000)  # many chunks, none aligned with the split
    counts = data.count_tokens(corpus, len(train))
    assert np.array_equal(counts, np.bincount(train, minlength=len(counts)))
    compact = Tokenizer.for_token_counts(counts, max_size=600)  # ~1 token in 5 is spelled with its pieces
    assert np.array_equal(compact.vocabulary, Tokenizer.for_text_tokens(train, max_size=600).vocabulary)

    streamed = data.remap_splits(corpus, compact, 0.1)
    for part, whole in zip(streamed, (train, val), strict=True):
        assert isinstance(part, np.memmap) and part.dtype == np.uint16
        assert np.array_equal(part, compact.from_gpt2(whole))  # the in-memory remap of the whole split
        # ... and, independently of from_gpt2, each GPT-2 token's own id or its spelling, token by token.
        by_token = [
            [compact._from_gpt2[t]] if compact._from_gpt2[t] >= 0 else compact._spelling(int(t))
            for t in whole
        ]
        assert part.tolist() == np.concatenate(by_token).tolist()
    assert len(streamed[0]) > len(train)  # some tokens were spelled
    assert compact.decode(streamed[0]) + compact.decode(streamed[1]) == text

    # Cached by content, vocabulary and split: the same call maps nothing again; another vocabulary does.
    def boom(*args, **kwargs):
        raise AssertionError("remapped a cached corpus")

    monkeypatch.setattr(Tokenizer, "from_gpt2", boom)
    again = data.remap_splits(corpus, compact, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(again, streamed, strict=True))
    with pytest.raises(AssertionError, match="remapped"):
        data.remap_splits(corpus, Tokenizer.for_token_counts(counts, max_size=500), 0.1)
    with pytest.raises(AssertionError, match="remapped"):
        data.remap_splits(corpus, compact, 0.2)
    # GPT-2's own numbering maps nothing: the corpus's own memmap.
    full = data.remap_splits(corpus, tok, 0.1)
    assert np.array_equal(full[0], train) and np.array_equal(full[1], val)

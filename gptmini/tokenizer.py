"""GPT-2 byte-pair encoding through tiktoken, from the ranks file shipped in the package (no network, ever).

Ids 0..50255 are GPT-2's BPE tokens and 50256 is `<|endoftext|>`, exactly as GPT-2. The chat tokens live in the
embedding's padding slots just above, so adding them needs no resize and leaves GPT-2 ids untouched.

A model may instead use a *compact vocabulary*: a subset of GPT-2 tokens (by default the ones its training corpus
uses, or only its most frequent ones, always with the 256 single-byte tokens and `<|endoftext|>`), renumbered 0..n-1
in GPT-2 order, chat tokens right after. Text is still GPT-2 BPE: a token outside the subset is spelled with the two
GPT-2 tokens it was merged from, recursively, down to single bytes if need be (" Romeo" → " Rome" + "o"), so any
text encodes and bits per byte stay comparable. For a small model the LM head over 50,257 tokens is most of the
compute; the ~19k tokens Shakespeare uses make training about twice as fast, its 4k most frequent faster still.
"""

from __future__ import annotations

import binascii
import codecs
import functools
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import numpy as np
import tiktoken

from gptmini.config import GPT2_VOCAB_SIZE
from gptmini.errors import UserError

ASSETS = Path(__file__).parent / "assets"
GPT2_RANKS_FILE = ASSETS / "gpt2.tiktoken"
# GPT-2's pre-tokeniser split pattern (contractions, letters, digits, punctuation, whitespace), as tiktoken's r50k.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT = "<|endoftext|>"
EOT_ID = 50256
CHAT_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}


@functools.lru_cache(maxsize=1)
def _gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE: token bytes → rank, which is also its token id (lower ranks merge first)."""
    # "token-in-base64 rank" per line, parsed in one pass rather than line by line
    fields = GPT2_RANKS_FILE.read_bytes().split()
    return dict(zip(map(binascii.a2b_base64, fields[::2]), map(int, fields[1::2]), strict=True))


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gptmini-gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_gpt2_ranks(),
        special_tokens={EOT: EOT_ID, **CHAT_TOKENS},
    )


def merged_from(token: bytes) -> list[bytes]:
    """The GPT-2 tokens `token` was merged from: its BPE with only the merges ranked before its own.

    Usually two pieces; single bytes are their own pieces. Every piece ranks below the token, so splitting
    pieces again always ends at bytes.
    """
    ranks = _gpt2_ranks()
    own_rank = ranks.get(token, len(ranks))
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = own_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], own_rank)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


class Tokenizer:
    """Text ⇄ token ids. `encode` treats special-token text in user input as plain text unless allowed.

    `vocabulary`: the sorted GPT-2 ids a compact-vocabulary model's ids 0..n-1 stand for (see the module
    docstring); None for GPT-2's own numbering. Every id this class takes or returns is a model id.
    """

    name = "gpt2"

    def __init__(self, vocabulary: Sequence[int] | None = None) -> None:
        self.encoding = _gpt2_encoding()
        self.vocabulary = None if vocabulary is None else np.asarray(vocabulary, dtype=np.int64)
        if self.vocabulary is None:
            self.n_vocab = GPT2_VOCAB_SIZE  # ids a base model reads and emits (BPE tokens + <|endoftext|>)
            self._to_gpt2 = self._from_gpt2 = None
        else:
            check_vocabulary(self.vocabulary)
            self.n_vocab = len(self.vocabulary)
            n_chat = len(CHAT_TOKENS)
            self._to_gpt2 = np.concatenate(
                [self.vocabulary, np.arange(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + n_chat)]
            )
            self._from_gpt2 = np.full(GPT2_VOCAB_SIZE + n_chat, -1, dtype=np.int64)
            self._from_gpt2[self._to_gpt2] = np.arange(len(self._to_gpt2))
        self._spellings: dict[int, np.ndarray] = {}  # GPT-2 id outside the vocabulary → its model ids
        self.eot_id = self._model_id(EOT_ID)
        self.special_ids = {EOT: self.eot_id, **{t: self._model_id(i) for t, i in CHAT_TOKENS.items()}}
        # A chat model reads and emits every id up to the last chat token.
        self.chat_vocab_size = self.n_vocab + len(CHAT_TOKENS)

    @classmethod
    def for_text_tokens(
        cls, gpt2_ids: np.ndarray, max_size: int | None = None, chunk: int = 1 << 24
    ) -> Tokenizer:
        """A compact vocabulary of the tokens in `gpt2_ids` (any length: counted in chunks); see
        `for_token_counts`."""
        counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
        for start in range(0, len(gpt2_ids), chunk):
            counts += np.bincount(np.asarray(gpt2_ids[start : start + chunk]), minlength=GPT2_VOCAB_SIZE)
        return cls.for_token_counts(counts, max_size)

    @classmethod
    def for_token_counts(cls, counts: np.ndarray, max_size: int | None = None) -> Tokenizer:
        """A compact vocabulary of the GPT-2 ids with a nonzero count (`counts[id]`: how often a corpus uses id).

        With `max_size`, only the most frequent ones (ties: lower id) fill the places the byte tokens and
        <|endoftext|> leave; the others are spelled with the pieces they were merged from.
        """
        keep = np.zeros(GPT2_VOCAB_SIZE, dtype=bool)
        keep[byte_token_ids()] = True  # always: any text can be spelled with them
        keep[EOT_ID] = True
        n_always = int(keep.sum())
        if max_size is not None and max_size < n_always + 1:
            raise UserError(
                f"vocab must hold at least {n_always + 1} tokens (256 bytes, <|endoftext|> and one more)"
            )
        used = np.flatnonzero((counts[:GPT2_VOCAB_SIZE] > 0) & ~keep)
        if max_size is not None:
            by_count = used[np.argsort(-counts[used], kind="stable")]
            used = by_count[: max_size - n_always]
        keep[used] = True
        return cls(np.flatnonzero(keep))

    def _model_id(self, gpt2_id: int) -> int:
        return gpt2_id if self._from_gpt2 is None else int(self._from_gpt2[gpt2_id])

    def from_gpt2(self, gpt2_ids: np.ndarray) -> np.ndarray:
        """GPT-2 ids → model ids; a token outside a compact vocabulary becomes the pieces it was merged from.

        Token by token, so mapping a sequence in chunks and joining the results gives the whole sequence's ids.
        """
        if self._from_gpt2 is None:
            return gpt2_ids
        gpt2_ids = np.asarray(gpt2_ids)
        ids = self._from_gpt2[gpt2_ids]
        missing = ids < 0
        if not missing.any():
            return ids
        # Each missing token widens to its spelling: repeat it to the spelling's length, then write the spellings
        # over those runs (array operations throughout: a corpus may miss tens of millions of tokens).
        absent, which = np.unique(gpt2_ids[missing], return_inverse=True)
        spellings = [self._spelling(int(t)) for t in absent]
        spelled_len = np.array([len(sp) for sp in spellings], dtype=np.int64)
        flat = np.concatenate(spellings)
        run_len = spelled_len[which]  # per missing position
        lengths = np.ones(len(ids), dtype=np.int64)
        lengths[missing] = run_len
        out = np.repeat(ids, lengths)
        within = np.arange(int(run_len.sum())) - np.repeat(np.cumsum(run_len) - run_len, run_len)
        run_start = (np.cumsum(lengths) - lengths)[missing]
        spelling_start = (np.cumsum(spelled_len) - spelled_len)[which]
        out[np.repeat(run_start, run_len) + within] = flat[np.repeat(spelling_start, run_len) + within]
        return out

    def _spelling(self, gpt2_id: int) -> np.ndarray:
        spelling = self._spellings.get(gpt2_id)
        if spelling is None:
            ranks = _gpt2_ranks()
            ids = []
            for piece in merged_from(self.encoding.decode_single_token_bytes(gpt2_id)):
                piece_id = ranks[piece]
                model_id = int(self._from_gpt2[piece_id])
                ids.extend([model_id] if model_id >= 0 else self._spelling(piece_id).tolist())
            spelling = self._spellings[gpt2_id] = np.array(ids, dtype=np.int64)
        return spelling

    def encode(self, text: str, *, allow_special: bool | AbstractSet[str] = False) -> list[int]:
        """`allow_special`: True reads every special token's text as that token; a set, only those (the others stay
        plain text, as `<|user|>` does for Hugging Face's GPT-2 tokenizer, which knows only `<|endoftext|>`)."""
        if allow_special is True:
            return self._model_ids(self.encoding.encode(text, allowed_special="all"))
        if allow_special:
            return self._model_ids(
                self.encoding.encode(text, allowed_special=set(allow_special), disallowed_special=())
            )
        return self._model_ids(self.encoding.encode_ordinary(text))

    def encode_batch(self, texts: list[str], *, num_threads: int = 8) -> list[list[int]]:
        return [
            self._model_ids(ids)
            for ids in self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        ]

    def _model_ids(self, gpt2_ids: list[int]) -> list[int]:
        if self._from_gpt2 is None:
            return gpt2_ids
        return self.from_gpt2(np.asarray(gpt2_ids, dtype=np.int64)).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if self._to_gpt2 is not None:
            ids = self._to_gpt2[np.asarray(ids, dtype=np.int64)].tolist()
        return self.encoding.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        if self._to_gpt2 is not None:
            token_id = int(self._to_gpt2[token_id])
        return self.encoding.decode_single_token_bytes(token_id)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


@functools.lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest for chars from U+0100 on."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level(raw: bytes) -> str:
    """Bytes as GPT-2's byte-level BPE spells them in its vocab.json and merges.txt (Hugging Face's tokens)."""
    chars = _byte_chars()
    return "".join(chars[b] for b in raw)


@functools.lru_cache(maxsize=1)
def byte_token_ids() -> np.ndarray:
    """GPT-2 ids of the 256 single-byte tokens: any byte string can be spelled with them."""
    encoding = _gpt2_encoding()
    return np.array([encoding.encode_single_token(bytes([b])) for b in range(256)], dtype=np.int64)


def check_vocabulary(vocabulary: np.ndarray) -> None:
    """A compact vocabulary must be sorted GPT-2 ids holding every byte token and <|endoftext|>."""
    if (
        vocabulary.ndim != 1
        or len(vocabulary) == 0
        or vocabulary[0] < 0
        or vocabulary[-1] != EOT_ID
        or np.any(np.diff(vocabulary) <= 0)
        or not _holds(vocabulary, byte_token_ids())
    ):
        raise UserError(
            "the checkpoint's vocabulary is malformed (it must list sorted GPT-2 ids, every byte token and "
            "<|endoftext|>); the checkpoint is damaged"
        )


def _holds(sorted_ids: np.ndarray, ids: np.ndarray) -> bool:
    """Every one of `ids` is in `sorted_ids` (a binary search: `np.isin` imports numpy.ma, 10 ms of start-up)."""
    at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return bool((sorted_ids[at] == ids).all())


class StreamDecoder:
    """Turns token ids into text as they arrive without ever splitting a UTF-8 character.

    One GPT-2 token can hold half of a Chinese character or an emoji; the incomplete bytes wait here until the
    next token completes them. Joined pieces + `flush()` equal `tokenizer.decode(all_ids)` exactly.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> Iterator[str]:
        for token_id in ids:
            piece = self.push(token_id)
            if piece:
                yield piece

    def flush(self) -> str:
        """Whatever is left (an unfinished character becomes U+FFFD, as in a one-shot decode)."""
        return self._utf8.decode(b"", final=True)

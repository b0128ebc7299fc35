"""GPT-2 byte-pair encoding through tiktoken, from the ranks file shipped in the package (no network, ever).

Ids 0..50255 are GPT-2's BPE tokens and 50256 is `<|endoftext|>`, exactly as GPT-2. The chat tokens live in the
embedding's padding slots just above, so adding them needs no resize and leaves GPT-2 ids untouched.
"""

from __future__ import annotations

import base64
import codecs
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).parent / "assets"
GPT2_RANKS_FILE = ASSETS / "gpt2.tiktoken"
# GPT-2's pre-tokeniser split pattern (contractions, letters, digits, punctuation, whitespace), as tiktoken's r50k.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT = "<|endoftext|>"
EOT_ID = 50256
CHAT_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gptmini-gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_load_ranks(GPT2_RANKS_FILE),
        special_tokens={EOT: EOT_ID, **CHAT_TOKENS},
    )


class Tokenizer:
    """Text ⇄ token ids. `encode` treats special-token text in user input as plain text unless allowed."""

    name = "gpt2"

    def __init__(self) -> None:
        self.encoding = _gpt2_encoding()
        self.eot_id = EOT_ID
        self.special_ids = {EOT: EOT_ID, **CHAT_TOKENS}

    @property
    def n_vocab(self) -> int:
        """Ids a base GPT-2 model knows (the BPE tokens and <|endoftext|>)."""
        return EOT_ID + 1

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


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

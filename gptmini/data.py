"""Text → token cache → batches.

Text files (or directories of `.txt`) are read in blocks, checked for UTF-8, tokenised in parallel and streamed into
a uint16 memmap on disk, so a corpus larger than RAM never sits in Python lists. The cache is keyed by the files'
contents, the tokenizer and the decoding mode: a second run on the same text skips tokenisation. Counting a corpus's
tokens (to choose a compact vocabulary) and mapping it onto that vocabulary stream through the cache in chunks too;
the mapped splits are memmaps of their own, cached by content, vocabulary and split. Memory stays flat as the
corpus grows: the chunks are read from the files, not through the memmaps (whose pages, once read, stay resident).

Batches come from a `BatchSource`: anything with `batch(step, micro) -> (x, y)`. The training loop only knows that
interface, so pretraining windows and (later) chat conversations with y = -1 on the positions the loss ignores plug
into the same loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptmini.config import GPT2_VOCAB_SIZE
from gptmini.errors import UserError

CACHE_FORMAT = 1
READ_BLOCK = 8 << 20  # bytes read and tokenised per round
PIECE = 256 << 10  # characters per piece handed to one tokeniser thread
TOKEN_CHUNK = 1 << 20  # tokens per chunk when counting or remapping a cached corpus (2 MB of uint16)
IGNORE_INDEX = -1  # a target the loss skips


# ---- files ----------------------------------------------------------------------------------------------------


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to train on, in the order given; a directory contributes its `.txt` files, sorted, recursively."""
    if not paths:
        raise UserError("no corpus given; pass one or more text files or directories")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"corpus {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"directory {path} holds no .txt files")
            files.extend(found)
        else:
            files.append(path)
    return files


def cache_root() -> Path:
    """Where token caches live: $GPTMINI_CACHE_DIR, else $XDG_CACHE_HOME/gptmini, else ~/.cache/gptmini."""
    if os.environ.get("GPTMINI_CACHE_DIR"):
        return Path(os.environ["GPTMINI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptmini"


def _read_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(READ_BLOCK):
            yield offset, block
            offset += len(block)


def _content_key(files: list[Path], tokenizer_name: str, encoding_errors: str) -> str:
    h = hashlib.sha256(f"gptmini-tokens/{CACHE_FORMAT}/{tokenizer_name}/{encoding_errors}".encode())
    for path in files:
        h.update(b"\0file\0")
        for _, block in _read_blocks(path):
            h.update(block)
    return h.hexdigest()[:32]


def _decoded_blocks(path: Path, errors: str) -> Iterator[str]:
    """The file's text, block by block, never splitting a UTF-8 character; errors name the byte offset."""
    carry = b""
    for offset, block in _read_blocks(path):
        nul = block.find(b"\0")
        if nul >= 0:
            raise UserError(f"{path} looks binary (NUL byte at byte offset {offset + nul}), not text")
        data = carry + block
        # Cut before a trailing incomplete character (at most 3 bytes of it); it goes with the next block.
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 != 0x80:  # a lead or ASCII byte
                need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
                if need > back:
                    cut = len(data) - back
                break
        start = offset - len(carry)
        data, carry = data[:cut], data[cut:]
        try:
            yield data.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not valid UTF-8 (byte offset {start + e.start}); "
                "fix the file or pass --encoding-errors replace"
            ) from None
    if carry:
        try:
            yield carry.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not valid UTF-8 (byte offset {offset + len(block) - len(carry) + e.start}); "
                "fix the file or pass --encoding-errors replace"
            ) from None


def split_for_tokenizer(text: str, size: int = PIECE) -> tuple[list[str], str]:
    """Cut `text` into pieces of about `size` characters at places where GPT-2's pre-tokeniser always splits.

    A lone "\\n" between two non-space characters is one: no pre-token crosses it (and `\\s++$` at a piece's end
    takes only that "\\n", as in the whole text), so tokenising the pieces separately gives exactly the tokens of
    the whole. Returns the pieces and the uncut tail (to prepend to the next
    block).
    """
    pieces = []
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size)
        while cut >= 0 and not _is_boundary(text, cut):
            cut = text.rfind("\n", start, cut)
        if cut < start:  # no boundary in the window: look further on
            cut = _next_boundary(text, start + size)
            if cut < 0:
                break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    return pieces, text[start:]


def _next_boundary(text: str, start: int) -> int:
    cut = text.find("\n", start)
    while cut >= 0 and not _is_boundary(text, cut):
        cut = text.find("\n", cut + 1)
    return cut


def _is_boundary(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


# ---- token cache ----------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """A tokenised corpus: `tokens` is a read-only uint16 memmap of every file, joined by <|endoftext|>."""

    tokens: np.ndarray
    files: list[Path]
    key: str
    n_bytes: int  # UTF-8 bytes of the text the tokens encode
    path: Path  # the cache file `tokens` maps

    def split_index(self, val_fraction: float) -> int:
        """Where val starts: the last `val_fraction` of the tokens are val."""
        return len(self.tokens) - int(len(self.tokens) * val_fraction)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, val): val is the last `val_fraction` of the tokens."""
        cut = self.split_index(val_fraction)
        return self.tokens[:cut], self.tokens[cut:]

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """tokens[start:stop] in chunks of TOKEN_CHUNK, read from the cache file (memory: one chunk)."""
        stop, size = len(self.tokens) if stop is None else stop, TOKEN_CHUNK
        with open(self.path, "rb") as f:
            f.seek(2 * start)
            for begin in range(start, stop, size):
                yield np.frombuffer(f.read(2 * min(size, stop - begin)), dtype=np.uint16)


def load_corpus(
    paths: Sequence[str | Path],
    tokenizer: Any = None,
    *,
    encoding_errors: str = "strict",
    progress: Callable[[int, int], None] | None = None,
) -> Corpus:
    """Tokenise `paths` into the cache (or reuse it) and memory-map the tokens."""
    from gptmini.tokenizer import Tokenizer

    tokenizer = tokenizer or Tokenizer()
    if tokenizer.n_vocab > 2**16:
        raise UserError("the token cache stores uint16 ids; this tokenizer's vocabulary is too large")
    files = collect_files(paths)
    key = _content_key(files, tokenizer.name, encoding_errors)
    total = sum(p.stat().st_size for p in files)

    def tokenise(out: Any) -> dict[str, Any]:
        n_tokens, n_bytes = _tokenise_into(out, files, tokenizer, encoding_errors, total, progress)
        if n_bytes == 0:
            names = ", ".join(str(p) for p in files[:3]) + (" …" if len(files) > 3 else "")
            raise UserError(f"the corpus is empty ({names}); give it some text")
        return {"n_tokens": n_tokens, "n_bytes": n_bytes, "files": [str(p) for p in files]}

    path, meta = _cached_tokens(key, tokenise, required=("n_tokens", "n_bytes"))
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
    return Corpus(tokens, files, key, meta["n_bytes"], path)


def count_tokens(corpus: Corpus, stop: int | None = None) -> np.ndarray:
    """How often each GPT-2 id occurs in corpus.tokens[:stop], counted chunk by chunk."""
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    for chunk in corpus.chunks(0, stop):
        counts += np.bincount(chunk, minlength=GPT2_VOCAB_SIZE)[:GPT2_VOCAB_SIZE]
    return counts


def remap_splits(corpus: Corpus, tokenizer: Any, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of `corpus.split(val_fraction)` in `tokenizer`'s ids, as read-only uint16 memmaps.

    A compact vocabulary spells some GPT-2 tokens with several ids, so each split is mapped on its own (as
    `tokenizer.from_gpt2` on the whole split would) and they are stored one after the other, in chunks, cached by
    the corpus, the vocabulary and the split. GPT-2's own numbering needs no mapping: the corpus's own memmap.
    """
    cut = corpus.split_index(val_fraction)
    if tokenizer.vocabulary is None:
        return corpus.tokens[:cut], corpus.tokens[cut:]
    h = hashlib.sha256(f"gptmini-remap/{CACHE_FORMAT}/{corpus.key}/{cut}/".encode())
    h.update(np.asarray(tokenizer.vocabulary, dtype="<i8").tobytes())
    key = f"{corpus.key}-{h.hexdigest()[:16]}"

    def remap_part(out: Any, start: int, stop: int | None) -> int:
        n_tokens = 0
        for chunk in corpus.chunks(start, stop):
            ids = np.asarray(tokenizer.from_gpt2(chunk), dtype=np.uint16)
            out.write(ids.tobytes())
            n_tokens += len(ids)
        return n_tokens

    def remap(out: Any) -> dict[str, Any]:
        n_train = remap_part(out, 0, cut)
        n_tokens = n_train + remap_part(out, cut, None)
        return {"n_tokens": n_tokens, "n_train": n_train, "vocab_size": len(tokenizer.vocabulary)}

    path, meta = _cached_tokens(key, remap, required=("n_tokens", "n_train"))
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
    return tokens[: meta["n_train"]], tokens[meta["n_train"] :]


def _cached_tokens(
    key: str, write: Callable[[Any], dict[str, Any]], *, required: Sequence[str]
) -> tuple[Path, dict[str, Any]]:
    """The cache file `key.bin` of uint16 tokens and its metadata `key.json`; written first if missing.

    `write(file)` streams the tokens into an open temporary file and returns the metadata (with n_tokens). The
    file appears whole or not at all (fsync, then rename), and its metadata after it.
    """
    root = cache_root() / "tokens"
    bin_path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    meta = _read_meta(meta_path, required)
    if meta is not None and bin_path.exists() and bin_path.stat().st_size == 2 * meta["n_tokens"]:
        return bin_path, meta
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=root)
    except OSError as e:
        raise UserError(
            f"cannot write the token cache in {root} ({e.strerror}); set GPTMINI_CACHE_DIR to a writable directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            meta = write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)  # the metadata appears whole, after the tokens it describes
    return bin_path, meta


def _read_meta(path: Path, required: Sequence[str]) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
        return meta if all(isinstance(meta.get(name), int) for name in required) else None
    except (OSError, ValueError, AttributeError):
        return None


def _tokenise_into(
    out: Any,
    files: list[Path],
    tokenizer: Any,
    errors: str,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    n_tokens = n_bytes = done = 0
    threads = max(1, os.cpu_count() or 1)

    def emit(pieces: list[str]) -> None:
        nonlocal n_tokens
        # A piece per thread at a time: the ids come back as Python lists (~36 bytes a token), so a whole block's
        # at once would hold ~100 MB.
        for first in range(0, len(pieces), threads):
            for ids in tokenizer.encode_batch(pieces[first : first + threads], num_threads=threads):
                arr = np.asarray(ids, dtype=np.uint16)
                out.write(arr.tobytes())
                n_tokens += len(arr)

    first = True
    for path in files:
        text_seen = False
        tail = ""
        for text in _decoded_blocks(path, errors):
            if text and not text_seen:
                if not first:
                    emit_eot = np.asarray([tokenizer.eot_id], dtype=np.uint16)
                    out.write(emit_eot.tobytes())
                    n_tokens += 1
                first = False
                text_seen = True
            n_bytes += len(text.encode("utf-8"))
            pieces, tail = split_for_tokenizer(tail + text)
            if pieces:
                emit(pieces)
            done += len(text)
            if progress:
                progress(min(done, total), total)
        if tail:
            emit([tail])
    return n_tokens, n_bytes


def token_byte_lengths(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for <|endoftext|> and unused ids): the denominator of bits per byte."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, tokenizer.n_vocab)):
        if i != tokenizer.eot_id:
            lengths[i] = len(tokenizer.token_bytes(i))
    return lengths


def check_split(train: np.ndarray, val: np.ndarray, block_size: int, n_total: int) -> None:
    """A corpus must hold at least one training window and one validation window of block_size + 1 tokens."""
    need = block_size + 1
    if len(train) < need or len(val) < need:
        raise UserError(
            f"the corpus has {n_total:,} tokens ({len(train):,} train, {len(val):,} val): too short for one "
            f"training and one validation window of {need} tokens; add text, lower --block-size or raise "
            "--val-fraction"
        )


# ---- batches --------------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """What the training loop draws from: micro-batch `micro` of optimizer step `step`, as int64 (x, y) arrays.

    y holds the next token of each position, or -1 where the loss should ignore it. Must be a pure function of
    (step, micro) so that resumed runs see the same batches.
    """

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]: ...


class RandomWindows:
    """Random `block_size` windows of a token array, the same ones for a step however the run is interrupted.

    The global batch of step s (`batch_size × grad_accum × world_size` windows) is drawn from a generator seeded
    with (seed, s); rank r takes micro-batches r·grad_accum … r·grad_accum + grad_accum − 1 of it, so one process
    with accumulation and several data-parallel processes train on the same windows.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise UserError(f"need at least {block_size + 1} tokens for one window, got {len(tokens)}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self._span = np.arange(block_size + 1)

    def global_offsets(self, step: int) -> np.ndarray:
        n = self.batch_size * self.grad_accum * self.world_size
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=n)

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        first = (self.rank * self.grad_accum + micro) * self.batch_size
        offsets = self.global_offsets(step)[first : first + self.batch_size]
        rows = np.asarray(self.tokens[offsets[:, None] + self._span], dtype=np.int64)
        return rows[:, :-1], rows[:, 1:]

"""A static key/value cache: allocated once, written in place at absolute positions.

Decoding token t only needs the keys and values of tokens 0..t-1, which never change, so each layer keeps them in
a `[batch, n_head, max_len, head_dim]` buffer. Nothing grows with `torch.cat`: a step writes one slot and reads a
view, so the decode step allocates nothing that depends on the length of the text.

On the CPU the buffers are anonymous memory mappings: the operating system backs a page with memory the first time
it is written, so a server's `--parallel 16` rows of `block_size` positions cost what the rows hold, not 16 full
windows up front; `release_row` gives a finished row's pages back (they read as zeros again).
"""

from __future__ import annotations

import math
import mmap

import torch

from gptmini.config import GPTConfig


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self._maps: list[mmap.mmap] = []
        if torch.device(device).type == "cpu":
            self.k, self.v = self._mapped(shape, dtype), self._mapped(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)  # for the static decode step's mask
        self._split_layers()

    def _mapped(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeros in an anonymous mapping: no memory until a page is written."""
        count = math.prod(shape)
        size = count * torch.empty((), dtype=dtype).element_size()
        # private: a released page is dropped, not kept for others (as a shared one would be), and reads as zero
        area = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        self._maps.append(area)
        return torch.frombuffer(area, dtype=dtype, count=count).view(shape)

    def release_row(self, row: int) -> None:
        """Give row `row`'s memory back to the system (its keys and values read as zeros after)."""
        if not self._maps or not hasattr(mmap, "MADV_DONTNEED"):
            return
        layer_rows, per_row = self.k.shape[1], self.k[0, 0].nbytes
        for area in self._maps:
            for layer in range(self.k.shape[0]):
                start = (layer * layer_rows + row) * per_row
                first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the row only
                end = (start + per_row) // mmap.PAGESIZE * mmap.PAGESIZE
                if end > first:
                    area.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _split_layers(self) -> None:
        # Per-layer views made once, outside any compiled region: a compiled step that indexed `self.k[layer]`
        # itself would see one aliased input and copy the whole cache around every in-place write.
        self.k_layers = self.k.unbind(0)
        self.v_layers = self.v.unbind(0)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A cache matching `model`'s shape, dtype and device; `max_len` defaults to its context length.

        The dtype is the weights' unless the model names another in `kv_cache_dtype` (an int8 model keeps bf16
        keys and values: half the bytes to read per token at long context).
        """
        config: GPTConfig = model.config
        weight = model.transformer.wte.weight  # the head may be swapped for a quantised one
        return cls(
            config.n_layer,
            batch_size,
            config.n_head,
            max_len or config.block_size,
            config.head_dim,
            dtype=getattr(model, "kv_cache_dtype", None) or weight.dtype,
            device=weight.device,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (`[B, H, T, D]`) at positions start_pos.., return all keys/values up to the last one."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, start_pos:end] = k  # (cast to the cache's dtype if it differs)
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(
        self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new position's `k`, `v` (`[B, H, 1, D]`) per row and return the whole buffers of this layer.

        `pos` is a long tensor, so the position is data, not a shape: one element (every row at that position) or
        `B` elements (row b at pos[b], as the serving engine's rows are each at their own point in their text).
        """
        k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]
        if pos.numel() == 1:
            k_layer.index_copy_(2, pos, k.to(k_layer.dtype))
            v_layer.index_copy_(2, pos, v.to(v_layer.dtype))
        else:
            index = pos.view(-1, 1, 1, 1).expand_as(k)
            k_layer.scatter_(2, index, k.to(k_layer.dtype))
            v_layer.scatter_(2, index, v.to(v_layer.dtype))
        return k_layer, v_layer

    def view(self, rows: slice | int = slice(None), length: int | None = None) -> KVCache:
        """A cache over some rows (a slice, or one row index) and the first `length` positions of this one.

        It shares this cache's storage: what is written through the view is in this cache. The serving engine
        prefills one request into its own row, and decodes its active rows over only as many positions as the
        longest of them uses (attention then reads that much of the cache, not all of it).
        """
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        length = self.max_len if length is None else length
        out = KVCache.__new__(KVCache)
        out.k = self.k[:, rows, :, :length]
        out.v = self.v[:, rows, :, :length]
        out.positions = self.positions[:length]
        out._split_layers()
        return out

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions into row `dst` (the engine keeps its active rows packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

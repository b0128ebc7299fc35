"""The GPT: a decoder-only transformer with GPT-2's layout, so its weights interoperate with GPT-2's.

Read top to bottom:
  token ids ─▶ token embedding + position embedding ─▶ n_layer × Block ─▶ LayerNorm ─▶ LM head (tied) ─▶ logits
  Block(x) = x + Attention(LN(x)), then x + MLP(LN(x))           (pre-LayerNorm residual blocks)
  Attention = softmax(Q·Kᵀ/√d_k + causal mask)·V over n_head heads, projected back to n_embd

`arch="modern"` (opt-in, `gptmini train --arch modern`) changes four things and keeps the rest: rotary position
embeddings on Q and K instead of a learned table, QK-norm (RMSNorm of each head's queries and keys), ReLU² in the
MLP, the projections that write into the residual stream initialised to zero, and no biases anywhere. The KV cache
then holds keys rotated at their absolute positions; a window slide re-prefills at positions 0.., as for GPT-2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptmini.config import GPTConfig
from gptmini.kv_cache import KVCache


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d_k + mask)·V through SDPA, with one CPU exception.

    On a CPU, SDPA in bf16 is slower than in fp32: decoding reads a long KV cache about 7× slower (12 heads × 850
    keys: 0.64 vs 0.09 ms), and a training step's forward + backward takes 26 vs 18 ms per layer at batch 8 ×
    256 tokens, upcast included. So bf16 / fp16 attention (or fp32 queries over an int8 model's bf16 cache) runs in
    fp32 there (autocast would cast it back).
    """
    low = (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and (q.dtype in low or k.dtype in low):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx
        self.dropout = config.attention_dropout_p
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # Q, K, V in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.arch == "modern"
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)
        # When set, forward and decode also compute the attention probabilities explicitly and keep them here.
        self.keep_attention = False
        self.attention: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0, rope: Rope | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:
            q, k = self.position(q, k, rope)

        mask = None
        is_causal = True
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
            if T == 1:
                is_causal = False  # one new query may see every cached key
            elif start_pos > 0:
                # T new queries after start_pos cached keys: query i sees keys 0..start_pos+i. SDPA's is_causal
                # aligns the triangle top-left, which is wrong here, so the mask is explicit.
                is_causal = False
                mask = causal_mask(T, start_pos, x.device)

        if self.keep_attention:
            self.attention = attention_probs(q, k, start_pos if cache is not None else 0)
        y = attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode(
        self, x: torch.Tensor, cache: KVCache, pos: torch.Tensor, mask: torch.Tensor, rope: Rope | None = None
    ) -> torch.Tensor:
        """One new token per row (`[B, 1, C]`) at position `pos`, attending over the whole cache through `mask`.

        Every shape is the same at every position, so one compiled graph (or CUDA graph) serves them all.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:
            q, k = self.position(q, k, rope)
        keys, values = cache.write_at(self.layer_idx, pos, k, v)
        if self.keep_attention:  # a Python check: no cost, and no other graph, when off
            self.attention = attention_probs(q, keys, allowed=mask)
        y = attend(q, keys, values, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def position(self, q: torch.Tensor, k: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The modern block's queries and keys: normalised per head (QK-norm), then rotated to their positions.

        Both in fp32, the norms' weights too (a bf16 weight against an fp32 input made PyTorch warn of a dtype
        mismatch on every call), back in the input's dtype.
        """
        dtype = q.dtype
        q = rotate(_rms_norm_fp32(self.q_norm, q), rope).to(dtype)
        return q, rotate(_rms_norm_fp32(self.k_norm, k), rope).to(dtype)


def _rms_norm_fp32(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)


# (cos, sin) of each position's rotation angles, `[..., T, head_dim/2]`, broadcast over batch and heads.
Rope = tuple[torch.Tensor, torch.Tensor]


def rotary_table(n_positions: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """`[n_positions, 2, head_dim/2]`: cos and sin of p·base^(−2i/head_dim) (RoFormer), computed in float64."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq
    return torch.stack((angles.cos(), angles.sin()), dim=1).float()


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) of the last dimension by its position's angle."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_mask(n_query: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """Boolean `[n_query, start_pos + n_query]` mask: query i (at absolute position start_pos+i) sees keys ≤ it."""
    query_pos = torch.arange(start_pos, start_pos + n_query, device=device)
    key_pos = torch.arange(start_pos + n_query, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, start_pos: int = 0, *, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d_k) in fp32 under the causal mask (or the boolean mask `allowed`, as the decode step's),
    spelled out: the weights SDPA uses but never shows."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is None:
        allowed = causal_mask(q.shape[2], start_pos, q.device)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    """Position-wise feed-forward network: n_embd → 4·n_embd → GELU (tanh form, as GPT-2) → n_embd."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.arch == "modern"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0, rope: Rope | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start_pos, rope)
        return x + self.mlp(self.ln_2(x))

    def decode(
        self, x: torch.Tensor, cache: KVCache, pos: torch.Tensor, mask: torch.Tensor, rope: Rope | None = None
    ) -> torch.Tensor:
        x = x + self.attn.decode(self.ln_1(x), cache, pos, mask, rope)
        return x + self.mlp(self.ln_2(x))


@contextlib.contextmanager
def _skip_reset_parameters() -> Iterator[None]:
    """Within: nn.Linear / nn.Embedding / nn.LayerNorm constructors leave their weights uninitialised."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
    saved = {c: c.reset_parameters for c in classes}
    for c in classes:
        c.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for c, reset in saved.items():
            c.reset_parameters = reset


def sinusoidal_table(n_positions: int, n_embd: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": PE[p, 2i] = sin(p/10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, init_weights: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            # A fixed table, not a parameter: rebuilt from the config, never saved.
            self.register_buffer("pos_table", self._position_table(), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix embeds and un-embeds

        if init_weights:
            self._init_gpt2()

    def _init_gpt2(self) -> None:
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/√(2·n_layer), so its variance
        # does not grow with depth (two residual additions per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
                if self.config.arch == "modern":  # each block starts as the identity
                    nn.init.zeros_(p)

    def _position_table(self) -> torch.Tensor:
        c = self.config
        if c.pos_embedding == "rotary":
            return rotary_table(c.block_size, c.head_dim)
        return sinusoidal_table(c.block_size, c.n_embd)

    def _rope(self, at: slice | torch.Tensor) -> Rope | None:
        """The rotations of positions `at` (a slice: `[T, D/2]`; a `[B]` tensor: `[B, 1, 1, D/2]`), None for GPT-2."""
        if self.config.pos_embedding != "rotary":
            return None
        if isinstance(at, slice):
            table = self.pos_table[at]
            return table[:, 0], table[:, 1]
        table = self.pos_table.index_select(0, at)[:, None, None]
        return table[..., 0, :], table[..., 1, :]

    @classmethod
    def skeleton(
        cls, config: GPTConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> GPT:
        """A model with uninitialised weights, for loading into: skips the random init (seconds for GPT-2)."""
        # Allocate uninitialised weights in place: the modules' own random init is skipped too, since running it
        # even on the meta device imports torch's decompositions (~1 s of a cold `gptmini generate`).
        with _skip_reset_parameters(), torch.device(device):
            model = cls(config, init_weights=False)
        model = model.to(dtype)
        if config.pos_embedding != "learned":  # kept in fp32 whatever the weights' dtype
            model.pos_table = model._position_table().to(device)
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- forward -------------------------------------------------------------------------------------------

    def hidden_states(
        self, idx: torch.Tensor, *, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Final-LayerNorm output `[B, T, n_embd]` for tokens at absolute positions start_pos..start_pos+T-1."""
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed the context length {self.config.block_size}"
            )
        tok = self.transformer.wte(idx)
        rope = self._rope(slice(start_pos, start_pos + T))
        if self.config.pos_embedding == "learned":
            x = tok + self.transformer.wpe.weight[start_pos : start_pos + T]
        elif rope is None:
            x = tok + self.pos_table[start_pos : start_pos + T].to(tok.dtype)
        else:  # rotary: positions enter through the queries and keys
            x = tok
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, start_pos, rope)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the real vocabulary: padding rows are computed (aligned matmul) but cut off."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `[B, T, vocab]` (or `[B, 1, vocab]` with `last_only`) and, given targets, the mean cross-entropy.

        With a cache, only the new tokens `idx` are run; their keys/values are stored at start_pos.. and attention
        reads everything cached before them. Targets equal to -1 are ignored by the loss.
        """
        hidden = self.hidden_states(idx, cache=cache, start_pos=start_pos)
        if last_only:
            hidden = hidden[:, -1:]
        logits = self.logits(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits `[B, vocab]` of one token per row (`idx` `[B, 1]`) at position `pos`.

        The static-shape twin of `forward(idx, cache=cache, start_pos=pos)`: K/V are written at `pos` and attention
        reads the whole preallocated cache, masked beyond `pos`, so nothing depends on the position's value and the
        step compiles once. Positions past `pos` may hold stale keys from before a window slide; the mask hides them.
        `pos` is a 0-d long tensor (every row at one position) or `[B]` (row b at pos[b]: the serving engine's
        continuous batch, where each request is at its own point in its text).
        """
        tok = self.transformer.wte(idx)
        at = pos.reshape(-1)  # [1] or [B]
        rope = self._rope(at)
        if self.config.pos_embedding == "learned":
            x = tok + self.transformer.wpe(at)[:, None]
        elif rope is None:
            x = tok + self.pos_table.index_select(0, at)[:, None].to(tok.dtype)
        else:
            x = tok
        # [1 or B, 1, 1, max_len] bool: row b sees keys 0..pos[b] (broadcast over heads and the one query)
        mask = (cache.positions <= at[:, None])[:, None, None, :]
        for block in self.transformer.h:
            x = block.decode(x, cache, at, mask, rope)
        return self.logits(self.transformer.ln_f(x))[:, 0]

    @contextlib.contextmanager
    def keeping_attention(self) -> Iterator[list[CausalSelfAttention]]:
        """Within: every layer also computes its attention probabilities (fp32) and keeps them in `.attention`."""
        layers = [block.attn for block in self.transformer.h]
        for layer in layers:
            layer.keep_attention = True
        try:
            yield layers
        finally:
            for layer in layers:
                layer.keep_attention = False
                layer.attention = None

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every layer, each `[B, n_head, T, T]` (row = query, column = key)."""
        with self.keeping_attention() as layers:
            self.hidden_states(idx)
            return [layer.attention for layer in layers]

    # ---- counting ------------------------------------------------------------------------------------------

    def num_params(self) -> dict[str, int]:
        """Parameters by component; padding rows of the embedding are not counted (they are never used)."""
        c = self.config
        token = c.vocab_size * c.n_embd
        position = c.block_size * c.n_embd if c.pos_embedding == "learned" else 0
        is_norm = lambda m: isinstance(m, (nn.LayerNorm, nn.RMSNorm))  # noqa: E731
        attention = sum(
            p.numel()
            for b in self.transformer.h
            for m in b.attn.modules()
            if not is_norm(m)
            for p in m.parameters(False)
        )
        mlp = sum(p.numel() for b in self.transformer.h for p in b.mlp.parameters())
        norms = sum(p.numel() for m in self.modules() if is_norm(m) for p in m.parameters())
        total = token + position + attention + mlp + norms
        return dict(
            token_embedding=token,
            position_embedding=position,
            attention=attention,
            mlp=mlp,
            layer_norm=norms,
            total=total,
            non_embedding=total - token - position,
        )

    def flops_per_token(self, *, training: bool = False, context: int | None = None) -> int:
        """Matmul FLOPs per token at `context` (default block_size): 2·N + 4·L·T·C forward, ×3 for training.

        N counts the weights each token multiplies through (blocks + LM head; embeddings are lookups), and
        4·L·T·C the attention scores and weighted sum over T keys (the PaLM/nanoGPT convention).
        """
        c = self.config
        counts = self.num_params()
        n_matmul = counts["non_embedding"] - counts["layer_norm"] + c.vocab_size * c.n_embd
        forward = 2 * n_matmul + 4 * c.n_layer * (context or c.block_size) * c.n_embd
        return 3 * forward if training else forward

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        element = torch.empty((), dtype=dtype or self.lm_head.weight.dtype).element_size()
        return 2 * self.config.n_layer * self.config.n_embd * element

    def summary(self) -> dict[str, dict[str, int | float | str | bool]]:
        """Parameters by component, per-token costs and the config, for `gptmini info`."""
        c = self.config
        return {
            "parameters": self.num_params(),
            "cost": {
                "forward_flops_per_token_at_full_context": self.flops_per_token(),
                "training_flops_per_token": self.flops_per_token(training=True),
                "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token(),
                "kv_cache_bytes_at_full_context": self.kv_cache_bytes_per_token() * c.block_size,
                "weight_bytes": sum(p.numel() * p.element_size() for p in self.parameters()),
            },
            "config": {**c.describe(), "padded_vocab_size": c.padded_vocab_size},
        }

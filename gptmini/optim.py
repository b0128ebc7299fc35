"""The optimizers: AdamW, or Muon for the blocks' weight matrices with AdamW for the rest (the default).

Muon (Keller Jordan, 2024) keeps a Nesterov momentum of each matrix's gradient and steps along its orthogonalised
version (U·Vᵀ of the momentum's SVD, approximated by five Newton–Schulz iterations): every direction of the matrix
moves by the same amount, instead of the few directions that dominate the raw gradient. Embeddings, the tied LM
head and the vectors (biases, LayerNorm gains) are not hidden-layer matrices and stay on AdamW. The update is scaled
by 0.2·√max(rows, cols) so its RMS matches AdamW's (Moonshot, "Muon is Scalable for LLM Training"): the same lr and
weight decay serve both. On the shipped corpus Muon reached in 1,200 steps what AdamW reached in ~2,300.

The Newton–Schulz iterations run in bf16 (as in the reference) when training computes in bf16, and in fp32 when it
computes in fp32: an fp32 run is fp32 throughout, so data-parallel ranks agree with one process to float rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from gptmini.config import TrainConfig

# Quintic Newton–Schulz coefficients chosen to maximise the slope at zero (Keller Jordan's Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# `--optimizer auto` takes Muon while its Newton–Schulz iterations cost at most this fraction of a step's forward and
# backward FLOPs (`newton_schulz_cost`). The shipped model's shape, 4 × 192 with 8 × 256 tokens a step, costs 0.22
# (Muon reached in 1,200 steps what AdamW reached in ~2,300); 4 × 256 with 8 × 256 tokens, 0.09; GPT-2 small with
# 4 × 64 tokens, 7.9, where a Muon step took 5.2 s against AdamW's 0.97 s (2-core Zen 4, issue 32).
MUON_MAX_COST = 1.0


def newton_schulz_cost(model: nn.Module, tokens_per_step: int, ns_steps: int = 5) -> float:
    """Muon's Newton–Schulz FLOPs per step over the model's training FLOPs per step (forward and backward).

    Per iteration on an m × n matrix (m ≤ n): A = X·Xᵀ (2m²n), A² (2m³), (bA + cA²)·X (2m²n)."""
    ns = 0.0
    for name, p in model.named_parameters():
        if p.dim() == 2 and is_hidden_matrix(name):
            m, n = sorted(p.shape)
            ns += ns_steps * (4 * m * m * n + 2 * m**3)
    return ns / (model.flops_per_token(training=True) * tokens_per_step)


def choose_optimizer(model: nn.Module, tokens_per_step: int) -> tuple[str, float]:
    """`--optimizer auto`: ("muon" or "adamw", Newton–Schulz's cost as a fraction of the step's)."""
    cost = newton_schulz_cost(model, tokens_per_step)
    return ("muon" if cost <= MUON_MAX_COST else "adamw"), cost


def make_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device, *, dtype: torch.dtype
) -> torch.optim.Optimizer:
    """`config.optimizer` over the model's trainable parameters; weight decay on matrices only.

    `dtype` is the training compute dtype (`devices.resolve_train_dtype`): Muon orthogonalises in fp32 for an fp32
    run, in bf16 otherwise.
    """
    if config.optimizer == "auto":
        raise ValueError("--optimizer auto is decided from the run's shapes first (gptmini.train does it)")
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "muon":
        hidden = [p for name, p in params if p.dim() == 2 and is_hidden_matrix(name)]
        taken = {id(p) for p in hidden}
        rest = [p for _, p in params if id(p) not in taken]
        return MuonAdamW(
            hidden,
            decay_groups(rest, config.weight_decay),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
            ns_dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16,
        )
    kwargs: dict[str, Any] = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)
    groups = decay_groups([p for _, p in params], config.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def is_hidden_matrix(name: str) -> bool:
    """A transformer block's weight matrix (attention and MLP), not an embedding or the LM head."""
    return ".h." in f".{name}" and name.endswith(".weight")


def decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Matrices decay, vectors (biases, LayerNorm gains) do not."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def orthogonalize(
    matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """≈ U·Vᵀ of `matrix`'s SVD by quintic Newton–Schulz iterations in `dtype` (singular values end near 1, ±0.5).

    `matrix` may be a stack (…, rows, cols) of same-shape matrices: each is orthogonalised on its own, in one
    batched product per iteration instead of one per matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    # spectral norm ≤ Frobenius norm ≤ 1: inside the iteration's basin
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # one matrix or a stack: a batch for bmm either way
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x if wide else x.mT


class MuonAdamW(torch.optim.Optimizer):
    """Muon for `hidden` matrices, AdamW for `adamw_groups`, in one optimizer: one lr per group to schedule, one
    state dict to save and resume.
    """

    def __init__(
        self,
        hidden: list[torch.Tensor],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        groups = [{"params": hidden, "muon": True, "weight_decay": weight_decay}]
        groups += [{**group, "muon": False} for group in adamw_groups]
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0)
        super().__init__([g for g in groups if g["params"]], defaults)
        # Not a group setting: it follows this run's compute dtype, and is not saved with the optimizer's state.
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW
            if group["muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    self._adamw(p, p.grad, self.state[p], group)

    def _muon(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Each matrix steps along its orthogonalised Nesterov momentum; same-shape matrices orthogonalise together."""
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(buffers, grads, 1.0 - group["momentum"])
        nesterov = torch._foreach_lerp(grads, buffers, group["momentum"])
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, members in by_shape.items():
            updates = orthogonalize(
                torch.stack([nesterov[i] for i in members]), group["ns_steps"], dtype=self.ns_dtype
            )
            scale = -group["lr"] * 0.2 * math.sqrt(max(shape))
            for update, i in zip(updates, members, strict=True):
                params[i].add_(update.to(params[i].dtype), alpha=scale)

    @staticmethod
    def _adamw(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1.0 - beta1**t))


class WeightEMA:
    """An fp32 exponential moving average of a model's parameters, updated after each optimizer step.

    Update n (0-based) moves the average towards the new weights by 1 − d_n, with d_n = min(decay, n / (n + 10)):
    the first update copies the weights (the random init never counts) and the average's horizon grows with the
    run (≈ n/10 steps) until it reaches 1 / (1 − decay), so a short run is not dominated by its first steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def rate(self) -> float:
        """The weight the next update keeps on the average so far (d_n above)."""
        return min(self.decay, self.updates / (self.updates + 10))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1.0 - self.rate())
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within: the model holds the average (evaluation, best/); its own weights come back after."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    def state_dict(self) -> dict[str, Any]:
        """The count, and the live weights: a run saves the average as its model (see `restore_live_weights`)."""
        live = {name: p.detach().float().clone() for name, p in zip(self.names, self.params, strict=True)}
        return {"decay": self.decay, "updates": self.updates, "live": live}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved run: the model holds the saved average (this EMA's start); the live weights return."""
        self.updates = int(state["updates"])
        restore_live_weights(dict(zip(self.names, self.params, strict=True)), state)


def restore_live_weights(params: dict[str, torch.Tensor], ema_state: dict[str, Any]) -> None:
    """Copy the live weights of a saved EMA state into `params` (name → parameter)."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ema_state["live"][name])

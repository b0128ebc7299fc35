"""Training under torchrun: the process group, data-parallel and FSDP helpers, and evaluation split over ranks.

`Distributed` is the one object the loop asks about ranks: who writes files, how values agree across ranks, when
to wait for rank 0. In one process (no torchrun) it is a no-op everywhere, so the loop has no separate code path.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from gptmini.devices import autocast
from gptmini.errors import UserError
from gptmini.evaluate import EvalResult, eval_windows, evenly_spaced, window_batch
from gptmini.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from gptmini.model import GPT

# A collective that waits longer than this fails instead of hanging (e.g. a rank lost on another node).
DIST_TIMEOUT = timedelta(minutes=10)
# Rank 0 alone tokenises a new corpus while the others wait: that may take hours for a large one.
DATA_TIMEOUT = timedelta(hours=24)
# How gloo's collectives fail when another rank has died: that rank shows its own error, this one stops quietly.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


_started_group = False  # gptmini started the default process group (once per process)


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class RankFailed(UserError):
    """Under torchrun: another rank failed first and printed why; this one stops without repeating it."""

    already_reported = True

    def __init__(self) -> None:
        super().__init__("another rank failed (its error is shown by that rank)")


@dataclass
class Distributed:
    """Data parallelism under torchrun: each rank trains on its slice of every global batch (see RandomWindows),
    DDP (or FSDP) averages the gradients, and only rank 0 writes files or reports.

    The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR…): NCCL on CUDA, gloo on
    CPU. Started here, it ends at once on an error (the other ranks' collectives fail instead of waiting) and
    otherwise when the process exits: it cannot be started again in the same process (torchrun's store already
    holds its keys), and another `train()` in this process reuses it.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # gptmini started the default process group (a caller's own group is left alone)
    data_group: Any = None  # gloo, long timeout: the others wait here while rank 0 tokenises

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        global _started_group
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=DIST_TIMEOUT)
            _started_group = True
            atexit.register(_end_process_group)
        data_group = dist.new_group(backend="gloo", timeout=DATA_TIMEOUT)
        return cls(rank, local, world, _started_group, data_group)

    def close(self, *, failed: bool = False) -> None:
        """End this run's data group and, after a failure, the process group gptmini started."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if failed and self.owns_group:
            _end_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group(self.data_group)

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def reduce(self, values: list[float], device: torch.device, op: str = "mean") -> list[float]:
        """The mean, sum or max of `values` over all ranks, so every rank takes the same decisions."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= self.world_size
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first (checks, tokenising into the cache), then on the others (which find the
        cache filled). If a rank fails, the others stop too, quietly (`RankFailed`): the error is shown once."""
        if not self.enabled:
            yield
            return
        if not self.is_main and self._any_failed(False):  # rank 0 failed
            raise RankFailed()
        try:
            yield
        except BaseException:
            self._any_failed(True)
            raise
        if self.is_main:
            self._any_failed(False)  # the others are waiting for rank 0
        if self._any_failed(False):  # all ranks are through: did any of them fail?
            raise RankFailed()

    def _any_failed(self, failed: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([float(failed)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.data_group)
        return bool(t.item())


def shard(loss_model: nn.Module, device: torch.device, world_size: int) -> None:
    """FSDP2 over all ranks: each Block is one unit (its whole weights exist only while it runs); the root holds
    the rest (embeddings, final LayerNorm, the tied LM head). Moves this rank's shards to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in loss_model.module.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(loss_model, mesh=mesh)


def full_state(
    gpt: GPT, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The unsharded weights and optimizer state of an FSDP model, on rank 0's CPU (empty on the others).

    A collective: every rank must call it. The optimizer state is keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(gpt, options=options)
    if optimizer is None:
        return weights, None
    return weights, get_optimizer_state_dict(gpt, optimizer, options=options)


def load_optimizer_state(
    gpt: GPT, optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, fsdp: bool
) -> None:
    """Restore a saved optimizer state, whichever way it was saved (`optimizer.state_dict()` keys parameters by
    position, FSDP's full state by name), so a run can resume with or without --fsdp, on any number of ranks."""
    names = {id(p): name for name, p in gpt.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = any(isinstance(p, str) for group in saved["param_groups"] for p in group["params"])
    if not fsdp:
        if by_name:
            index = {name: i for i, name in enumerate(order)}
            saved = _rekey_optimizer_state(saved, index.__getitem__)
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:
        saved = _rekey_optimizer_state(saved, order.__getitem__)
    # Every rank holds the whole state (read from train_state.pt) and keeps its own shard of it.
    set_optimizer_state_dict(gpt, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def _rekey_optimizer_state(saved: dict[str, Any], key: Callable[[Any], Any]) -> dict[str, Any]:
    return {
        "state": {key(k): v for k, v in saved["state"].items()},
        "param_groups": [{**g, "params": [key(p) for p in g["params"]]} for g in saved["param_groups"]],
    }


@torch.no_grad()
def evaluate_sharded(
    loss_model: nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    max_windows: int | None,
    device: torch.device,
    dtype: torch.dtype,
    dist: Distributed,
    lockstep: bool = False,
) -> EvalResult:
    """`evaluate_tokens` split over the ranks: the same windows in batches of `batch_size`, batch i scored on rank
    i mod N, the sums added up over the ranks, so the figures are one process's (up to float rounding).

    `lockstep` (FSDP: every forward gathers weights from all ranks) makes every rank run the same number of
    forwards, the short ones padding with a batch that scores nothing.
    """
    windows = evenly_spaced(eval_windows(len(tokens), block_size), max_windows)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    mine = batches[dist.rank :: dist.world_size]
    rounds = -(-len(batches) // dist.world_size) if lockstep else len(mine)
    loss_sum, n_scored, n_bytes = 0.0, 0, 0
    was_training = loss_model.training
    loss_model.eval()
    try:
        for i in range(rounds):
            group = mine[i] if i < len(mine) else [(0, 1, 1)]  # one input token, no target
            x, y = window_batch(tokens, group)
            scored = y[y != IGNORE_INDEX]
            with autocast(device, dtype):
                total, _ = loss_model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            loss_sum += float(total)
            n_scored += scored.size
            n_bytes += int(token_bytes[scored].sum())
    finally:
        loss_model.train(was_training)
    return EvalResult.from_sums(*dist.reduce([loss_sum, n_scored, n_bytes], device, op="sum"))


@contextlib.contextmanager
def gradient_sync(loss_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward averages gradients across ranks (DDP, FSDP) only if `enabled`; a no-op in one process."""
    if enabled:
        yield
    elif hasattr(loss_model, "no_sync"):  # DDP
        with loss_model.no_sync():
            yield
    elif hasattr(loss_model, "set_requires_gradient_sync"):  # FSDP2: keeps unsharded gradients until then
        loss_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            loss_model.set_requires_gradient_sync(True)
    else:
        yield

"""What one process needs to know about the others: who it is, and agreement with them.

Under torchrun/accelerate every rank runs the same code. A decision that leads to a collective (save,
stop, evaluate one more batch) must come out the same on every rank, or the ranks that decided
differently wait for each other until the NCCL timeout: on a rented 12-GPU cluster, the most
expensive bug there is. These helpers make such decisions explicit, with one small collective each,
and are no-ops in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

from multitune.errors import UserError

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_distributed() -> bool:
    return world_size() > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def node_print(message: str) -> None:
    """Print once per node: for what each node finds on its own disk (every rank would repeat it)."""
    if local_rank() == 0:
        print(message, flush=True)


def main_print(message: str) -> None:
    """Print once per job."""
    if rank() == 0:
        print(message, flush=True)


def _device() -> torch.device:
    dist = _dist()
    if dist and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The largest of every rank's value: one all_reduce."""
    dist = _dist()
    if not dist:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one."""
    return bool(max_over_ranks(int(flag)))


def all_gather(obj: T) -> list[T]:
    """Every rank's object (picklable), in rank order."""
    dist = _dist()
    if not dist:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checked(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; a UserError on any rank is raised on all (one all_gather of the outcome).

    A rank that raised alone would leave the others waiting in their next collective (with node-local
    run directories or data, ranks can see different files).
    """
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, str(e)
    errors = [(r, msg) for r, msg in enumerate(all_gather(error)) if msg is not None]
    if errors:
        r, msg = errors[0]
        raise UserError(error if error is not None else f"rank {r} refused: {msg}")
    return result


def gather_checked(fn: Callable[[], T]) -> list[T]:
    """Every rank's result of ``fn`` (see :func:`checked`), in rank order."""
    return all_gather(checked(fn))

"""torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), read and checked in one place.

Kept apart from :mod:`vig_pyg.train.distributed` so that the command line can tell its rank without
importing the training code.
"""

from __future__ import annotations

import os

__all__ = ["env_rank", "torchrun_env"]


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a number; torchrun sets {name} (unset it to train in one process)"
        ) from None
    if value < 0:
        raise ValueError(
            f"{name}={value} is negative; torchrun sets {name} (unset it to train in one process)"
        )
    return value


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment, checked."""
    world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if world is None:
        if rank:
            raise ValueError(
                f"RANK={rank} is set but WORLD_SIZE is not: start distributed training with torchrun (which "
                "sets both), or unset RANK"
            )
        return 0, 0, 1
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world}: it must be at least 1 (torchrun sets it)")
    rank = rank or 0
    if rank >= world:
        raise ValueError(
            f"RANK={rank} is not below WORLD_SIZE={world}; start distributed training with torchrun"
        )
    return rank, local or 0, world


def env_rank() -> int:
    """This process's rank under torchrun (0 alone, or when the environment is malformed)."""
    try:
        return torchrun_env()[0]
    except ValueError:
        return 0

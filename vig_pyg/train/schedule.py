"""The learning-rate schedule: linear warm-up, then a cosine decay, set every optimizer step."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

__all__ = ["WarmupCosine"]


class WarmupCosine:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine down to ``min_lr``.

    The only state is the step count, so a resumed run continues the same curve; the total length comes
    from the (possibly changed) configuration.

    Args:
        optimizer: its param groups' ``lr`` are set on every :meth:`step`.
        base_lr: peak learning rate.
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of the linear warm-up.
        min_lr: the final learning rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        self.optimizer, self.base_lr, self.min_lr = optimizer, base_lr, min_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, min(warmup_steps, self.total_steps - 1))
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        """Call after each optimizer step."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

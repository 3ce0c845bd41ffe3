"""Everything a run needs to go on where it stopped: `TrainState`.

A checkpoint is ``TrainState.to_checkpoint(...)``: model, optimizer, scheduler and EMA states,
the position to resume at (epoch, step-in-epoch; step 0 = start of that epoch), the partial
sums of an interrupted epoch, the history, the early-stopping counters, and (added by
`CheckpointHandler.save`) the RNG states. `TrainState.restore` puts one back, RNG included, so
a resumed run retraces the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .checkpoint import set_rng_state
from .ema import ExponentialMovingAverage

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """The mutable state of a run.

    `partial` holds the sums of an epoch interrupted by a step checkpoint (loss_sum, loss_n,
    train_sums, elapsed s, stage_two_applied); it is consumed when that epoch resumes.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    ema: Optional[ExponentialMovingAverage] = None
    epoch: int = 0
    step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: float = math.inf
    since_best: int = 0
    finished: bool = False
    stopped_by: str = ""
    partial: Dict[str, Any] = field(default_factory=dict)

    def to_checkpoint(self, **extra: Any) -> Dict[str, Any]:
        """The checkpoint payload (without epoch/step and RNG, which `CheckpointHandler.save`
        adds); `extra` (config, statistics, splits, finished, partial, ...) is merged in."""
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                   "ema": self.ema.state_dict() if self.ema is not None else None,
                   "best_metric": self.best, "since_best": self.since_best, "history": self.history}
        payload.update(extra)
        return payload

    def restore(self, checkpoint: Dict[str, Any], warn: Any = None) -> None:
        """Load a checkpoint into this state (weights, optimizer, scheduler, EMA, counters,
        RNG). `warn(msg)` is told when the checkpoint has no EMA state for an EMA run."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint.get("scheduler") is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None:
            if checkpoint.get("ema") is None:
                if warn is not None:
                    warn("checkpoint has no EMA state: EMA restarts from the current weights")
            else:
                self.ema.load_state_dict(checkpoint["ema"])
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        self.history = list(checkpoint.get("history", []))
        self.best = float(checkpoint.get("best_metric", math.inf))
        self.since_best = int(checkpoint.get("since_best", 0))
        self.finished = bool(checkpoint.get("finished", False))
        self.stopped_by = str(checkpoint.get("stopped_by", "epochs"))
        self.partial = checkpoint.get("partial") or {}
        set_rng_state(checkpoint["rng"])

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any = None, ema: Optional[ExponentialMovingAverage] = None,
                        warn: Any = None) -> "TrainState":
        """A state built around freshly made objects and filled from `checkpoint`."""
        state = cls(model, optimizer, scheduler, ema)
        state.restore(checkpoint, warn)
        return state

    @property
    def last_stage(self) -> int:
        """The stage of the last finished epoch (1 before any)."""
        return int(self.history[-1].get("stage", 1)) if self.history else 1

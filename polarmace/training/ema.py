"""Exponential moving average of model parameters, with its state in the checkpoint.

    shadow ← d·shadow + (1 − d)·param,   d = min(decay, (1 + n)/(10 + n))   (n = updates so far)

The warm-up (``use_num_updates``) keeps the first averages close to the current weights. The
shadow copies, the update count and the decay are in :meth:`state_dict`, so a resumed run
continues the same average (the reference tools lose it on restart). Evaluation swaps the
averaged weights in with :meth:`average_parameters` and puts the training weights back after.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class ExponentialMovingAverage:
    def __init__(self, model: torch.nn.Module, decay: float, use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.use_num_updates = use_num_updates
        self.num_updates = 0
        self._names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow: Dict[str, torch.Tensor] = {n: params[n].detach().clone() for n in self._names}

    def _params(self, model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise KeyError(f"EMA parameters missing from the model: {missing[:5]}")
        return params

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.decay
        self.num_updates += 1
        if self.use_num_updates:
            decay = min(decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        params = self._params(model)
        for n in self._names:
            s = self.shadow[n]
            s.mul_(decay).add_(params[n].detach(), alpha=1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = self._params(model)
        for n in self._names:
            params[n].copy_(self.shadow[n])

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into `model` (restored on exit)."""
        params = self._params(model)
        backup = {n: params[n].detach().clone() for n in self._names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self._names:
                    params[n].copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "use_num_updates": self.use_num_updates,
                "num_updates": self.num_updates,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self._names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.use_num_updates = bool(state.get("use_num_updates", True))
        self.num_updates = int(state["num_updates"])
        for n in self._names:
            self.shadow[n] = state["shadow"][n].detach().clone().to(self.shadow[n].device)

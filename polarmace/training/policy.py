"""Training policy, from the typed `TrainingConfig`: optimiser and scheduler factories, the
loss weights of each stage, when stage two starts (by epoch or by time), the time budget, and
which changed ``training.*`` keys a resumed run applies."""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from polarmace.config import Config, TrainingConfig

from .ema import ExponentialMovingAverage

log = logging.getLogger("polarmace.training")

__all__ = ["training_config", "build_optimizer", "build_scheduler", "stage_two_time", "training_time",
           "stage_of", "stage_weights", "current_lr", "can_continue", "RESUME_APPLIED", "RESUME_IGNORED",
           "resume_training_section", "apply_training_changes"]


def training_config(section: Mapping[str, Any]) -> TrainingConfig:
    """The typed, checked `TrainingConfig` of a plain ``training`` dict (a checkpoint's)."""
    return Config.from_dict({"training": dict(section)}).training


# ============================================================================ factories
def build_optimizer(model: torch.nn.Module, tc: TrainingConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters (lr, weight_decay, amsgrad from `tc`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tc.optimizer]
    return cls(params, lr=float(tc.lr), weight_decay=float(tc.weight_decay or 0.0), amsgrad=bool(tc.amsgrad))


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainingConfig, epochs: int) -> Any:
    """plateau: ReduceLROnPlateau(lr_factor, scheduler_patience, min_lr) stepped on the
    validation loss at every evaluation; cosine: CosineAnnealingLR(T_max=epochs, eta_min=min_lr)
    stepped every epoch; None: constant lr."""
    if tc.scheduler is None:
        return None
    min_lr = float(tc.min_lr or 0.0)
    if tc.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(tc.lr_factor), patience=int(tc.scheduler_patience), min_lr=min_lr)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1), eta_min=min_lr)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ============================================================================== stages
def stage_two_time(tc: TrainingConfig) -> Optional[float]:
    """Training time (s) after which stage two starts: stage_two.start_fraction × max_time when
    both are set (and no start_epoch), else None."""
    st = tc.stage_two
    if tc.max_time is None or st.start_fraction is None or st.start_epoch is not None:
        return None
    return float(st.start_fraction) * float(tc.max_time)


def training_time(history: Sequence[Mapping[str, Any]]) -> float:
    """Training wall time so far (s): the sum of the epoch times (steps + validation) in the
    history, which checkpoints carry, so it survives resumes."""
    return float(sum(float(row.get("time_s", 0.0)) for row in history))


def stage_of(tc: TrainingConfig, epochs: int, epoch: int, elapsed: float) -> int:
    """The stage (1 or 2) of 0-based `epoch` of a run of `epochs`, after `elapsed` s of training:
    stage two from stage_two's start epoch, or once stage_two_time has passed."""
    start = tc.stage_two.resolve_start(epochs)
    start_time = stage_two_time(tc)
    if (start is not None and epoch >= start) or (start_time is not None and elapsed >= start_time):
        return 2
    return 1


def stage_weights(tc: TrainingConfig, stage: int) -> Dict[str, float]:
    """Loss weight of every term in `stage`: training.loss_weights (unset terms at their
    defaults), and in stage two the energy and forces weights of training.stage_two."""
    weights = tc.loss_weights.resolved()
    if stage == 2:
        weights["energy"] = float(tc.stage_two.energy_weight)
        weights["forces"] = float(tc.stage_two.forces_weight)
    return weights


def can_continue(stopped_by: str, epochs: int, max_time: Optional[float], start_epoch: int,
                 history: List[Dict[str, Any]]) -> bool:
    """Whether a run that finished may go on: its epoch or time limit was raised on resume.
    Early stopping (patience) stays final."""
    if stopped_by == "patience" or start_epoch >= epochs:
        return False
    if stopped_by == "time":
        return max_time is None or training_time(history) < max_time
    return True


# ============================================================================== resume
#: training.* keys a resumed run takes from the new config; the others keep the checkpoint's value
#: (the restored optimizer/scheduler state and RNG streams are built for it).
RESUME_APPLIED = ("epochs", "lr", "weight_decay", "lr_factor", "scheduler_patience", "min_lr", "loss_weights",
                  "ema_decay", "stage_two", "clip_grad", "patience", "device", "eval_interval", "max_time",
                  "electrostatics_accuracy")
RESUME_IGNORED = {"optimizer": "the optimizer state of the checkpoint is restored",
                  "amsgrad": "the optimizer state of the checkpoint is restored",
                  "scheduler": "the scheduler state of the checkpoint is restored",
                  "seed": "the random streams of the checkpoint are restored"}


def resume_training_section(new: Mapping[str, Any], saved: Mapping[str, Any]
                            ) -> Tuple[Dict[str, Any], Dict[str, Tuple[Any, Any]]]:
    """(training section in effect, {key: (old, new)} of the applied changes) for a resume.

    A changed key of RESUME_APPLIED takes the new value (logged); one of RESUME_IGNORED keeps
    the checkpoint's value with a warning that says so. A key the checkpoint lacks (it was
    written before the key existed) takes the new value, and the log says so.
    """
    effective = copy.deepcopy(dict(new))
    changes: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(new) | set(saved)):
        old, value = saved.get(key), new.get(key)
        if key not in saved:
            if saved:  # an empty section is a fresh run's, not an old checkpoint's
                log.info("resume: training.%s is not in the checkpoint (written before the key existed): "
                         "the run takes %r", key, value)
            continue
        if old == value:
            continue
        if key in RESUME_IGNORED:
            effective[key] = copy.deepcopy(old)
            log.warning("resume: training.%s = %r is ignored (the run keeps %r): %s; start a new run to "
                        "change it", key, value, old, RESUME_IGNORED[key])
        else:
            changes[key] = (old, value)
    return effective, changes


def _resumed_lr(changes: Mapping[str, Tuple[Any, Any]], in_stage_two: bool) -> Optional[Tuple[str, float]]:
    """(key, lr) when the resumed optimizer must take a changed learning rate: training.lr in
    stage one, stage_two.lr in stage two."""
    if "lr" in changes and not in_stage_two:
        return "lr", float(changes["lr"][1])
    st_old, st_new = changes.get("stage_two", ({}, {}))
    if in_stage_two and (st_old or {}).get("lr") != (st_new or {}).get("lr") and (st_new or {}).get("lr"):
        return "stage_two.lr", float(st_new["lr"])
    return None


def apply_training_changes(changes: Mapping[str, Tuple[Any, Any]], optimizer: torch.optim.Optimizer,
                           scheduler: Any, ema: Optional[ExponentialMovingAverage], in_stage_two: bool) -> None:
    """Put the changed training.* values into the restored optimizer, scheduler and EMA (their
    states carry the old ones) and log each change."""
    resumed = _resumed_lr(changes, in_stage_two)
    if resumed is not None:
        for group in optimizer.param_groups:
            group["lr"] = resumed[1]
        if hasattr(scheduler, "base_lrs"):  # cosine: the schedule continues from the new value
            scheduler.base_lrs = [resumed[1] for _ in optimizer.param_groups]
    lr_key = resumed[0] if resumed is not None else None
    for key, (old, new) in changes.items():
        if key == "lr" and in_stage_two:
            log.warning("resume: training.lr = %r is not used now: stage two runs at training.stage_two.lr", new)
            continue
        if key == "weight_decay":
            for group in optimizer.param_groups:
                group["weight_decay"] = float(new or 0.0)
        elif key in ("lr_factor", "scheduler_patience", "min_lr") and scheduler is not None:
            _set_scheduler_option(scheduler, key, new)
        elif key == "ema_decay" and ema is not None and new:
            ema.decay = float(new)
        note = f" (the optimizer continues at lr {current_lr(optimizer):.3g})" \
            if key == "lr" or (key == "stage_two" and lr_key == "stage_two.lr") else ""
        log.info("resume: training.%s changed from %r to %r: applied%s", key, old, new, note)


def _set_scheduler_option(scheduler: Any, key: str, value: Any) -> None:
    """lr_factor / scheduler_patience / min_lr into a restored plateau or cosine scheduler."""
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if key == "lr_factor" and plateau:
        scheduler.factor = float(value)
    elif key == "scheduler_patience" and plateau:
        scheduler.patience = int(value)
    elif key == "min_lr":
        if plateau:
            scheduler.min_lrs = [float(value or 0.0)] * len(scheduler.min_lrs)
        else:
            scheduler.eta_min = float(value or 0.0)

"""The trainer: `train()` puts the pieces of `polarmace.training` together.

data (:mod:`.datasets`) → statistics → model, loss and `TrainState` (:mod:`.state`, built by the
factories of :mod:`.policy`) → epochs (:mod:`.loop`) with checkpoints, best weights and early
stopping → the final model and tables (:mod:`.reporting`). A run killed at any moment and
resumed from its last checkpoint retraces the uninterrupted run exactly (bitwise in float64 on
CPU); see :mod:`.loop` for why.

Entry point: :func:`train` (``polarmace-train`` is a thin wrapper around it).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from polarmace.config import Config, ConfigError, OutputConfig, load_config
from polarmace.data.batching import num_atoms_of
from polarmace.finetune import initial_model

from . import distributed as ddp
from . import reporting
from .checkpoint import CheckpointHandler, atomic_save, versions
from .datasets import build_data, training_statistics
from .ema import ExponentialMovingAverage
from .lock import RunExistsError, RunLock
from .loop import Callback, EpochPlan, evaluate, run_epoch
from .loss import WeightedLoss
from .policy import (apply_training_changes, build_optimizer, build_scheduler, can_continue, current_lr,
                     resume_training_section, stage_of, stage_two_time, stage_weights, training_config,
                     training_time)
from .state import TrainState

log = logging.getLogger("polarmace.training")

__all__ = ["train", "TrainResult", "run_directory"]


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    history: List[Dict[str, Any]]
    test_metrics: Dict[str, float] = field(default_factory=dict)
    model: Optional[torch.nn.Module] = None


def run_directory(output: OutputConfig) -> Path:
    """The run directory of an ``output`` section (``<name>`` in it replaced by output.name)."""
    return Path(str(output.directory).replace("<name>", output.name))


def train(config: Any, model_factory: Optional[Callable] = None, resume: bool = False,
          overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
          checkpoint_steps: Optional[int] = None) -> TrainResult:
    """Train a model from a config (Config, dict or YAML path); returns the final model path.

    `model_factory(config_dict, statistics=...)` builds the model; None means
    ``polarmace.build_model``. The config dict passed in has model.elements, model.e0s (per
    element, eV) and model.avg_num_neighbors resolved from the training data; `statistics` adds
    shift (mean interaction energy per atom, eV) and scale (RMS force, eV/Å).

    A checkpoint is written every ``output.checkpoint_interval`` epochs and, with
    `checkpoint_steps` = K, also every K optimiser steps inside an epoch (with the
    step-in-epoch, so that a resumed run retraces the uninterrupted one). `callbacks` are called
    as cb(event, state) with the events "step_end" and "epoch_end".

    With ``training.max_time`` (s) the run stops after the epoch during which the summed epoch
    times (carried by checkpoints) pass the budget and then finishes as after its last epoch
    (best/EMA weights, final model, metrics on every split).
    """
    from polarmace.errors import resolve_device
    from polarmace.runtime import tune_allocator

    tune_allocator()  # speed only: no page-fault churn on the per-step buffers
    conf = load_config(config, overrides)
    # a term set in the config warns when its label is missing; an unset one is only logged
    explicit = set(conf.training.loss_weights.explicit())
    if not conf.data.train:
        raise ConfigError("data.train is not set: give the training file (.xyz/.extxyz, input.data or .h5) "
                          "in the config or as the override data.train=PATH")
    device = resolve_device(conf.training.device, "training.device")
    info = ddp.init(str(device))
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    dtype = getattr(torch, conf.model.dtype)
    run_dir = run_directory(conf.output)
    # the lock comes first: a second run in the same directory writes nothing, not even a log line
    lock = RunLock(run_dir, "polarmace-train") if info.is_main else None
    if lock is not None:
        lock.acquire()
    old_dtype = torch.get_default_dtype()
    try:
        if not resume and CheckpointHandler(run_dir, keep=conf.output.keep_checkpoints).list():
            raise RunExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                                 "or choose another output.name / output.directory")
        with reporting.training_log(run_dir, info.is_main):
            torch.set_default_dtype(dtype)
            run = _Run(conf, run_dir, info, device, dtype, explicit, checkpoint_steps, callbacks)
            return run.train(model_factory, resume)
    finally:
        torch.set_default_dtype(old_dtype)
        if lock is not None:
            lock.release()


class _Run:
    """One call of `train`: the fixed settings, and the steps that need them."""

    def __init__(self, conf: Config, run_dir: Path, info: ddp.DistInfo, device: torch.device, dtype: torch.dtype,
                 explicit: set, checkpoint_steps: Optional[int], callbacks: Sequence[Callback]):
        self.conf, self.cfg = conf, conf.to_dict()
        self.run_dir, self.info, self.device, self.dtype = run_dir, info, device, dtype
        self.explicit, self.checkpoint_steps, self.callbacks = explicit, checkpoint_steps, callbacks
        self.ckpts = CheckpointHandler(run_dir, keep=conf.output.keep_checkpoints)

    # ------------------------------------------------------------------------------ setup
    def train(self, model_factory: Optional[Callable], resume: bool) -> TrainResult:
        latest = self.ckpts.latest() if resume else None
        if resume and latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
        saved = self.ckpts.load(latest) if latest is not None else None
        seed = int(self.conf.training.seed)
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)
        self.data = build_data(self.conf.data, self.run_dir, resume=saved is not None, is_main=self.info.is_main)
        self.model_cfg, self.stats, changes, origin = self._model_config(saved)
        self.tc = training_config(self.model_cfg["training"])
        if self.info.is_main:
            reporting.log_start(self.run_dir, latest, self.data, self.stats, origin)
        state, loss_fn = self._build(model_factory or _default_factory())
        if self.info.is_main:  # after the build: model.init_from puts the file's trunk and E0s in model_cfg
            reporting.write_config(self.model_cfg, self.run_dir)
        if saved is not None:
            state.restore(saved, warn=log.warning)
            in_stage_two = bool(state.partial.get("stage_two_applied")) or state.last_stage == 2
            apply_training_changes(changes, state.optimizer, state.scheduler, state.ema, in_stage_two)
            if self.info.is_main:
                log.info("resumed at epoch %d step %d (best %.6g, lr %.3g)", state.epoch, state.step, state.best,
                         current_lr(state.optimizer))
        self._epochs(state, loss_fn)
        if self.tc.epochs == 0 and saved is None:
            if self.info.is_main:
                log.info("training.epochs is 0: no training; the initial model is saved and evaluated")
            self._save(state, 0, 0, {"finished": True, "stopped_by": "epochs"})  # a later --resume may train it
        # the final evaluation's loss uses the weights of the stage training ended in, also when a
        # run killed during that evaluation is resumed (the epoch loop then does not run)
        loss_fn.set_weights(stage_weights(self.tc, state.last_stage))
        return self._finish(state, loss_fn)

    def _model_config(self, saved: Optional[Dict[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict, str]:
        """(config the model is built from and checkpoints carry, statistics, applied training
        changes, where the statistics come from). A resumed run takes the checkpoint's model and
        statistics; its training section is the new one except for the keys that cannot change
        (`policy.RESUME_IGNORED`). A new run uses the statistics an HDF5 training file stores
        when they describe its training split (`datasets.training_statistics`)."""
        if saved is not None:
            model_cfg, stats = copy.deepcopy(saved["config"]), saved["statistics"]
            _warn_config_changes(self.cfg, model_cfg)
            tcfg, changes = resume_training_section(self.cfg["training"], model_cfg.get("training") or {})
            model_cfg["training"] = copy.deepcopy(tcfg)
            return model_cfg, stats, changes, "from the checkpoint"
        m = self.conf.model
        stats, origin = training_statistics(self.data.train, m)
        if stats["e0s"] is None:
            warnings.warn("no energy labels in the training data: E0s set to 0", UserWarning, stacklevel=2)
            stats["e0s"] = {s: 0.0 for s in stats["elements"]}
        model_cfg = copy.deepcopy(self.cfg)
        model_cfg["model"]["elements"] = stats["elements"]
        model_cfg["model"]["e0s"] = stats["e0s"]
        if model_cfg["model"].get("avg_num_neighbors") is None:
            model_cfg["model"]["avg_num_neighbors"] = stats["avg_num_neighbors"]
        return model_cfg, stats, {}, origin

    def _build(self, factory: Callable) -> Tuple[TrainState, WeightedLoss]:
        """The model (on every rank the same weights), loss, optimizer, scheduler and EMA."""
        tc, info = self.tc, self.info
        # model.init_from / freeze_trunk_epochs (polarmace.finetune); otherwise factory(config, statistics=...)
        model, self.callbacks = initial_model(factory, self.model_cfg, self.stats, self.run_dir, self.callbacks,
                                              self.device)
        ddp.broadcast_parameters(model, info)
        loss_fn = WeightedLoss(stage_weights(tc, 1))
        with warnings.catch_warnings():
            if not info.is_main:
                warnings.simplefilter("ignore")
            loss_fn.resolve(self.stats["labels"].keys(), log_active=info.is_main, explicit=self.explicit)
        optimizer = build_optimizer(model, tc)
        scheduler = build_scheduler(optimizer, tc, tc.epochs)
        ema = ExponentialMovingAverage(model, float(tc.ema_decay)) if tc.ema_decay else None
        if info.is_main:
            log.info("model: %d parameters; optimizer %s lr %.3g; scheduler %s; EMA %s",
                     sum(p.numel() for p in model.parameters()), tc.optimizer, current_lr(optimizer),
                     tc.scheduler, f"decay {tc.ema_decay} (evaluation uses the EMA weights)" if ema else "off")
        return TrainState(model, optimizer, scheduler, ema), loss_fn

    def _plan(self) -> EpochPlan:
        d = self.conf.data
        return EpochPlan(r_max=float(self.model_cfg["model"]["r_max"]), batch_size=d.batch_size, seed=d.seed,
                         dtype=self.dtype, device=self.device, info=self.info, max_atoms=d.max_atoms_per_batch,
                         atoms_per_config=num_atoms_of(self.data.train) if d.max_atoms_per_batch else None,
                         num_workers=d.num_workers, clip_grad=self.tc.clip_grad,
                         checkpoint_steps=self.checkpoint_steps, callbacks=self.callbacks, progress=self.info.is_main,
                         electrostatics_accuracy=self.tc.electrostatics_accuracy)

    def _save(self, state: TrainState, epoch: int, step: int, extra: Dict[str, Any]) -> None:
        if self.info.is_main:
            self.ckpts.save(state.to_checkpoint(config=self.model_cfg, statistics=self.stats,
                                                splits=self.data.indices, world_size=self.info.world_size,
                                                versions=versions(), **extra), epoch, step)

    # ----------------------------------------------------------------------------- epochs
    def _epochs(self, state: TrainState, loss_fn: WeightedLoss) -> None:
        tc, plan = self.tc, self._plan()
        if state.finished and can_continue(state.stopped_by, tc.epochs, tc.max_time, state.epoch, state.history):
            state.finished = False
            if self.info.is_main:
                log.info("resuming a finished run: training.epochs/max_time now allow more training")
        first = True
        while state.epoch < tc.epochs and not state.finished:
            elapsed = training_time(state.history)
            stage = stage_of(tc, tc.epochs, state.epoch, elapsed)
            loss_fn.set_weights(stage_weights(tc, stage))
            entering = stage == 2 and state.last_stage != 2
            if entering and state.step == 0 and not state.partial.get("stage_two_applied"):
                self._enter_stage_two(state, loss_fn, elapsed)
            row, evaluated, metric = run_epoch(
                state, loss_fn, self.data.train, self.data.valid, stage, plan,
                lambda e, s, extra: self._save(state, e, s, extra), epochs=tc.epochs,
                eval_interval=tc.eval_interval, max_time=tc.max_time, elapsed=elapsed)
            self._end_epoch(state, row, evaluated, metric, elapsed, header=first)
            first = False

    def _enter_stage_two(self, state: TrainState, loss_fn: WeightedLoss, elapsed: float) -> None:
        """Stage two's lr, and early stopping and the best metric start again."""
        lr2 = self.tc.stage_two.lr
        for g in state.optimizer.param_groups:
            g["lr"] = float(lr2)
        state.best, state.since_best = math.inf, 0
        if self.info.is_main:
            s2_time, max_time = stage_two_time(self.tc), self.tc.max_time
            log.info("stage two from epoch %d%s: loss weights %s%s", state.epoch,
                     f" ({elapsed:.0f} s of the {max_time:.0f} s budget)"
                     if s2_time is not None and elapsed >= s2_time else "", loss_fn.describe(),
                     f", lr {float(lr2):.3g}")

    def _end_epoch(self, state: TrainState, row: Dict[str, Any], evaluated: bool, metric: float, elapsed: float,
                   header: bool) -> None:
        """History, best weights, early stopping, the time budget, logs and the checkpoint."""
        tc, epoch, is_main = self.tc, state.epoch, self.info.is_main
        out_of_time = tc.max_time is not None and elapsed + row["time_s"] >= tc.max_time
        state.history.append(row)
        improved = evaluated and metric < state.best
        if improved:
            state.best, state.since_best = metric, 0
            if is_main:
                _save_best(state.model, state.ema, self.run_dir, epoch + 1, metric)
        elif evaluated:
            state.since_best += 1
        stop = tc.patience is not None and state.since_best >= int(tc.patience)
        if is_main:
            reporting.log_epoch(row, improved, header)
            # the learning curve costs ~1 s: drawn every 10 epochs and at the end
            plot = (epoch + 1) % 10 == 0 or epoch + 1 >= tc.epochs or out_of_time or stop
            reporting.write_history(state.history, self.run_dir, self.conf.output.plots and plot)
            if stop:
                log.info("early stopping: no improvement of the %s loss for %d epochs",
                         "valid" if self.data.valid is not None else "train", state.since_best)
            if out_of_time:
                log.info("time budget: %.1f s of training >= training.max_time %.0f s after epoch %d: stopping",
                         elapsed + row["time_s"], tc.max_time, epoch + 1)
        state.finished = stop or out_of_time or epoch + 1 >= tc.epochs
        reason = "patience" if stop else ("time" if out_of_time else "epochs")
        if state.finished or (epoch + 1) % self.conf.output.checkpoint_interval == 0:
            self._save(state, epoch + 1, 0, {"finished": state.finished, "stopped_by": reason})
        for cb in self.callbacks:
            cb("epoch_end", {"epoch": epoch, "row": row, "model": state.model})
        state.epoch += 1

    # ----------------------------------------------------------------------------- finish
    def _finish(self, state: TrainState, loss_fn: WeightedLoss) -> TrainResult:
        """Load the best (EMA) weights, save the final model, evaluate on every split."""
        model, ema, info, data = state.model, state.ema, self.info, self.data
        best_path = self.run_dir / "best.pt"
        ddp.barrier(info)
        if best_path.exists():
            blob = torch.load(best_path, map_location=self.device, weights_only=False)
            model.load_state_dict(blob["state_dict"])
            which = f"best epoch {blob['epoch']}" + (" (EMA weights)" if blob.get("ema") else "")
        else:
            if ema is not None:
                ema.copy_to(model)
            which = "last epoch" + (" (EMA weights)" if ema is not None else "")
        model_path = self.run_dir / f"{self.conf.output.name}.model"
        if info.is_main:
            _save_model(model, model_path)
            log.info("saved model %s (%s)", model_path, which)
        plan = self._plan()
        table: Dict[str, Dict[str, float]] = {}
        for name, ds in (("train", data.train), ("valid", data.valid), ("test", data.test)):
            if ds is not None and len(ds):
                table[name] = evaluate(model, ds, loss_fn, plan.r_max, plan.batch_size, self.dtype, self.device,
                                       info, None, plan.num_workers)
        if info.is_main and table:
            reporting.report_final(table, which, self.run_dir)
            reporting.report_electrical(model, data, self.run_dir, plan.batch_size)
        ddp.barrier(info)
        return TrainResult(self.run_dir, model_path, state.history, table.get("test", {}), model)


def _default_factory() -> Callable:
    from polarmace import build_model

    return build_model


def _save_model(model: torch.nn.Module, path: Path) -> None:
    """model.save() to `path` through a temporary file (a kill never leaves a torn model)."""
    from polarmace.errors import output_error

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        model.save(str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if tmp.exists():
            tmp.unlink()
        error = output_error(path, exc)
        if error is None:
            raise
        raise error from exc


def _save_best(model: torch.nn.Module, ema: Optional[ExponentialMovingAverage], run_dir: Path, epoch: int,
               metric: float) -> None:
    with ema.average_parameters(model) if ema is not None else nullcontext():
        atomic_save({"epoch": epoch, "metric": metric, "ema": ema is not None,
                     "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                    run_dir / "best.pt")


def _warn_config_changes(cfg: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Report model/long_range/data keys that differ from the checkpoint (training.* keys: see
    `policy.resume_training_section`)."""
    for section in ("model", "long_range", "data"):
        a, b = cfg.get(section) or {}, saved.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if section == "model" and k in ("elements", "e0s", "avg_num_neighbors"):
                continue
            if a.get(k) != b.get(k):
                use = "the checkpoint's value is kept (the model is rebuilt from it)" if section != "data" \
                    else "the new value is used"
                log.warning("resume: %s.%s differs from the checkpoint (%r, was %r): %s", section, k,
                            a.get(k), b.get(k), use)

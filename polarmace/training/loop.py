"""The training loop proper: one optimiser step, one epoch, one evaluation.

Data order is a pure function of (seed, epoch) (:func:`polarmace.data.batching.epoch_batches`).
An epoch resumed at step k rebuilds the same batches and skips the first k, with the partial
sums of its checkpoint, so a run killed at any moment and resumed retraces the uninterrupted
run exactly (bitwise in float64 on CPU). Data-parallel ranks take contiguous shards of every
global batch (:mod:`polarmace.training.distributed`). Every clock reading of the trainer is
here (`time.time`), so a test can replace the clock of a whole run.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from polarmace.data.batching import epoch_batches, iterate_graphs, to_device
from polarmace.electrostatics.engine import looser_accuracy

from . import distributed as ddp
from .ema import ExponentialMovingAverage
from .loss import TERMS, WeightedLoss
from .metrics import MetricsAccumulator
from .policy import current_lr
from .state import TrainState

Callback = Callable[[str, Dict[str, Any]], None]

__all__ = ["Callback", "StepResult", "EpochPlan", "forward", "train_step", "evaluate", "train_epoch", "run_epoch"]


@dataclass
class StepResult:
    loss: float
    pred: Optional[Dict[str, torch.Tensor]]


@dataclass
class EpochPlan:
    """What is fixed for every epoch of a run: batching, precision, device, ranks, clipping."""

    r_max: float
    batch_size: int
    seed: int
    dtype: torch.dtype
    device: torch.device
    info: ddp.DistInfo = field(default_factory=ddp.DistInfo)
    max_atoms: Optional[int] = None
    #: atoms per training structure (only when batching by atoms)
    atoms_per_config: Optional[np.ndarray] = None
    num_workers: int = 0
    clip_grad: Optional[float] = None
    #: a step checkpoint every this many optimiser steps inside an epoch (None: none)
    checkpoint_steps: Optional[int] = None
    callbacks: Sequence[Callback] = ()
    progress: bool = False
    #: relative accuracy of the electrostatic sums in the optimiser steps (None: the model's)
    electrostatics_accuracy: Optional[float] = None


def forward(model: torch.nn.Module, graph: Mapping[str, torch.Tensor], loss_fn: WeightedLoss) -> Dict[str, torch.Tensor]:
    """The model's predictions with the derivatives the loss (or the labels) need."""
    return model(dict(graph), compute_forces=True, compute_stress=loss_fn.needs_stress or "stress" in graph
                 or "virials" in graph, compute_bec=loss_fn.needs_bec)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: WeightedLoss,
               graph: Optional[Mapping[str, torch.Tensor]], info: ddp.DistInfo,
               clip_grad: Optional[float], ema: Optional[ExponentialMovingAverage],
               dtype: torch.dtype, device: torch.device) -> StepResult:
    """One optimiser step on this rank's shard `graph` (None: an empty shard). The loss
    denominators are summed over ranks first, so the summed gradients are those of the global
    batch."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    counts = loss_fn.counts(graph) if graph is not None else torch.zeros(len(TERMS), dtype=dtype, device=device)
    ddp.all_reduce_sum(counts, info)
    pred = None
    loss_value = torch.zeros((), dtype=dtype, device=device)
    if graph is not None:
        pred = forward(model, graph, loss_fn)
        loss, _ = loss_fn(pred, graph, counts=counts)
        loss.backward()
        loss_value = loss.detach()
        pred = {k: v.detach() for k, v in pred.items() if isinstance(v, torch.Tensor)}
    ddp.all_reduce_gradients(model, info)
    ddp.all_reduce_sum(loss_value, info)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(clip_grad))
    optimizer.step()
    if ema is not None:
        ema.update(model)
    return StepResult(float(loss_value), pred)


def evaluate(model: torch.nn.Module, dataset: Optional[Sequence], loss_fn: WeightedLoss, r_max: float,
             batch_size: int, dtype: torch.dtype, device: torch.device, info: ddp.DistInfo = ddp.DistInfo(),
             ema: Optional[ExponentialMovingAverage] = None, num_workers: int = 0) -> Dict[str, float]:
    """Loss and error metrics over `dataset` (EMA weights when `ema` is given); ranks evaluate
    interleaved batches and the sums are all-reduced."""
    if dataset is None or len(dataset) == 0:
        return {}
    batches = epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False)
    mine = batches[info.rank::info.world_size]
    acc = MetricsAccumulator()
    model.eval()
    with ema.average_parameters(model) if ema is not None else nullcontext():
        for graph in iterate_graphs(dataset, mine, r_max, num_workers):
            graph = to_device(graph, device, dtype)
            pred = forward(model, graph, loss_fn)
            loss, _ = loss_fn(pred, graph)
            n = float(graph["num_atoms"].shape[0])
            acc.update({k: v.detach() for k, v in pred.items() if isinstance(v, torch.Tensor)}, graph,
                       loss=float(loss.detach()), loss_weight=n)
    if info.enabled:
        sums = acc.sums()
        ddp.all_reduce_sum(sums, info)
        acc.load_sums(sums)
    return acc.compute()


def _progress(total: int, initial: int, epoch: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", leave=False, disable=None,
                dynamic_ncols=True)


def train_epoch(state: TrainState, loss_fn: WeightedLoss, train_set: Sequence, stage: int, plan: EpochPlan,
                save: Callable[[int, int, Dict[str, Any]], None]) -> Tuple[Dict[str, Any], float]:
    """The optimiser steps of epoch `state.epoch`, from step `state.step` (with the sums in
    `state.partial`). Every `plan.checkpoint_steps` steps ``save(epoch, step, extra)`` writes a
    step checkpoint. Returns (row {epoch, stage, train_loss, train_<metric>}, t0 = the clock
    reading the epoch's time counts from)."""
    epoch, partial, info = state.epoch, state.partial, plan.info
    batches = epoch_batches(len(train_set), plan.batch_size, plan.seed, epoch, True, plan.atoms_per_config,
                            int(plan.max_atoms) if plan.max_atoms else None)
    t0 = time.time() - float(partial.get("elapsed", 0.0))
    train_acc = MetricsAccumulator()
    loss_sum, loss_n = float(partial.get("loss_sum", 0.0)), float(partial.get("loss_n", 0.0))
    if partial.get("train_sums") is not None:
        train_acc.load_sums(partial["train_sums"])
    shards = [ddp.shard(b, info.rank, info.world_size) for b in batches[state.step:]]
    progress = _progress(len(batches), state.step, epoch, plan.progress)
    step = state.step
    for graph in iterate_graphs(train_set, shards, plan.r_max, plan.num_workers):
        graph = to_device(graph, plan.device, plan.dtype) if graph is not None else None
        with looser_accuracy(state.model, plan.electrostatics_accuracy):
            res = train_step(state.model, state.optimizer, loss_fn, graph, info, plan.clip_grad, state.ema,
                             plan.dtype, plan.device)
        if not math.isfinite(res.loss):
            raise FloatingPointError(f"loss is {res.loss} at epoch {epoch} step {step}")
        if res.pred is not None:
            train_acc.update(res.pred, graph)
        loss_sum += res.loss
        loss_n += 1
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{res.loss:.4g}")
        if plan.checkpoint_steps and step % int(plan.checkpoint_steps) == 0 and step < len(batches):
            save(epoch, step, {"partial": {"loss_sum": loss_sum, "loss_n": loss_n, "train_sums": train_acc.sums(),
                                           "elapsed": time.time() - t0, "stage_two_applied": stage == 2}})
        for cb in plan.callbacks:
            cb("step_end", {"epoch": epoch, "step": step, "loss": res.loss, "model": state.model})
    if progress is not None:
        progress.close()
    state.step, state.partial = 0, {}
    row: Dict[str, Any] = {"epoch": epoch + 1, "stage": stage, "train_loss": loss_sum / max(loss_n, 1)}
    tsums = train_acc.sums()
    ddp.all_reduce_sum(tsums, info)
    train_acc.load_sums(tsums)
    row.update({f"train_{k}": v for k, v in train_acc.compute().items() if k != "loss"})
    return row, t0


def run_epoch(state: TrainState, loss_fn: WeightedLoss, train_set: Sequence, valid_set: Optional[Sequence],
              stage: int, plan: EpochPlan, save: Callable[[int, int, Dict[str, Any]], None], *, epochs: int,
              eval_interval: int, max_time: Optional[float], elapsed: float) -> Tuple[Dict[str, Any], bool, float]:
    """One epoch: its steps, then (every `eval_interval` epochs, at the last and when the time
    budget runs out) validation, then the scheduler. Returns (history row with lr and time_s,
    whether it was evaluated, the metric: validation loss, else the train loss)."""
    row, t0 = train_epoch(state, loss_fn, train_set, stage, plan, save)
    epoch, info = state.epoch, plan.info
    # the budget is checked before validation so that the last epoch is always evaluated
    # (rank 0's clock decides, so that data-parallel ranks stop together)
    budget_hit = max_time is not None and ddp.broadcast_object(elapsed + (time.time() - t0) >= max_time, info)
    do_eval = ((epoch + 1) % eval_interval == 0) or epoch + 1 == epochs or budget_hit
    metric = row["train_loss"]
    if do_eval and valid_set is not None:
        vm = evaluate(state.model, valid_set, loss_fn, plan.r_max, plan.batch_size, plan.dtype, plan.device, info,
                      state.ema, plan.num_workers)
        row.update({f"valid_{k}": v for k, v in vm.items()})
        metric = vm.get("loss", metric)
    if state.scheduler is not None:
        if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if do_eval:
                state.scheduler.step(metric)
        else:
            state.scheduler.step()
    row["lr"] = current_lr(state.optimizer)
    row["time_s"] = time.time() - t0
    if max_time is not None:  # one clock for all ranks: the stage and the stop agree
        row["time_s"] = float(ddp.broadcast_object(row["time_s"], info))
    return row, do_eval, metric



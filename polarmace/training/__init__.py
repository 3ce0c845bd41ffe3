"""Training: the trainer and its pieces.

- :mod:`.trainer`: `train()` (``polarmace-train config.yaml``), which puts the rest together;
- :mod:`.state`: `TrainState` (model, optimizer, scheduler, EMA, position, history) and checkpoints of it;
- :mod:`.policy`: optimiser/scheduler factories, stages, time budget, what a resume applies;
- :mod:`.loop`: `train_step`, `train_epoch`, `run_epoch`, `evaluate`;
- :mod:`.reporting`: logs, the epoch table, metrics files, final tables;
- :mod:`.datasets`: the run's data and its saved split;
- :mod:`.loss`, :mod:`.metrics`, :mod:`.ema`, :mod:`.checkpoint`, :mod:`.lock`, :mod:`.distributed`.

Imports are lazy so that ``import polarmace.training.loss`` does not pull in the data stack.
"""

__all__ = ["train", "WeightedLoss", "ExponentialMovingAverage", "CheckpointHandler", "MetricsAccumulator"]


def __getattr__(name):
    if name == "train":
        from .trainer import train

        return train
    if name == "WeightedLoss":
        from .loss import WeightedLoss

        return WeightedLoss
    if name == "ExponentialMovingAverage":
        from .ema import ExponentialMovingAverage

        return ExponentialMovingAverage
    if name == "CheckpointHandler":
        from .checkpoint import CheckpointHandler

        return CheckpointHandler
    if name == "MetricsAccumulator":
        from .metrics import MetricsAccumulator

        return MetricsAccumulator
    raise AttributeError(name)

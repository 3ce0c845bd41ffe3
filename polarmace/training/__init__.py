"""Training: weighted loss, EMA, atomic checkpoints, metrics, data-parallel helpers, trainer.

Entry point: :func:`polarmace.training.trainer.train` (``polarmace-train config.yaml``).
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

"""Learning curves and parity plots (matplotlib with the Agg backend; optional dependency).

Every function returns the written path, or None when matplotlib is not installed (logged once).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("polarmace.training")
_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        if not _warned:
            log.warning("matplotlib is not installed: no plots (pip install 'polarmace[plots]')")
            _warned = True
        return None


def learning_curve(history: Sequence[Mapping[str, float]], path: os.PathLike) -> Optional[str]:
    """Loss (train/valid) and E/F RMSE (valid) against epoch, log scale."""
    plt = _pyplot()
    if plt is None or not history:
        return None
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("train_loss", "train"), ("valid_loss", "valid")):
        vals = [row.get(key, np.nan) for row in history]
        if np.isfinite(vals).any():
            axes[0].plot(epochs, vals, marker=".", label=label)
    axes[0].set_ylabel("loss")
    for ax, key, unit in ((axes[1], "E_rmse", "meV/atom"), (axes[2], "F_rmse", "meV/Å")):
        for prefix, label in (("train_", "train"), ("valid_", "valid")):
            vals = [row.get(prefix + key, np.nan) for row in history]
            if np.isfinite(vals).any():
                ax.plot(epochs, vals, marker=".", label=label)
        ax.set_ylabel(f"{key.replace('_', ' ')} [{unit}]")
    stage_two = [row["epoch"] for row in history if row.get("stage") == 2]
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        if stage_two:
            ax.axvline(stage_two[0] - 0.5, color="grey", ls="--", lw=0.8)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def parity_plot(ref: np.ndarray, pred: np.ndarray, path: os.PathLike, quantity: str,
                unit: str = "") -> Optional[str]:
    """Prediction against reference with the y = x line, MAE/RMSE in the title."""
    plt = _pyplot()
    if plt is None:
        return None
    ref = np.asarray(ref, dtype=float).ravel()
    pred = np.asarray(pred, dtype=float).ravel()
    if ref.size == 0:
        return None
    err = pred - ref
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(ref, pred, s=4, alpha=0.5)
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    u = f" [{unit}]" if unit else ""
    ax.set_xlabel(f"reference {quantity}{u}")
    ax.set_ylabel(f"predicted {quantity}{u}")
    ax.set_title(f"{quantity}: MAE {np.abs(err).mean():.3g}, RMSE {np.sqrt((err ** 2).mean()):.3g}{u}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)

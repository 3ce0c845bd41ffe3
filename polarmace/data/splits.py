"""Seeded train / valid / test splits of one data set, saved as JSON in the run directory
(``splits.json``: the three index lists and metadata such as the source file, its size and
the seed)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from .schema import DataError

__all__ = ["SPLIT_FILENAME", "SPLIT_NAMES", "split_indices", "save_split", "load_split"]

#: File name of a saved split inside a run directory.
SPLIT_FILENAME = "splits.json"
SPLIT_NAMES = ("train", "valid", "test")


def split_indices(n: int, valid_fraction: float, test_fraction: float = 0.0, seed: int = 1) -> Dict[str, np.ndarray]:
    """Split range(n) at random (numpy default_rng(seed)) into sorted int64 index arrays.

    valid gets round(valid_fraction·n) structures and test round(test_fraction·n), each at
    least one when its fraction is > 0; train keeps the rest and must not be empty.
    """
    if n < 1:
        raise ValueError(f"cannot split {n} structures")
    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    n_valid = max(1, int(round(valid_fraction * n))) if valid_fraction > 0 else 0
    n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
    if n_valid + n_test >= n:
        raise ValueError(f"splitting {n} structures with valid_fraction {valid_fraction} and test_fraction "
                         f"{test_fraction} leaves no training structures")
    order = np.random.default_rng(seed).permutation(n)
    return {
        "train": np.sort(order[n_valid + n_test:]).astype(np.int64),
        "valid": np.sort(order[:n_valid]).astype(np.int64),
        "test": np.sort(order[n_valid:n_valid + n_test]).astype(np.int64),
    }


def _target(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path / SPLIT_FILENAME if path.is_dir() else path


def save_split(path: Union[str, Path], split: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a split as JSON (to `path`, or to path/splits.json when `path` is a directory),
    atomically (a kill leaves the old file or the new one).

    `metadata` (e.g. the data file, its number of structures and the seed) is stored next to
    the index lists. Returns the path.
    """
    target = _target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data: Dict[str, Any] = {name: [int(i) for i in split.get(name, [])] for name in SPLIT_NAMES}
    data.update(dict(metadata or {}))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_split(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Read a split written by `save_split`: int64 arrays train/valid/test, and `metadata`
    (a dict of the other keys of the file)."""
    target = _target(path)
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        raise DataError(f"{target}: no such split file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{target}: not a readable split file: {exc}") from exc
    if not isinstance(data, dict) or any(name not in data for name in SPLIT_NAMES):
        raise DataError(f"{target}: a split file needs the lists {', '.join(SPLIT_NAMES)}")
    out: Dict[str, Any] = {}
    for name in SPLIT_NAMES:
        try:
            values = np.asarray(data[name], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{target}: '{name}' is not a list of integers") from exc
        if (values < 0).any():
            raise DataError(f"{target}: '{name}' holds negative indices")
        out[name] = values
    everything = np.concatenate([out[name] for name in SPLIT_NAMES])
    if len(np.unique(everything)) != len(everything):
        raise DataError(f"{target}: an index appears twice (within or across train/valid/test)")
    out["metadata"] = {k: v for k, v in data.items() if k not in SPLIT_NAMES}
    return out

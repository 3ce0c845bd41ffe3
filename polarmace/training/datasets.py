"""The data of a run: the files of the ``data`` section, split by seed; the split is saved in
the run directory (``splits.json``, :mod:`polarmace.data.splits`) and read back on resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from polarmace.config import ConfigError, DataConfig
from polarmace.data.sources import Subset, open_source
from polarmace.data.splits import SPLIT_FILENAME, load_split, save_split, split_indices
from polarmace.errors import DataError, output_error

log = logging.getLogger("polarmace.training")

@dataclass
class DataSplits:
    """The train/valid/test sets of a run and the indices of the split (as saved)."""

    train: Sequence
    valid: Optional[Sequence]
    test: Optional[Sequence]
    indices: Dict[str, Any]


def _fresh_split(n: int, data: DataConfig, has_valid: bool, has_test: bool) -> Dict[str, Any]:
    # a separate valid/test file replaces that fraction of the training file
    vf = 0.0 if has_valid else float(data.valid_fraction or 0.0)
    tf = 0.0 if has_test else float(data.test_fraction or 0.0)
    out = split_indices(n, valid_fraction=vf, test_fraction=tf, seed=int(data.seed))
    idx: Dict[str, Any] = {k: [int(i) for i in out[k]] for k in ("train", "valid", "test")}
    idx.update({"num_source": n, "seed": int(data.seed), "source": str(data.train)})
    return idx


def _saved_split(path: Path, n: int, data: DataConfig, run_dir: Path) -> Dict[str, Any]:
    loaded = load_split(path)
    saved: Dict[str, Any] = {k: [int(i) for i in loaded[k]] for k in ("train", "valid", "test")}
    saved.update(loaded["metadata"])
    if saved.get("num_source") != n:
        raise DataError(f"--resume: data.train {data.train} has {n} structures, but the run in "
                        f"{run_dir} was trained on {saved.get('num_source')} ({saved.get('source')}, see "
                        f"{path.name}); resume with the same data or start a new run elsewhere")
    if saved.get("source") not in (None, str(data.train)):
        log.warning("resume: data.train is %s, the run was started with %s (same number of structures: "
                    "the saved split is used)", data.train, saved.get("source"))
    return saved


def build_data(data: DataConfig, run_dir: Path, resume: bool, is_main: bool = True) -> DataSplits:
    """Read the data files and split them by seed; the split is saved to (and on resume read
    from) ``run_dir/splits.json``."""
    if not data.train:
        raise ConfigError("data.train is not set: give the training file (.xyz/.extxyz, input.data or .h5)")
    train_src = open_source(str(data.train), data)
    valid_src = open_source(str(data.valid), data) if data.valid else None
    test_src = open_source(str(data.test), data) if data.test else None
    split_path = run_dir / SPLIT_FILENAME
    if resume and split_path.exists():
        idx = _saved_split(split_path, len(train_src), data, run_dir)
    else:
        idx = _fresh_split(len(train_src), data, valid_src is not None, test_src is not None)
        if is_main:
            try:
                save_split(split_path, idx, {k: v for k, v in idx.items() if k not in ("train", "valid", "test")})
            except OSError as exc:
                error = output_error(split_path, exc)
                if error is None:
                    raise
                raise error from exc
    train = Subset(train_src, idx["train"])
    valid = valid_src if valid_src is not None else (Subset(train_src, idx["valid"]) if idx["valid"] else None)
    test = test_src if test_src is not None else (Subset(train_src, idx["test"]) if idx["test"] else None)
    if len(train) == 0:
        raise ConfigError(f"data.valid_fraction/test_fraction leave no training structure of the "
                          f"{len(train_src)} in {data.train}")
    return DataSplits(train, valid, test, idx)

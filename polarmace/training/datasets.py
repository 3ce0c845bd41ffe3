"""The data of a run: the files of the ``data`` section, split by seed; the split is saved in
the run directory (``splits.json``, :mod:`polarmace.data.splits`) and read back on resume.
The statistics of the training split come from here too (:func:`training_statistics`): stored
ones of an HDF5 set when they describe exactly that split, else computed."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from polarmace.config import ConfigError, DataConfig, ModelConfig
from polarmace.data.hdf5 import HDF5Dataset
from polarmace.data.sources import Subset, open_source
from polarmace.data.statistics import STATISTICS_KEYS, compute_statistics
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


def _symbols(zs: Sequence[int]) -> list:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in zs]


def _stored_statistics(train: Sequence, model: ModelConfig) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the statistics stored in the HDF5 set that `train` is the whole of, or None; a phrase
    for the log: where they come from, or why they were not used, "" without an HDF5 set).
    Stored statistics (polarmace-prepare, `polarmace.data.hdf5.write_dataset`) are computed on
    every structure of the file with least-squares E0s, so they stand in for `compute_statistics`
    only when the training split is the whole file, with the same r_max and element list."""
    source = train.source if isinstance(train, Subset) else train
    if not isinstance(source, HDF5Dataset):
        return None, ""
    name = Path(source.path).name
    stored = source.statistics
    if not stored:
        return None, f"{name} stores no statistics"
    missing = [k for k in STATISTICS_KEYS if k not in stored]
    if missing:
        return None, f"{name}'s stored statistics lack {', '.join(missing)} (re-create it with polarmace-prepare)"
    n = len(source)
    indices = train.indices if isinstance(train, Subset) else list(range(n))
    if list(indices) != list(range(n)):
        return None, (f"{name}'s stored statistics cover all {n} of its structures, the training split "
                      f"{len(indices)} (data.valid_fraction / test_fraction)")
    if stored["num_structures"] != n or stored["num_atoms"] != int(source.num_atoms.sum()):
        return None, (f"{name}'s stored statistics count {stored['num_structures']} structures and "
                      f"{stored['num_atoms']} atoms, the file {n} and {int(source.num_atoms.sum())}")
    if float(stored["r_max"]) != float(model.r_max):
        return None, f"{name}'s statistics are stored for r_max {stored['r_max']:g} Å, model.r_max is {model.r_max:g} Å"
    if model.e0s != "least_squares":
        return None, f"model.e0s is {model.e0s!r}, {name} stores least-squares E0s"
    expected = list(model.elements) if model.elements else _symbols(source.atomic_numbers_present())
    if list(stored["elements"]) != expected:
        which = "model.elements" if model.elements else "the elements of the data"
        return None, f"{name}'s statistics are stored for elements {stored['elements']}, {which} {expected}"
    return copy.deepcopy(stored), f"stored in {name} by polarmace-prepare, not recomputed"


def training_statistics(train: Sequence, model: ModelConfig) -> Tuple[Dict[str, Any], str]:
    """(statistics of the training split, see `compute_statistics`; where they come from, one
    phrase for the log). The statistics stored in an HDF5 training file are used when they were
    computed on exactly this split with the settings of ``model`` (r_max Å, elements, e0s);
    otherwise they are computed, and the phrase says why the stored ones were not used."""
    stored, why = _stored_statistics(train, model)
    if stored is not None:
        return stored, why
    stats = compute_statistics(train, model.r_max, elements=model.elements, e0s=model.e0s)
    return stats, f"computed on the {len(train)} training structures" + (f" ({why})" if why else "")

"""YAML-driven trainer: small functions around one resumable loop.

Data order is a pure function of (seed, epoch): :func:`epoch_batches` permutes the training
indices with ``numpy.random.default_rng([seed, epoch])`` and cuts batches (by count, or greedily
by total atoms). Resuming at (epoch, step) rebuilds the same list and skips the first `step`
batches, so a run killed at any moment and resumed from its last checkpoint retraces the
uninterrupted run exactly (bitwise in float64 on CPU). Data-parallel ranks take contiguous shards
of every global batch (see :mod:`polarmace.training.distributed`).

Entry point: :func:`train` (``polarmace-train`` is a thin wrapper around it).
"""

from __future__ import annotations

import copy
import csv
import inspect
import io
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import distributed as ddp
from . import plots
from .checkpoint import CheckpointHandler, atomic_save, atomic_write_text, set_rng_state, versions
from .lock import RunExistsError, RunLock
from .ema import ExponentialMovingAverage
from .loss import TERMS, WeightedLoss
from .metrics import MetricsAccumulator, format_table

log = logging.getLogger("polarmace.training")

Callback = Callable[[str, Dict[str, Any]], None]


# ============================================================================ configuration
def resolve_config(config: Any, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """A plain, fully resolved config dict from a Config, a dict or a YAML path."""
    from polarmace.config import Config, load_config

    if isinstance(config, Config):
        if overrides:
            config = load_config(config.to_dict(), overrides)
        return copy.deepcopy(config.to_dict())
    return copy.deepcopy(load_config(config, overrides).to_dict())


def explicit_loss_terms(config: Any, overrides: Sequence[str] = ()) -> set:
    """Loss terms whose weight the user set (in the YAML/dict or an override), as opposed to
    defaults: a missing label of an explicit term is a warning, of a default one an info line.
    For a Config object (raw input unknown) a weight differing from the default counts."""
    from polarmace.config import Config

    raw: Any = None
    if isinstance(config, (str, os.PathLike)):
        try:
            import yaml

            raw = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError):  # load_config reports these properly later
            raw = {}
    elif isinstance(config, Mapping):
        raw = config
    out = set()
    if isinstance(raw, Mapping):
        lw = ((raw.get("training") or {}).get("loss_weights") or {})
        if isinstance(lw, Mapping):
            out.update(k for k in lw if k in TERMS)
    elif isinstance(config, Config):
        defaults = Config().training.loss_weights
        lw = config.training.loss_weights
        out.update(t for t in TERMS if getattr(lw, t) != getattr(defaults, t))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("training.loss_weights."):
            out.add(key.rsplit(".", 1)[-1])
    return out


def _section(cfg: Mapping[str, Any], name: str) -> Dict[str, Any]:
    return dict(cfg.get(name) or {})


def run_directory(cfg: Mapping[str, Any]) -> Path:
    out = _section(cfg, "output")
    directory = out.get("directory") or "runs/<name>"
    name = out.get("name") or "polarmace"
    return Path(str(directory).replace("<name>", str(name)))


def model_name(cfg: Mapping[str, Any]) -> str:
    return str(_section(cfg, "output").get("name") or "polarmace")


# ================================================================================= data
class Subset:
    """Indexable view `source[indices[k]]` (picklable, for DataLoader workers)."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self.source = source
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.source[self.indices[k]]


def read_source(path: str, data_cfg: Mapping[str, Any]) -> Sequence:
    """An indexable data set: HDF5Dataset for .h5/.hdf5, else a list of Configurations."""
    from polarmace.data import atoms as atoms_mod

    suffix = Path(path).suffix.lower()
    if suffix in (".h5", ".hdf5"):
        from polarmace.data.hdf5 import HDF5Dataset

        dataset = HDF5Dataset(path)
        dataset.validate(list(data_cfg.get("required_labels") or []))  # NaN, missing rows: named here, not in a loss
        return dataset
    return atoms_mod.read_configurations(
        path, keys=dict(data_cfg.get("keys") or {}) or None,
        default_total_charge=float(data_cfg.get("default_total_charge", 0.0) or 0.0),
        required=list(data_cfg.get("required_labels") or []))


def _split(n: int, valid_fraction: float, test_fraction: float, seed: int) -> Dict[str, List[int]]:
    from polarmace.data.splits import split_indices

    out = split_indices(n, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed)
    if isinstance(out, Mapping):
        return {k: [int(i) for i in out.get(k, [])] for k in ("train", "valid", "test")}
    parts = list(out) + [[]] * (3 - len(out))
    return {k: [int(i) for i in v] for k, v in zip(("train", "valid", "test"), parts)}


@dataclass
class DataSplits:
    train: Sequence
    valid: Optional[Sequence]
    test: Optional[Sequence]
    indices: Dict[str, Any]


def build_data(cfg: Mapping[str, Any], run_dir: Path, resume: bool, is_main: bool = True) -> DataSplits:
    """Read the data files and split them by seed; the split is saved to (and on resume read
    from) ``run_dir/splits.json``."""
    from polarmace.config import ConfigError
    from polarmace.errors import DataError

    dcfg = _section(cfg, "data")
    if not dcfg.get("train"):
        raise ConfigError("data.train is not set: give the training file (.xyz/.extxyz, input.data or .h5)")
    train_src = read_source(str(dcfg["train"]), dcfg)
    valid_src = read_source(str(dcfg["valid"]), dcfg) if dcfg.get("valid") else None
    test_src = read_source(str(dcfg["test"]), dcfg) if dcfg.get("test") else None
    split_path = run_dir / "splits.json"
    if resume and split_path.exists():
        saved = json.loads(split_path.read_text())
        if saved.get("num_source") != len(train_src):
            raise DataError(f"--resume: data.train {dcfg['train']} has {len(train_src)} structures, but the run in "
                            f"{run_dir} was trained on {saved.get('num_source')} ({saved.get('source')}, see "
                            f"{split_path.name}); resume with the same data or start a new run elsewhere")
        if saved.get("source") not in (None, str(dcfg["train"])):
            log.warning("resume: data.train is %s, the run was started with %s (same number of structures: "
                        "the saved split is used)", dcfg["train"], saved.get("source"))
        idx = saved
    else:
        vf = 0.0 if valid_src is not None else float(dcfg.get("valid_fraction", 0.1) or 0.0)
        tf = 0.0 if test_src is not None else float(dcfg.get("test_fraction", 0.0) or 0.0)
        idx = _split(len(train_src), vf, tf, int(dcfg.get("seed", 1)))
        idx.update({"num_source": len(train_src), "seed": int(dcfg.get("seed", 1)),
                    "source": str(dcfg["train"])})
        if is_main:
            atomic_write_text(json.dumps(idx), split_path)
    train = Subset(train_src, idx["train"])
    valid = valid_src if valid_src is not None else (Subset(train_src, idx["valid"]) if idx["valid"] else None)
    test = test_src if test_src is not None else (Subset(train_src, idx["test"]) if idx["test"] else None)
    if len(train) == 0:
        raise ConfigError(f"data.valid_fraction/test_fraction leave no training structure of the "
                          f"{len(train_src)} in {dcfg['train']}")
    return DataSplits(train, valid, test, idx)


def collate_graph(configs: Sequence, r_max: float) -> Dict[str, torch.Tensor]:
    from polarmace.data.graph import collate

    params = inspect.signature(collate).parameters
    if "r_max" in params:
        return collate(list(configs), r_max=r_max)
    if "cutoff" in params:
        return collate(list(configs), cutoff=r_max)
    return collate(list(configs), r_max)


def to_device(graph: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in graph.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def num_atoms_of(dataset: Sequence, r_max: float = 5.0) -> np.ndarray:
    """Atoms per configuration (for batching by atoms); cheap for HDF5 sets and their subsets."""
    if isinstance(dataset, Subset):
        sizes = getattr(dataset.source, "num_atoms", None)
        if sizes is not None and not callable(sizes):
            return np.asarray(sizes, dtype=np.int64)[dataset.indices]
    sizes = getattr(dataset, "num_atoms", None)
    if sizes is not None and not callable(sizes):
        return np.asarray(sizes, dtype=np.int64)
    return np.array([dataset[i].num_atoms for i in range(len(dataset))], dtype=np.int64)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  num_atoms: Optional[np.ndarray] = None, max_atoms: Optional[int] = None) -> List[List[int]]:
    """Global batches of epoch `epoch`: a pure function of (n, batch_size, seed, epoch, sizes).

    The order is numpy's default_rng([seed, epoch]) permutation (polarmace.data.graph.BatchSampler);
    with `max_atoms` a batch closes when the next configuration would exceed it.
    """
    from polarmace.data.graph import BatchSampler

    sizes = num_atoms if (max_atoms and num_atoms is not None) else np.ones(n, dtype=np.int64)
    sampler = BatchSampler(sizes, batch_size=batch_size, max_size=int(max_atoms) if max_atoms else None,
                           shuffle=shuffle, seed=int(seed))
    return [list(b) for b in sampler.batches(int(epoch))]


def iterate_graphs(dataset: Sequence, batches: Sequence[Sequence[int]], r_max: float,
                   num_workers: int = 0) -> Iterator[Optional[Dict[str, torch.Tensor]]]:
    """Collated graphs of the given index batches (None for an empty batch)."""
    if num_workers and num_workers > 0:
        from functools import partial

        nonempty = [list(b) for b in batches if len(b)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=nonempty, num_workers=num_workers,
                                             collate_fn=partial(collate_graph, r_max=r_max))
        it = iter(loader)
        for b in batches:
            yield next(it) if len(b) else None
        return
    for b in batches:
        yield collate_graph([dataset[i] for i in b], r_max) if len(b) else None


# =========================================================================== statistics
def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def compute_statistics(train: Sequence, cfg: Mapping[str, Any], batch_size: int = 32) -> Dict[str, Any]:
    """Elements, labels present, E0s, avg_num_neighbors, shift (mean interaction energy per
    atom) and scale (RMS force) over the TRAINING split, through collated graphs."""
    mcfg = _section(cfg, "model")
    r_max = float(mcfg.get("r_max", 5.0))
    zs_all: set = set()
    rows: List[Tuple[np.ndarray, float, int]] = []  # (atomic numbers, energy, n) for labelled E
    labels: Dict[str, float] = {t: 0.0 for t in TERMS}
    edges = atoms_total = 0
    f_sq = f_n = 0.0
    for start in range(0, len(train), batch_size):
        g = collate_graph([train[i] for i in range(start, min(start + batch_size, len(train)))], r_max)
        z = g["atomic_numbers"].cpu().numpy()
        zs_all.update(int(x) for x in np.unique(z))
        edges += int(g["edge_index"].shape[1])
        atoms_total += int(z.shape[0])
        ptr = g["ptr"].cpu().numpy()
        for t in TERMS:
            if t in g:
                m = g.get(f"{t}_mask")
                labels[t] += float(m.sum()) if m is not None else float(g[t].shape[0])
        if "energy" in g:
            em = g.get("energy_mask")
            e = g["energy"].cpu().double().numpy()
            for b in range(len(e)):
                if em is None or float(em[b]) > 0:
                    rows.append((z[ptr[b]:ptr[b + 1]], float(e[b]), int(ptr[b + 1] - ptr[b])))
        if "forces" in g:
            fm = g.get("forces_mask")
            f = g["forces"].cpu().double()
            if fm is not None:
                fm = fm.cpu().double()
                if fm.shape[0] != f.shape[0]:
                    fm = fm[g["batch"].cpu()]
                f_sq += float((f ** 2 * fm[:, None]).sum())
                f_n += float(fm.sum()) * 3
            else:
                f_sq += float((f ** 2).sum())
                f_n += f.numel()
    elements = mcfg.get("elements")
    if elements:
        missing = sorted(zs_all - {_z(s) for s in elements})
        if missing:
            from polarmace.config import ConfigError

            raise ConfigError(f"invalid value for 'model.elements': {elements} lacks "
                              f"{[_symbol(z) for z in missing]}, present in the training data")
        elements = list(elements)
    else:
        elements = [_symbol(z) for z in sorted(zs_all)]
    e0s = _e0s(mcfg.get("e0s", "least_squares"), elements, rows)
    shift = 0.0
    if rows:
        inter = [(e - float(sum(e0s[_symbol(x)] for x in zz_row))) / n for zz_row, e, n in rows]
        shift = float(np.mean(inter))
    scale = math.sqrt(f_sq / f_n) if f_n > 0 else 1.0
    return {
        "elements": elements,
        "e0s": e0s,
        "avg_num_neighbors": edges / max(atoms_total, 1),
        "shift": shift,
        "scale": scale if scale > 0 else 1.0,
        "labels": {t: c for t, c in labels.items() if c > 0},
        "num_train": len(train),
    }


def _e0s(spec: Any, elements: List[str], rows) -> Dict[str, float]:
    if isinstance(spec, Mapping):
        missing = [s for s in elements if s not in spec]
        if missing:
            from polarmace.config import ConfigError

            raise ConfigError(f"invalid value for 'model.e0s': no E0 for {missing}, present in the training data")
        return {s: float(spec[s]) for s in elements}
    if not rows:
        warnings.warn("no energy labels in the training data: E0s set to 0", UserWarning, stacklevel=2)
        return {s: 0.0 for s in elements}
    index = {_z(s): k for k, s in enumerate(elements)}
    counts = np.zeros((len(rows), len(elements)))
    energies = np.array([e for _, e, _ in rows])
    for r, (zz, _, _) in enumerate(rows):
        for x in zz:
            counts[r, index[int(x)]] += 1
    if spec == "average":
        per_atom = float(np.mean(energies / counts.sum(1)))
        return {s: per_atom for s in elements}
    if spec != "least_squares":
        raise ValueError(f"model.e0s must be 'least_squares', 'average' or {{symbol: eV}}, got {spec!r}")
    sol, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {s: float(v) for s, v in zip(elements, sol)}


# ========================================================================= optimisation
def build_optimizer(model: torch.nn.Module, tcfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = str(tcfg.get("optimizer", "adam")).lower()
    lr = float(tcfg.get("lr", 1e-2))
    wd = float(tcfg.get("weight_decay", 0.0) or 0.0)
    amsgrad = bool(tcfg.get("amsgrad", True))
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, amsgrad=amsgrad)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, amsgrad=amsgrad)
    raise ValueError(f"training.optimizer must be 'adam' or 'adamw', got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Mapping[str, Any], epochs: int):
    """plateau: ReduceLROnPlateau(lr_factor, scheduler_patience, min_lr) stepped on the
    validation loss at every evaluation; cosine: CosineAnnealingLR(T_max=epochs, eta_min=min_lr)
    stepped every epoch; null: constant lr."""
    name = tcfg.get("scheduler", "plateau")
    if name in (None, "none", "null", False):
        return None
    min_lr = float(tcfg.get("min_lr", 0.0) or 0.0)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(tcfg.get("lr_factor", 0.8)),
            patience=int(tcfg.get("scheduler_patience", 50)), min_lr=min_lr)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1), eta_min=min_lr)
    raise ValueError(f"training.scheduler must be 'plateau', 'cosine' or null, got {name!r}")


def stage_two_start(tcfg: Mapping[str, Any], epochs: int) -> Optional[int]:
    """First (0-based) epoch of stage two, from stage_two.start_epoch or .start_fraction."""
    st = tcfg.get("stage_two") or {}
    if st.get("start_epoch") is not None:
        return int(st["start_epoch"])
    if st.get("start_fraction") is not None:
        return int(round(float(st["start_fraction"]) * epochs))
    return None


def stage_two_time(tcfg: Mapping[str, Any]) -> Optional[float]:
    """Training time (s) after which stage two starts: stage_two.start_fraction × max_time when
    both are set (and no start_epoch), else None."""
    st = tcfg.get("stage_two") or {}
    if tcfg.get("max_time") is None or st.get("start_fraction") is None or st.get("start_epoch") is not None:
        return None
    return float(st["start_fraction"]) * float(tcfg["max_time"])


def training_time(history: Sequence[Mapping[str, Any]]) -> float:
    """Training wall time so far (s): the sum of the epoch times (steps + validation) in the
    history, which checkpoints carry, so it survives resumes."""
    return float(sum(float(row.get("time_s", 0.0)) for row in history))


def stage_weights(tcfg: Mapping[str, Any], stage: int) -> Dict[str, float]:
    weights = {t: float(v) for t, v in (tcfg.get("loss_weights") or tcfg.get("weights") or {}).items()
               if t in TERMS and v is not None}
    base = {"energy": 1.0, "forces": 100.0}
    base.update(weights)
    if stage == 2:
        st = tcfg.get("stage_two") or {}
        for key, term in (("energy_weight", "energy"), ("forces_weight", "forces"),
                          ("stress_weight", "stress"), ("virials_weight", "virials"),
                          ("dipole_weight", "dipole"), ("bec_weight", "bec")):
            if st.get(key) is not None:
                base[term] = float(st[key])
    return base


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ================================================================================ steps
@dataclass
class StepResult:
    loss: float
    pred: Optional[Dict[str, torch.Tensor]]


def forward(model: torch.nn.Module, graph: Mapping[str, torch.Tensor], loss_fn: WeightedLoss,
            training: bool) -> Dict[str, torch.Tensor]:
    return model(dict(graph), compute_forces=True, compute_stress=loss_fn.needs_stress or "stress" in graph
                 or "virials" in graph, compute_bec=loss_fn.needs_bec)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: WeightedLoss,
               graph: Optional[Mapping[str, torch.Tensor]], info: ddp.DistInfo,
               clip_grad: Optional[float], ema: Optional[ExponentialMovingAverage],
               dtype: torch.dtype, device: torch.device) -> StepResult:
    """One optimiser step on this rank's shard `graph` (None: empty shard)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    counts = loss_fn.counts(graph) if graph is not None else torch.zeros(len(TERMS), dtype=dtype, device=device)
    ddp.all_reduce_sum(counts, info)
    pred = None
    loss_value = torch.zeros((), dtype=dtype, device=device)
    if graph is not None:
        pred = forward(model, graph, loss_fn, training=True)
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
             ema: Optional[ExponentialMovingAverage] = None, num_workers: int = 0,
             desc: str = "eval") -> Dict[str, float]:
    """Loss and error metrics over `dataset` (EMA weights when `ema` is given); ranks evaluate
    interleaved batches and the sums are all-reduced."""
    if dataset is None or len(dataset) == 0:
        return {}
    batches = epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False)
    mine = batches[info.rank::info.world_size]
    acc = MetricsAccumulator()
    model.eval()
    ctx = ema.average_parameters(model) if ema is not None else _nullcontext()
    with ctx:
        for graph in iterate_graphs(dataset, mine, r_max, num_workers):
            graph = to_device(graph, device, dtype)
            pred = forward(model, graph, loss_fn, training=False)
            loss, _ = loss_fn(pred, graph)
            n = float(graph["num_atoms"].shape[0])
            acc.update({k: v.detach() for k, v in pred.items() if isinstance(v, torch.Tensor)}, graph,
                       loss=float(loss.detach()), loss_weight=n)
    if info.enabled:
        sums = acc.sums()
        ddp.all_reduce_sum(sums, info)
        acc.load_sums(sums)
    return acc.compute()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# =============================================================================== logging
def _setup_logging(run_dir: Path, is_main: bool) -> List[logging.Handler]:
    added: List[logging.Handler] = []
    log.setLevel(logging.INFO)
    log.propagate = False
    if not is_main:
        return added
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    h1 = logging.StreamHandler(sys.stdout)
    h1.setFormatter(fmt)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        h2 = logging.FileHandler(run_dir / "train.log")
    except OSError as exc:
        from polarmace.errors import output_error

        raise output_error(run_dir / "train.log", exc) from exc
    h2.setFormatter(fmt)
    for h in (h1, h2):
        log.addHandler(h)
        added.append(h)
    return added


EPOCH_COLUMNS = ("epoch", "stage", "train_loss", "valid_loss", "valid_E_rmse", "valid_E_mae",
                 "valid_F_rmse", "valid_F_mae", "lr", "time_s")


def epoch_line(row: Mapping[str, Any], header: bool = False) -> str:
    names = ("epoch", "st", "loss(train)", "loss(valid)", "E_rmse", "E_mae", "F_rmse", "F_mae", "lr", "time")
    widths = (5, 2, 11, 11, 9, 9, 9, 9, 9, 7)
    if header:
        return " ".join(n.rjust(w) for n, w in zip(names, widths)) + \
            "   (E meV/atom, F meV/Å, valid set, EMA weights when enabled)"
    vals = []
    for col, w in zip(EPOCH_COLUMNS, widths):
        v = row.get(col)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            s = "-"
        elif col in ("epoch", "stage"):
            s = str(int(v))
        elif col == "lr":
            s = f"{v:.2e}"
        elif col == "time_s":
            s = f"{v:.1f}s"
        else:
            s = f"{v:.4g}"
        vals.append(s.rjust(w))
    return " ".join(vals)


def write_history(history: List[Dict[str, Any]], run_dir: Path, make_plot: bool) -> None:
    cols: List[str] = []
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write_text(buf.getvalue(), run_dir / "metrics.csv")
    atomic_write_text(json.dumps(history, indent=1), run_dir / "metrics.json")
    if make_plot:
        try:
            plots.learning_curve(history, run_dir / "learning_curve.png")
        except Exception as exc:  # a plot never kills a run
            log.warning("learning curve not drawn: %s", exc)


# ================================================================================ driver
@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    history: List[Dict[str, Any]]
    test_metrics: Dict[str, float] = field(default_factory=dict)
    model: Optional[torch.nn.Module] = None


def _call_factory(factory: Callable, cfg: Dict[str, Any], stats: Dict[str, Any]) -> torch.nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    if "statistics" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return factory(copy.deepcopy(cfg), statistics=copy.deepcopy(stats))
    return factory(copy.deepcopy(cfg))


def _default_factory() -> Callable:
    from polarmace import build_model  # lazy: model.py is optional until the lead adds it

    return build_model


def _save_model(model: torch.nn.Module, path: Path) -> None:
    from polarmace.errors import output_error

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if hasattr(model, "save"):
            model.save(str(tmp))
        else:  # pragma: no cover - contract says models have save()
            torch.save({"config": getattr(model, "config", None), "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if tmp.exists():
            tmp.unlink()
        error = output_error(path, exc)
        if error is None:
            raise
        raise error from exc


def _fire(callbacks: Sequence[Callback], event: str, state: Dict[str, Any]) -> None:
    for cb in callbacks:
        cb(event, state)


def train(config: Any, model_factory: Optional[Callable] = None, resume: bool = False,
          overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
          checkpoint_steps: Optional[int] = None) -> TrainResult:
    """Train a model from a config (Config, dict or YAML path); returns the final model path.

    `model_factory(config_dict[, statistics=...])` builds the model; None means
    ``polarmace.build_model``. The config dict passed in has model.elements, model.e0s (per
    element, eV) and model.avg_num_neighbors resolved from the training data; `statistics` adds
    shift (mean interaction energy per atom, eV) and scale (RMS force, eV/Å).

    A checkpoint is written at the end of every epoch and, with `checkpoint_steps` = K, also
    every K optimiser steps inside an epoch (with the step-in-epoch, so that a resumed run
    retraces the uninterrupted one). `callbacks` are called as cb(event, state) with the events
    "step_end" and "epoch_end".

    With ``training.max_time`` (s) the run stops after the epoch during which the summed epoch
    times (:func:`training_time`, carried by checkpoints) pass the budget and then finishes as
    after its last epoch (best/EMA weights, final model, metrics on every split).
    """
    from polarmace.errors import resolve_device
    from polarmace.runtime import tune_allocator

    tune_allocator()  # speed only: no page-fault churn on the per-step buffers
    cfg = resolve_config(config, overrides)
    explicit = explicit_loss_terms(config, overrides)
    tcfg, dcfg, ocfg, mcfg = (_section(cfg, s) for s in ("training", "data", "output", "model"))
    if not dcfg.get("train"):
        from polarmace.config import ConfigError

        raise ConfigError("data.train is not set: give the training file (.xyz/.extxyz, input.data or .h5) "
                          "in the config or as the override data.train=PATH")
    device = resolve_device(str(tcfg.get("device", "cpu") or "cpu"), "training.device")
    info = ddp.init(str(device))
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    dtype = getattr(torch, str(mcfg.get("dtype", "float64")))
    run_dir = run_directory(cfg)
    # the lock comes first: a second run in the same directory writes nothing, not even a log line
    lock = RunLock(run_dir, "polarmace-train") if info.is_main else None
    if lock is not None:
        lock.acquire()
    handlers: List[logging.Handler] = []
    old_dtype = torch.get_default_dtype()
    try:
        _refuse_overwrite(run_dir, resume, int(ocfg.get("keep_checkpoints", 3) or 3))
        handlers = _setup_logging(run_dir, info.is_main)
        torch.set_default_dtype(dtype)
        return _train(cfg, model_factory, resume, callbacks, info, device, dtype, run_dir, explicit,
                      checkpoint_steps)
    finally:
        torch.set_default_dtype(old_dtype)
        for h in handlers:
            log.removeHandler(h)
            h.close()
        if lock is not None:
            lock.release()


def _refuse_overwrite(run_dir: Path, resume: bool, keep: int) -> None:
    """A new run (no --resume) never overwrites a directory that holds another run's checkpoints."""
    if not resume and CheckpointHandler(run_dir, keep=keep).list():
        raise RunExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another output.name / output.directory")


def _train(cfg, model_factory, resume, callbacks, info, device, dtype, run_dir, explicit,
           checkpoint_steps) -> TrainResult:
    tcfg, dcfg, ocfg = (_section(cfg, s) for s in ("training", "data", "output"))
    ckpts = CheckpointHandler(run_dir, keep=int(ocfg.get("keep_checkpoints", 3) or 3))
    latest = ckpts.latest() if resume else None
    if resume and latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    state = ckpts.load(latest) if latest is not None else None

    seed = int(tcfg.get("seed", dcfg.get("seed", 1)) or 0)
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)

    data = build_data(cfg, run_dir, resume=state is not None, is_main=info.is_main)
    changes: Dict[str, Tuple[Any, Any]] = {}
    if state is not None:
        model_cfg, stats = copy.deepcopy(state["config"]), state["statistics"]
        _warn_config_changes(cfg, model_cfg)
        # training.* keys: the changed ones are applied (or reported as ignored), and the
        # checkpoint's config records what is in effect, so a later resume sees no change
        tcfg, changes = resume_training_section(tcfg, model_cfg.get("training") or {})
        model_cfg["training"] = copy.deepcopy(tcfg)
    else:
        stats = compute_statistics(data.train, cfg)
        model_cfg = copy.deepcopy(cfg)
        model_cfg["model"]["elements"] = stats["elements"]
        model_cfg["model"]["e0s"] = stats["e0s"]
        if model_cfg["model"].get("avg_num_neighbors") is None:
            model_cfg["model"]["avg_num_neighbors"] = stats["avg_num_neighbors"]
        for key in ("epochs", "patience", "eval_interval", "max_time"):  # run-length keys may change on resume
            model_cfg["training"][key] = cfg["training"].get(key)
    epochs = int(tcfg.get("epochs", 100))  # 0: no training, the initial model is saved and evaluated
    model_cfg["training"]["epochs"] = epochs

    if info.is_main:
        atomic_write_text(json.dumps(model_cfg, indent=1, default=str), run_dir / "config.json")
        _write_yaml(model_cfg, run_dir / "config.yaml")
        log.info("run directory %s (%s)", run_dir, "resuming " + latest.name if latest else "new run")
        log.info("data: %d train, %d valid, %d test configurations; elements %s",
                 len(data.train), len(data.valid or []), len(data.test or []), stats["elements"])
        log.info("E0s (eV): %s; avg_num_neighbors %.3f; shift %.5g eV/atom; scale %.5g eV/Å",
                 {k: round(v, 6) for k, v in stats["e0s"].items()}, stats["avg_num_neighbors"],
                 stats["shift"], stats["scale"])

    factory = model_factory or _default_factory()
    model = _call_factory(factory, model_cfg, stats).to(device)
    ddp.broadcast_parameters(model, info)
    loss_fn = WeightedLoss(stage_weights(tcfg, 1))
    with warnings.catch_warnings():
        if not info.is_main:
            warnings.simplefilter("ignore")
        loss_fn.resolve(stats["labels"].keys(), log_active=info.is_main, explicit=explicit)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, epochs)
    ema = ExponentialMovingAverage(model, float(tcfg["ema_decay"])) if tcfg.get("ema_decay") else None
    if info.is_main:
        log.info("model: %d parameters; optimizer %s lr %.3g; scheduler %s; EMA %s",
                 sum(p.numel() for p in model.parameters()), tcfg.get("optimizer", "adam"),
                 current_lr(optimizer), tcfg.get("scheduler", "plateau"),
                 f"decay {tcfg['ema_decay']} (evaluation uses the EMA weights)" if ema else "off")

    start_epoch, start_step = 0, 0
    history: List[Dict[str, Any]] = []
    best, since_best, finished = math.inf, 0, False
    state_stopped_by = ""
    partial: Dict[str, Any] = {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            if state.get("ema") is None:
                log.warning("checkpoint has no EMA state: EMA restarts from the current weights")
            else:
                ema.load_state_dict(state["ema"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history = list(state.get("history", []))
        best, since_best = float(state.get("best_metric", math.inf)), int(state.get("since_best", 0))
        finished = bool(state.get("finished", False))
        state_stopped_by = str(state.get("stopped_by", "epochs"))
        partial = state.get("partial") or {}
        set_rng_state(state["rng"])
        in_stage_two = bool(partial.get("stage_two_applied")) or (bool(history) and int(history[-1].get("stage", 1)) == 2)
        apply_training_changes(changes, optimizer, scheduler, ema, in_stage_two)
        if info.is_main:
            log.info("resumed at epoch %d step %d (best %.6g, lr %.3g)", start_epoch, start_step, best,
                     current_lr(optimizer))

    r_max = float(model_cfg["model"].get("r_max", 5.0))
    batch_size = int(dcfg.get("batch_size", 4) or 4)
    max_atoms = dcfg.get("max_atoms_per_batch")
    num_workers = int(dcfg.get("num_workers", 0) or 0)
    atoms_per_config = num_atoms_of(data.train) if max_atoms else None
    clip = tcfg.get("clip_grad")
    patience = tcfg.get("patience")
    eval_interval = int(tcfg.get("eval_interval", 1) or 1)
    s2 = stage_two_start(tcfg, epochs)
    max_time = float(tcfg["max_time"]) if tcfg.get("max_time") is not None else None
    if finished and _extended(state_stopped_by, epochs, max_time, start_epoch, history):
        finished = False
        if info.is_main:
            log.info("resuming a finished run: training.epochs/max_time now allow more training")
    s2_time = stage_two_time(tcfg)
    ckpt_every = checkpoint_steps
    checkpoint_interval = max(int(ocfg.get("checkpoint_interval", 1) or 1), 1)
    make_plots = bool(ocfg.get("plots", True)) and info.is_main
    data_seed = int(dcfg.get("seed", 1) if dcfg.get("seed") is not None else seed)

    def checkpoint(epoch: int, step: int, extra: Optional[Dict[str, Any]] = None) -> None:
        if not info.is_main:
            return
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "ema": ema.state_dict() if ema is not None else None,
                   "best_metric": best, "since_best": since_best, "history": history,
                   "config": model_cfg, "statistics": stats, "splits": data.indices,
                   "world_size": info.world_size, "versions": versions()}
        payload.update(extra or {})
        ckpts.save(payload, epoch, step)

    header_printed = False
    epoch = start_epoch
    while epoch < epochs and not finished:
        elapsed = training_time(history)
        stage = 2 if ((s2 is not None and epoch >= s2) or (s2_time is not None and elapsed >= s2_time)) else 1
        loss_fn.set_weights(stage_weights(tcfg, stage))
        entering = stage == 2 and (not history or int(history[-1].get("stage", 1)) != 2)
        if entering and start_step == 0 and not partial.get("stage_two_applied"):
            lr2 = (tcfg.get("stage_two") or {}).get("lr")
            if lr2 is not None:
                for g in optimizer.param_groups:
                    g["lr"] = float(lr2)
            best, since_best = math.inf, 0
            if info.is_main:
                log.info("stage two from epoch %d%s: loss weights %s%s", epoch,
                         f" ({elapsed:.0f} s of the {max_time:.0f} s budget)"
                         if s2_time is not None and elapsed >= s2_time else "", loss_fn.describe(),
                         f", lr {float(lr2):.3g}" if lr2 is not None else "")
        batches = epoch_batches(len(data.train), batch_size, data_seed, epoch, True, atoms_per_config,
                                int(max_atoms) if max_atoms else None)
        t0 = time.time() - float(partial.get("elapsed", 0.0))
        train_acc = MetricsAccumulator()
        loss_sum, loss_n = float(partial.get("loss_sum", 0.0)), float(partial.get("loss_n", 0.0))
        if partial.get("train_sums") is not None:
            train_acc.load_sums(partial["train_sums"])
        shards = [ddp.shard(b, info.rank, info.world_size) for b in batches[start_step:]]
        progress = _progress(len(batches), start_step, epoch, info.is_main)
        step = start_step
        for graph in iterate_graphs(data.train, shards, r_max, num_workers):
            graph = to_device(graph, device, dtype) if graph is not None else None
            res = train_step(model, optimizer, loss_fn, graph, info, clip, ema, dtype, device)
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
            if ckpt_every and step % int(ckpt_every) == 0 and step < len(batches):
                checkpoint(epoch, step, {"partial": {"loss_sum": loss_sum, "loss_n": loss_n,
                                                     "train_sums": train_acc.sums(),
                                                     "elapsed": time.time() - t0,
                                                     "stage_two_applied": stage == 2}})
            _fire(callbacks, "step_end", {"epoch": epoch, "step": step, "loss": res.loss, "model": model})
        if progress is not None:
            progress.close()
        start_step, partial = 0, {}

        row: Dict[str, Any] = {"epoch": epoch + 1, "stage": stage, "train_loss": loss_sum / max(loss_n, 1)}
        tsums = train_acc.sums()
        ddp.all_reduce_sum(tsums, info)
        train_acc.load_sums(tsums)
        for k, v in train_acc.compute().items():
            if k != "loss":
                row[f"train_{k}"] = v
        # the budget is checked before validation so that the last epoch is always evaluated
        # (rank 0's clock decides, so that data-parallel ranks stop together)
        budget_hit = max_time is not None and ddp.broadcast_object(elapsed + (time.time() - t0) >= max_time, info)
        do_eval = ((epoch + 1) % eval_interval == 0) or epoch + 1 == epochs or budget_hit
        metric = row["train_loss"]
        if do_eval and data.valid is not None:
            vm = evaluate(model, data.valid, loss_fn, r_max, batch_size, dtype, device, info, ema, num_workers)
            row.update({f"valid_{k}": v for k, v in vm.items()})
            metric = vm.get("loss", metric)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if do_eval:
                    scheduler.step(metric)
            else:
                scheduler.step()
        row["lr"] = current_lr(optimizer)
        row["time_s"] = time.time() - t0
        if max_time is not None:  # one clock for all ranks: the stage and the stop agree
            row["time_s"] = float(ddp.broadcast_object(row["time_s"], info))
        out_of_time = max_time is not None and elapsed + row["time_s"] >= max_time
        history.append(row)
        improved = do_eval and metric < best
        if improved:
            best, since_best = metric, 0
            if info.is_main:
                _save_best(model, ema, run_dir, epoch + 1, metric)
        elif do_eval:
            since_best += 1
        if info.is_main:
            if not header_printed:
                log.info(epoch_line({}, header=True))
                header_printed = True
            log.info(epoch_line(row) + ("  *" if improved else ""))
            # the learning curve costs ~1 s: drawn every 10 epochs and at the end
            write_history(history, run_dir, make_plots and ((epoch + 1) % 10 == 0 or epoch + 1 >= epochs or out_of_time
                                                            or (patience is not None and since_best >= int(patience))))
        stop = patience is not None and since_best >= int(patience)
        if stop and info.is_main:
            log.info("early stopping: no improvement of the %s loss for %d epochs",
                     "valid" if data.valid is not None else "train", since_best)
        if out_of_time and info.is_main:
            log.info("time budget: %.1f s of training >= training.max_time %.0f s after epoch %d: stopping",
                     elapsed + row["time_s"], max_time, epoch + 1)
        finished = stop or out_of_time or epoch + 1 >= epochs
        reason = "patience" if stop else ("time" if out_of_time else "epochs")
        if finished or (epoch + 1) % checkpoint_interval == 0:
            checkpoint(epoch + 1, 0, {"finished": finished, "stopped_by": reason})
        _fire(callbacks, "epoch_end", {"epoch": epoch, "row": row, "model": model})
        epoch += 1

    if epochs == 0 and state is None:
        if info.is_main:
            log.info("training.epochs is 0: no training; the initial model is saved and evaluated")
        checkpoint(0, 0, {"finished": True, "stopped_by": "epochs"})  # a later --resume may train it
    # the final evaluation's loss uses the weights of the stage training ended in, also when a
    # run killed during that evaluation is resumed (the loop above then does not run)
    loss_fn.set_weights(stage_weights(tcfg, int(history[-1].get("stage", 1)) if history else 1))
    return _finish(model, ema, data, loss_fn, cfg, model_cfg, run_dir, history, r_max, batch_size,
                   dtype, device, info, num_workers)


def _extended(stopped_by: str, epochs: int, max_time: Optional[float], start_epoch: int,
              history: List[Dict[str, Any]]) -> bool:
    """Whether a run that finished may go on: its epoch or time limit was raised on resume.
    Early stopping (patience) stays final."""
    if stopped_by == "patience" or start_epoch >= epochs:
        return False
    if stopped_by == "time":
        return max_time is None or training_time(history) < max_time
    return True


def _save_best(model, ema, run_dir: Path, epoch: int, metric: float) -> None:
    ctx = ema.average_parameters(model) if ema is not None else _nullcontext()
    with ctx:
        atomic_save({"epoch": epoch, "metric": metric, "ema": ema is not None,
                     "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                    run_dir / "best.pt")


def _finish(model, ema, data, loss_fn, cfg, model_cfg, run_dir, history, r_max, batch_size, dtype, device,
            info, num_workers) -> TrainResult:
    """Load the best (EMA) weights, save the final model, evaluate on every split."""
    best_path = run_dir / "best.pt"
    ddp.barrier(info)
    if best_path.exists():
        blob = torch.load(best_path, map_location=device, weights_only=False)
        model.load_state_dict(blob["state_dict"])
        which = f"best epoch {blob['epoch']}" + (" (EMA weights)" if blob.get("ema") else "")
    else:
        if ema is not None:
            ema.copy_to(model)
        which = "last epoch" + (" (EMA weights)" if ema is not None else "")
    model_path = run_dir / f"{model_name(cfg)}.model"
    if info.is_main:
        _save_model(model, model_path)
        log.info("saved model %s (%s)", model_path, which)
    table: Dict[str, Dict[str, float]] = {}
    for name, ds in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        if ds is None or len(ds) == 0:
            continue
        table[name] = evaluate(model, ds, loss_fn, r_max, batch_size, dtype, device, info, None, num_workers)
    if info.is_main and table:
        log.info("\n" + format_table(table, title=f"final errors ({which})"))
        atomic_write_text(json.dumps(table, indent=1), run_dir / "final_metrics.json")
        _report_electrical(model, data, run_dir, batch_size)
    ddp.barrier(info)
    return TrainResult(run_dir, model_path, history, table.get("test", {}), model)


def _report_electrical(model, data, run_dir: Path, batch_size: int) -> None:
    """Log the learned charges per element (and BEC R² where the set has reference BEC) on the
    test split, else the validation split; also written to electrical.json."""
    from polarmace.training.electrical import electrical_summary, format_electrical

    name, ds = ("test", data.test) if data.test is not None and len(data.test) else ("valid", data.valid)
    if ds is None or not len(ds):
        return
    summary = electrical_summary(model, ds, batch_size=batch_size)
    if summary is None:
        return
    log.info("\n" + format_electrical(summary, title=f"learned electrostatics, {name} split"))
    atomic_write_text(json.dumps(summary, indent=1), run_dir / "electrical.json")


def _progress(total: int, initial: int, epoch: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", leave=False, disable=None,
                dynamic_ncols=True)


def _warn_config_changes(cfg: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Report model/long_range/data keys that differ from the checkpoint (training.* keys: see
    `resume_training_section`)."""
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


#: training.* keys a resumed run takes from the new config; the others keep the checkpoint's value
#: (the restored optimizer/scheduler state and RNG streams are built for it).
RESUME_APPLIED = ("epochs", "lr", "weight_decay", "lr_factor", "scheduler_patience", "min_lr", "loss_weights",
                  "ema_decay", "stage_two", "clip_grad", "patience", "device", "eval_interval", "max_time")
RESUME_IGNORED = {"optimizer": "the optimizer state of the checkpoint is restored",
                  "amsgrad": "the optimizer state of the checkpoint is restored",
                  "scheduler": "the scheduler state of the checkpoint is restored",
                  "seed": "the random streams of the checkpoint are restored"}


def resume_training_section(new: Mapping[str, Any], saved: Mapping[str, Any]
                            ) -> Tuple[Dict[str, Any], Dict[str, Tuple[Any, Any]]]:
    """(training section in effect, {key: (old, new)} of the applied changes) for a resume.

    A changed key of RESUME_APPLIED takes the new value (logged); one of RESUME_IGNORED keeps
    the checkpoint's value with a warning that says so.
    """
    effective = copy.deepcopy(dict(new))
    changes: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(new) | set(saved)):
        old, value = saved.get(key), new.get(key)
        if old == value or key not in saved:
            continue
        if key in RESUME_IGNORED:
            effective[key] = copy.deepcopy(old)
            log.warning("resume: training.%s = %r is ignored (the run keeps %r): %s; start a new run to "
                        "change it", key, value, old, RESUME_IGNORED[key])
        else:
            changes[key] = (old, value)
    return effective, changes


def apply_training_changes(changes: Mapping[str, Tuple[Any, Any]], optimizer: torch.optim.Optimizer,
                           scheduler: Any, ema: Optional[ExponentialMovingAverage], in_stage_two: bool) -> None:
    """Put the changed training.* values into the restored optimizer, scheduler and EMA (their
    states carry the old ones) and log each change."""
    lr_key = None
    if "lr" in changes and not in_stage_two:
        lr_key = "lr"
    st_old, st_new = changes.get("stage_two", ({}, {}))
    if in_stage_two and (st_old or {}).get("lr") != (st_new or {}).get("lr") and (st_new or {}).get("lr"):
        lr_key = "stage_two.lr"
    if lr_key is not None:
        lr = float(changes["lr"][1]) if lr_key == "lr" else float(st_new["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(scheduler, "base_lrs"):  # cosine: the schedule continues from the new value
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
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
        note = f" (the optimizer continues at lr {float(optimizer.param_groups[0]['lr']):.3g})"             if key == "lr" or (key == "stage_two" and lr_key == "stage_two.lr") else ""
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


def _write_yaml(cfg: Mapping[str, Any], path: Path) -> None:
    try:
        import yaml

        atomic_write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False), path)
    except ImportError:  # pragma: no cover
        pass

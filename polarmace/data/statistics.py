"""Statistics of a training set that fix a model's normalisation: elements, E0s, average number
of neighbours, shift and scale, and which labels the set carries."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .schema import LABEL_NAMES, Configuration
from ..errors import ConfigError
from .graph import collate

__all__ = ["STATISTICS_KEYS", "compute_statistics", "fit_e0s"]

#: The keys of a `compute_statistics` result (what a stored copy must hold to stand in for it).
STATISTICS_KEYS = ("elements", "e0s", "avg_num_neighbors", "r_max", "shift", "mean_energy_per_atom", "scale",
                   "labels", "num_structures", "num_atoms")


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def compute_statistics(configurations: Sequence[Configuration], r_max: float, elements: Optional[Sequence[str]] = None,
                       e0s: Any = "least_squares", batch_size: int = 32,
                       elements_key: str = "model.elements") -> Dict[str, Any]:
    """Statistics of a set (the training split, or an HDF5 set when it is written), through
    collated graphs with neighbours within `r_max` (Å). The one statistics function: the
    trainer normalises its model with it and `write_dataset` stores its result.

    `elements` (None: those found; `elements_key` names the setting in errors) and `e0s`
    ("least_squares", "average" or {symbol: eV}) as in ``model``. Returns {elements,
    e0s {symbol: eV} (None when the set has no energies and none are given), avg_num_neighbors,
    r_max, shift (mean interaction energy per atom, eV), mean_energy_per_atom (eV or None),
    scale (RMS force component, eV/Å; 1 without forces), labels {label: structures or atoms
    carrying it}, num_structures, num_atoms}.
    """
    zs_all: set = set()
    rows: List[Tuple[np.ndarray, float, int]] = []  # (atomic numbers, energy, n) of labelled E
    labels: Dict[str, float] = {t: 0.0 for t in LABEL_NAMES}
    edges = atoms_total = 0
    f_sq = f_n = 0.0
    train = configurations
    for start in range(0, len(train), batch_size):
        g = collate([train[i] for i in range(start, min(start + batch_size, len(train)))], cutoff=float(r_max))
        z = g["atomic_numbers"].cpu().numpy()
        zs_all.update(int(x) for x in np.unique(z))
        edges += int(g["edge_index"].shape[1])
        atoms_total += int(z.shape[0])
        ptr = g["ptr"].cpu().numpy()
        for t in LABEL_NAMES:
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
    if elements:
        missing = sorted(zs_all - {_z(s) for s in elements})
        if missing:
            raise ConfigError(f"invalid value for '{elements_key}': {list(elements)} lacks "
                              f"{[_symbol(z) for z in missing]}, present in the data")
        elements = list(elements)
    else:
        elements = [_symbol(z) for z in sorted(zs_all)]
    fitted = fit_e0s(e0s, elements, rows)
    shift = 0.0
    if rows and fitted is not None:
        inter = [(e - float(sum(fitted[_symbol(x)] for x in zz_row))) / n for zz_row, e, n in rows]
        shift = float(np.mean(inter))
    scale = math.sqrt(f_sq / f_n) if f_n > 0 else 1.0
    return {
        "elements": elements,
        "e0s": fitted,
        "avg_num_neighbors": edges / max(atoms_total, 1),
        "r_max": float(r_max),
        "shift": shift,
        "mean_energy_per_atom": float(np.mean([e / n for _, e, n in rows])) if rows else None,
        "scale": scale if scale > 0 else 1.0,
        "labels": {t: c for t, c in labels.items() if c > 0},
        "num_structures": len(train),
        "num_atoms": atoms_total,
    }


def fit_e0s(spec: Any, elements: List[str], rows: Sequence[Tuple[np.ndarray, float, int]]) -> Optional[Dict[str, float]]:
    """Isolated-atom energies {symbol: eV}: given ({symbol: eV}), "average" (mean energy per
    atom) or "least_squares" over `rows` = (atomic numbers, energy eV, atoms) per structure;
    None when there are no energies to fit."""
    if isinstance(spec, Mapping):
        missing = [s for s in elements if s not in spec]
        if missing:
            raise ConfigError(f"invalid value for 'model.e0s': no E0 for {missing}, present in the training data")
        return {s: float(spec[s]) for s in elements}
    if not rows:
        return None
    index = {_z(s): k for k, s in enumerate(elements)}
    counts = np.zeros((len(rows), len(elements)))
    energies = np.array([e for _, e, _ in rows])
    for r, (zz, _, _) in enumerate(rows):
        for x in zz:
            counts[r, index[int(x)]] += 1
    if spec == "average":
        per_atom = float(np.mean(energies / counts.sum(1)))
        return {s: per_atom for s in elements}
    sol, *_ = np.linalg.lstsq(counts, energies, rcond=None)  # "least_squares" (the config checks the name)
    return {s: float(v) for s, v in zip(elements, sol)}

"""dP/dt = Σ_i Z*_i·v_i of many frames of one system, with the model's Born effective charges,
split across worker processes (one torch thread each): the IR input of a stored trajectory,
e.g. the bead trajectories of a path-integral run (benchmarks/water_ir_trpmd.py)."""

from __future__ import annotations

from multiprocessing import get_context
from typing import Iterator, Optional, Sequence, Union

import numpy as np

__all__ = ["dipole_derivatives"]

_CALCULATOR = None  # one per worker process


def _start_worker(model: str, dtype: Optional[str], eps_infty: Optional[float]) -> None:
    import torch

    from polarmace.calculator import PolarMACECalculator

    global _CALCULATOR
    torch.set_num_threads(1)
    _CALCULATOR = PolarMACECalculator(model, dtype=dtype, eps_infty=eps_infty, compute_bec=True)


def _chunk(job) -> np.ndarray:
    from ase import Atoms

    numbers, cell, pbc, positions, velocities = job
    out = np.zeros((len(positions), 3))
    for f, (x, v) in enumerate(zip(positions, velocities)):
        atoms = Atoms(numbers=numbers, positions=x, cell=cell, pbc=pbc)
        out[f] = np.einsum("nab,nb->a", _CALCULATOR.get_property("bec", atoms), v)
    return out


def dipole_derivatives(model: str, numbers: np.ndarray, cell: np.ndarray, positions: np.ndarray,
                       velocities: np.ndarray, pbc: Union[bool, Sequence[bool]] = True, dtype: Optional[str] = None,
                       eps_infty: Optional[float] = None, workers: int = 1,
                       progress: Optional[str] = None) -> np.ndarray:
    """Σ_i Z*_i·v_i [F, 3] e·Å/fs for positions [F, N, 3] Å and velocities [F, N, 3] Å/fs of
    one system (atomic numbers [N], cell [3, 3] Å). `progress`: a tqdm label, or None."""
    positions, velocities = np.asarray(positions, float), np.asarray(velocities, float)
    if positions.shape != velocities.shape or positions.ndim != 3 or positions.shape[1] != len(numbers):
        raise ValueError(f"positions {positions.shape} and velocities {velocities.shape} must both be "
                         f"[frames, {len(numbers)}, 3]")
    chunks = [c for c in np.array_split(np.arange(len(positions)), max(1, 4 * workers)) if len(c)]
    jobs = [(np.asarray(numbers), np.asarray(cell), pbc, positions[c], velocities[c]) for c in chunks]
    with get_context("spawn").Pool(max(1, workers), _start_worker, (str(model), dtype, eps_infty)) as pool:
        parts: Iterator[np.ndarray] = pool.imap(_chunk, jobs)
        if progress:
            from tqdm import tqdm

            parts = tqdm(parts, total=len(jobs), desc=progress)
        return np.concatenate(list(parts)) if jobs else np.zeros((0, 3))

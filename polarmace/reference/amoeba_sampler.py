"""Geometries and sampling MD for the AMOEBA water generators: starting boxes (a given file or a
seeded built box), whole molecules, clusters cut from a box, and the Langevin MD with its
temperature schedule and checkpoints."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .amoeba_constants import ANGSTROM_PER_NM, AVOGADRO, WATER_MOLAR_MASS, PathLike
from .amoeba_system import _create_system, _openmm, _platform_context

log = logging.getLogger("polarmace.reference.amoeba_water")


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def _molecule_order(symbols: Sequence[str], positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Indices reordering atoms to O, H, H per molecule (each O takes its two nearest H)."""
    symbols = np.asarray(symbols)
    oxygens = np.flatnonzero(symbols == "O")
    hydrogens = np.flatnonzero(symbols == "H")
    if len(hydrogens) != 2 * len(oxygens) or len(symbols) != 3 * len(oxygens):
        raise ValueError("the starting structure is not pure water (O, H, H per molecule)")
    inv = np.linalg.inv(cell)
    order, used = [], set()
    for o in oxygens:
        d = positions[hydrogens] - positions[o]
        d -= np.round(d @ inv) @ cell
        near = hydrogens[np.argsort(np.linalg.norm(d, axis=1))[:2]]
        if used.intersection(near):
            raise ValueError("could not assign hydrogens to oxygens unambiguously")
        used.update(near.tolist())
        order.extend([o, *near])
    return np.array(order)


def whole_molecules(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Positions [N, 3] (Å, O H H order) with each O wrapped into the cell and its H atoms at the
    minimum image next to it."""
    cell = np.asarray(cell, dtype=np.float64)
    inv = np.linalg.inv(cell)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3, 3).copy()
    o = pos[:, 0]
    o = o - np.floor(o @ inv) @ cell
    d = pos[:, 1:] - pos[:, :1]
    d -= np.round(d @ inv) @ cell
    pos[:, 0] = o
    pos[:, 1:] = o[:, None] + d
    return pos.reshape(-1, 3)


def water_box(n_molecules: int = 64, seed: int = 0, density: float = 1.0,
              start: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Starting box: (positions [3n, 3] Å in O H H order with whole molecules, cell [3, 3] Å).

    Uses `start` (an extxyz with the cell, e.g. a liquid box of the shared datasets, which the
    caller locates: the package resolves no paths of its own) when given; it must hold
    `n_molecules` molecules. Without it: `built_water_box(n_molecules, seed, density)`.
    """
    if start is None:
        return built_water_box(n_molecules, seed, density)
    path = Path(start)
    if not path.is_file():
        raise FileNotFoundError(f"starting structure {path} not found")
    import ase.io

    atoms = ase.io.read(str(path))
    if len(atoms) != 3 * n_molecules:
        raise ValueError(f"{path} holds {len(atoms)} atoms, expected {3 * n_molecules}")
    cell = atoms.cell.array.copy()
    order = _molecule_order(atoms.get_chemical_symbols(), atoms.positions, cell)
    return whole_molecules(atoms.positions[order], cell), cell


def built_water_box(n_molecules: int = 64, seed: int = 0, density: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """A box that depends only on its arguments (no file): randomly oriented molecules (O–H
    0.9572 Å, HOH 104.52°) on a simple-cubic grid of a cube of the given density (g/cm³), to be
    minimised. Returns (positions [3n, 3] Å in O H H order, cell [3, 3] Å)."""
    rng = np.random.default_rng(seed)
    volume = n_molecules * WATER_MOLAR_MASS / AVOGADRO / density * 1e24  # Å³
    length = volume ** (1.0 / 3.0)
    m = int(math.ceil(n_molecules ** (1.0 / 3.0) - 1e-9))
    sites = np.array([(i, j, k) for i in range(m) for j in range(m) for k in range(m)], dtype=float)
    sites = sites[rng.permutation(len(sites))[:n_molecules]] * (length / m) + 0.25 * length / m
    half = math.radians(104.52) / 2.0
    local = np.array([[0.0, 0.0, 0.0], [math.sin(half), math.cos(half), 0.0], [-math.sin(half), math.cos(half), 0.0]]) * 0.9572
    pos = []
    for site in sites:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pos.append(site + local @ q.T)
    cell = np.eye(3) * length
    return whole_molecules(np.concatenate(pos), cell), cell


def cut_cluster(positions: np.ndarray, cell: np.ndarray, centre: int, n_molecules: int) -> np.ndarray:
    """Cluster of the `n_molecules` molecules whose O is nearest (minimum image) to the O of
    molecule `centre`, each molecule whole, centred on the cluster centroid. Returns [3n, 3] Å."""
    cell = np.asarray(cell, dtype=np.float64)
    whole = whole_molecules(positions, cell).reshape(-1, 3, 3)
    n_box = len(whole)
    if not 1 <= n_molecules <= n_box:
        raise ValueError(f"cluster of {n_molecules} molecules from a box of {n_box}")
    inv = np.linalg.inv(cell)
    d = whole[:, 0] - whole[centre, 0]
    shift = -np.round(d @ inv) @ cell
    dist = np.linalg.norm(d + shift, axis=1)
    chosen = np.argsort(dist, kind="stable")[:n_molecules]
    cluster = whole[chosen] + shift[chosen, None, :]
    cluster = cluster.reshape(-1, 3)
    return cluster - cluster.mean(axis=0)


# --------------------------------------------------------------------------------------------
# Sampling MD
# --------------------------------------------------------------------------------------------
@dataclass
class _MDSettings:
    """Langevin MD of the periodic box that supplies the geometries (not the labels)."""

    temperatures: Tuple[float, ...]
    sample_every: int
    dt_fs: float
    friction_per_ps: float
    equilibration_steps: int
    initial_equilibration_steps: int
    resume_equilibration_steps: int
    minimize_iterations: int
    cutoff: float
    epsilon: float = 1e-5
    ewald_tolerance: float = 1e-4
    threads: int = 1

    def validate(self) -> None:
        temps = np.asarray(self.temperatures, dtype=np.float64)
        if temps.ndim != 1 or temps.size == 0 or not np.all(np.isfinite(temps)) or np.any(temps <= 0):
            raise ValueError(f"temperatures must be a non-empty sequence of positive numbers (K), got {self.temperatures}")
        if int(self.sample_every) < 1:
            raise ValueError(f"sample_every must be >= 1, got {self.sample_every}")
        if not (math.isfinite(self.dt_fs) and self.dt_fs > 0):
            raise ValueError(f"dt_fs must be positive, got {self.dt_fs}")
        if not (math.isfinite(self.friction_per_ps) and self.friction_per_ps > 0):
            raise ValueError(f"friction_per_ps must be positive, got {self.friction_per_ps}")
        for name in ("equilibration_steps", "initial_equilibration_steps", "resume_equilibration_steps",
                     "minimize_iterations"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def schedule(self, n_configs: int) -> np.ndarray:
        """Temperature (K) of every frame: consecutive equal blocks, one per temperature."""
        temps = np.asarray(self.temperatures, dtype=np.float64)
        return np.concatenate([np.full(len(b), t) for t, b in zip(temps, np.array_split(np.arange(n_configs), len(temps)))])


def _seed(*keys: int) -> int:
    """A deterministic OpenMM random seed in [1, 2**31 − 1] from integer keys (0 means 'random'
    to OpenMM, so it is avoided)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0]
    return int(state % (2 ** 31 - 2)) + 1


class _Sampler:
    """Langevin (middle) MD of a periodic water box with OpenMM's default AMOEBA tolerances."""

    def __init__(self, positions: np.ndarray, cell: np.ndarray, settings: _MDSettings, seed: int) -> None:
        openmm, _, unit = _openmm()
        n_molecules = len(positions) // 3
        system = _create_system(n_molecules, cell, settings.cutoff, settings.epsilon, 200,
                                settings.ewald_tolerance, "mutual", remove_cm_motion=True)
        self.integrator = openmm.LangevinMiddleIntegrator(settings.temperatures[0] * unit.kelvin,
                                                          settings.friction_per_ps / unit.picosecond,
                                                          settings.dt_fs * unit.femtosecond)
        self.integrator.setRandomNumberSeed(seed)
        self.context = _platform_context(system, self.integrator, settings.threads)
        self.context.setPositions(np.asarray(positions, dtype=np.float64) / ANGSTROM_PER_NM)
        self._unit = unit

    def minimize(self, iterations: int) -> None:
        openmm, _, unit = _openmm()
        if iterations > 0:
            openmm.LocalEnergyMinimizer.minimize(self.context, 10.0 * unit.kilojoule_per_mole / unit.nanometer, int(iterations))

    def thermalize(self, temperature: float, seed: int) -> None:
        """Set the bath temperature and draw Maxwell–Boltzmann velocities."""
        self.integrator.setTemperature(temperature * self._unit.kelvin)
        self.context.setVelocitiesToTemperature(temperature * self._unit.kelvin, seed)

    def set_temperature(self, temperature: float) -> None:
        self.integrator.setTemperature(temperature * self._unit.kelvin)

    def step(self, n: int) -> None:
        if n > 0:
            self.integrator.step(int(n))

    def positions(self) -> np.ndarray:
        state = self.context.getState(getPositions=True)
        return np.asarray(state.getPositions(asNumpy=True).value_in_unit(self._unit.nanometer)) * ANGSTROM_PER_NM

    def checkpoint(self) -> bytes:
        return self.context.createCheckpoint()

    def restore(self, checkpoint: bytes) -> None:
        self.context.loadCheckpoint(checkpoint)


"""Geometries and sampling MD for the NaCl ion generator: rock-salt starting cells, the reference
box length of each condition, wrapping into the cell, and the rigid-ion Langevin MD
(`IonSampler`) that decides which geometries are labelled. Units: Å, K, fs."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence, Tuple

import numpy as np

from .amoeba_constants import ANGSTROM_PER_NM, AVOGADRO
from .ions_system import MASS, RIGID, IonModel, _context, _openmm, build_system


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def rock_salt(n: int, lattice: float) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(symbols, positions [8n³, 3] Å, cell [3, 3] Å) of an n×n×n rock-salt supercell."""
    grid = np.array([(i, j, k) for i in range(2 * n) for j in range(2 * n) for k in range(2 * n)], float)
    symbols = ["Na" if int(g.sum()) % 2 == 0 else "Cl" for g in grid]
    return symbols, grid * (0.5 * lattice), np.eye(3) * (n * lattice)


def box_length(n_ions: int, temperature: float, phase: str) -> float:
    """Reference cubic box length (Å): experimental liquid density 2.1389 − 5.43e-4·T g/cm³ for
    "melt"; rock salt a = 5.64 Å·(1 + 4e-5 (T − 300 K)) for "crystal"."""
    if phase == "crystal":
        a = 5.64 * (1.0 + 4e-5 * (temperature - 300.0))
        return a * (n_ions / 8.0) ** (1.0 / 3.0)
    if phase != "melt":
        raise ValueError(f"phase must be 'melt' or 'crystal', got {phase!r}")
    density = 2.1389 - 5.43e-4 * temperature                       # g/cm³
    mass = 0.5 * n_ions * (MASS["Na"] + MASS["Cl"]) / AVOGADRO     # g
    return (mass / density * 1e24) ** (1.0 / 3.0)


def wrap(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Positions [N, 3] (Å) mapped into the cell (fractional coordinates in [0, 1))."""
    frac = np.asarray(positions) @ np.linalg.inv(cell)
    return (frac - np.floor(frac)) @ cell


# --------------------------------------------------------------------------------------------
# Sampling MD
# --------------------------------------------------------------------------------------------
def _seed(*keys: int) -> int:
    """A deterministic OpenMM random seed in [1, 2³¹ − 2] (0 would mean 'random')."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0]
    return int(state % (2 ** 31 - 3)) + 1


class IonSampler:
    """Langevin MD of the rigid-ion model on the CPU platform (one thread). It only decides which
    geometries are visited (`ewald_tolerance` can be loose); labels are recomputed by `IonEngine`.

    Drude ions are sampled with this rigid-ion MD as well: Drude MD of the undamped model
    (extended Lagrangian with cold Drudes, α(Cl) = 3 Å³) collapses within ~0.3 ps at 1300 K, as
    the charge–induced-dipole attraction (∝ α/r⁴) pulls Na–Cl pairs below 1.9 Å until the Drude
    relaxation has no minimum. The labels are exact at any geometry, so only the sampled
    distribution differs from the Drude model's own Boltzmann distribution.

    Units: positions and cell Å, temperature K, time step `dt_fs` fs, friction 1/ps; `seed` (≥ 1)
    seeds both the thermostat and the initial velocities.
    """

    def __init__(self, symbols: Sequence[str], positions: np.ndarray, cell: np.ndarray,
                 temperature: float, seed: int, dt_fs: float = 2.0, friction_per_ps: float = 2.0,
                 model: IonModel = RIGID, ewald_tolerance: float = 1e-5, threads: int = 1) -> None:
        openmm, unit = _openmm()
        if model.polarizabilities:
            raise ValueError("IonSampler runs the rigid-ion model only (see the class docstring)")
        self.system, _ = build_system(symbols, cell, replace(model, ewald_tolerance=ewald_tolerance))
        self.system.addForce(openmm.CMMotionRemover())
        self.integrator = openmm.LangevinMiddleIntegrator(temperature, friction_per_ps, dt_fs * 1e-3)
        self.integrator.setRandomNumberSeed(seed)
        self.context = _context(self.system, self.integrator, "CPU", threads)
        self.context.setPositions(np.asarray(positions, dtype=np.float64) / ANGSTROM_PER_NM)
        self.context.setVelocitiesToTemperature(temperature, seed)
        self._unit = unit

    def set_temperature(self, temperature: float) -> None:
        """Thermostat temperature (K) from the next step on."""
        self.integrator.setTemperature(temperature)

    def step(self, n: int) -> None:
        """Advance `n` MD steps (none for n ≤ 0)."""
        if n > 0:
            self.integrator.step(int(n))

    def positions(self) -> np.ndarray:
        """Ion positions [N, 3] Å, unwrapped."""
        state = self.context.getState(getPositions=True)
        return np.asarray(state.getPositions(asNumpy=True).value_in_unit(self._unit.nanometer)) * ANGSTROM_PER_NM

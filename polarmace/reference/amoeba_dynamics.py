"""AMOEBA's own dipole trajectory of liquid water, for the reference IR spectrum.

A model trained on AMOEBA labels can at best reproduce AMOEBA's spectrum, so its IR peaks are
judged twice: against experiment and against the same MD protocol run with AMOEBA itself. This
module runs that protocol in OpenMM: Langevin NVT equilibration of a periodic box, then NVE
production (OpenMM's VerletIntegrator, a leapfrog: the stored velocities lag the positions by
half a step), storing the total cell dipole
P = Σ q_i r_i + Σ p_i + Σ u_i (charges, lab-frame permanent and converged induced dipoles; the
same definition as the stored labels) every `sample_every` steps. The positions are OpenMM's
unwrapped ones, so P is continuous in time and S_Ṗ(ω) = ω² S_P(ω) gives the IR line shape
(`polarmace.spectra.ir_spectrum_from_dipoles`).

Cost (one core, the other busy): 1 ps NVT + 5 ps NVE of the 64-molecule box with a dipole every
4 steps (2,500 samples) took 821 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polarmace.units import KB

from .amoeba_constants import ANGSTROM_PER_NM, KJ_PER_MOL_IN_EV
from .amoeba_sampler import _MDSettings, _Sampler, _seed
from .amoeba_system import AmoebaWater, _openmm


_NM_PER_PS_IN_ANGSTROM_PER_FS = 1e-2


@dataclass
class DipoleTrajectory:
    """dipoles [T, 3] e·Å every dt_fs fs; positions [T, N, 3] Å (unwrapped); velocities
    [T, N, 3] Å/fs; temperature [T] K (instantaneous, 3N − 3 degrees of freedom); total_energy
    [T] eV; volume Å³."""

    dipoles: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray
    temperature: np.ndarray
    total_energy: np.ndarray
    dt_fs: float
    volume: float


def dipole_trajectory(positions: np.ndarray, cell: np.ndarray, *, temperature: float = 300.0,
                      dt_fs: float = 0.5, equil_ps: float = 1.0, prod_ps: float = 5.0,
                      sample_every: int = 4, friction_per_ps: float = 10.0, seed: int = 0,
                      cutoff: float = 6.0, epsilon: float = 1e-5, ewald_tolerance: float = 1e-4,
                      minimize_iterations: int = 200, progress: bool = True,
                      threads: int = 1) -> DipoleTrajectory:
    """NVT equilibration then NVE production of AMOEBA water, with the cell dipole sampled.

    Args:
        positions: [N, 3] Å, molecules in O, H, H order. cell: [3, 3] Å, rows = lattice vectors.
        temperature: K, of the Langevin equilibration (`friction_per_ps`, 1/ps) and the
            initial velocities.
        dt_fs: time step (fs) of both stages. equil_ps, prod_ps: lengths (ps).
        sample_every: production steps between dipole samples.
        cutoff, epsilon, ewald_tolerance: AMOEBA settings of the MD (Å, Debye, PME tolerance);
            the defaults are those of the sampling MD of the training set.

    Returns:
        the production `DipoleTrajectory` (sample spacing dt_fs · sample_every).
    """
    from tqdm.auto import tqdm

    _, _, unit = _openmm()
    pos = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) % 3:
        raise ValueError(f"positions must be [3·n_molecules, 3], got {pos.shape}")
    if int(sample_every) < 1 or prod_ps <= 0 or equil_ps < 0 or dt_fs <= 0:
        raise ValueError("need sample_every >= 1, prod_ps > 0, equil_ps >= 0 and dt_fs > 0")
    n_mol = len(pos) // 3
    settings = _MDSettings(temperatures=(float(temperature),), sample_every=1, dt_fs=float(dt_fs),
                           friction_per_ps=float(friction_per_ps), equilibration_steps=0,
                           initial_equilibration_steps=0, resume_equilibration_steps=0,
                           minimize_iterations=int(minimize_iterations), cutoff=float(cutoff),
                           epsilon=float(epsilon), ewald_tolerance=float(ewald_tolerance),
                           threads=int(threads))
    settings.validate()
    nvt = _Sampler(pos, cell, settings, _seed(seed, 1))
    nvt.minimize(int(minimize_iterations))
    nvt.thermalize(float(temperature), _seed(seed, 2))
    n_equil = int(round(equil_ps * 1000.0 / dt_fs))
    bar = tqdm(total=n_equil, desc="AMOEBA NVT equilibration", unit="step", disable=not progress)
    for done in range(0, n_equil, 100):
        nvt.step(min(100, n_equil - done))
        bar.update(min(100, n_equil - done))
    bar.close()
    state = nvt.context.getState(getPositions=True, getVelocities=True)

    # NVE on the labelling engine's own context (velocity Verlet), which also gives the dipole
    engine = AmoebaWater(n_mol, cell, cutoff=cutoff, epsilon=epsilon,
                         ewald_tolerance=ewald_tolerance, threads=threads)
    integrator = engine.context.getIntegrator()
    integrator.setStepSize(dt_fs * unit.femtosecond)
    engine.context.setPositions(state.getPositions())
    engine.context.setVelocities(state.getVelocities())
    n_samples = int(round(prod_ps * 1000.0 / dt_fs)) // int(sample_every)
    dipoles = np.empty((n_samples, 3))
    traj_r = np.empty((n_samples, engine.n_atoms, 3))
    traj_v = np.empty((n_samples, engine.n_atoms, 3))
    temps = np.empty(n_samples)
    etot = np.empty(n_samples)
    bar = tqdm(total=n_samples, desc="AMOEBA NVE production", unit="sample", disable=not progress)
    for k in range(n_samples):
        integrator.step(int(sample_every))
        st = engine.context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        r = np.asarray(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)) * ANGSTROM_PER_NM
        v = np.asarray(st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))
        kinetic = st.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
        potential = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
        dipoles[k] = engine.dipole(r)  # unwrapped positions: continuous in time
        traj_r[k] = r
        traj_v[k] = v * _NM_PER_PS_IN_ANGSTROM_PER_FS
        temps[k] = 2.0 * kinetic / ((3 * engine.n_atoms - 3) * KB)
        etot[k] = kinetic + potential
        if not np.all(np.isfinite(dipoles[k])) or not np.isfinite(etot[k]) or np.abs(v).max() > 1e2:
            raise RuntimeError(f"AMOEBA NVE became unstable at sample {k} (T = {temps[k]:.0f} K)")
        bar.update(1)
    bar.close()
    return DipoleTrajectory(dipoles, traj_r, traj_v, temps, etot, float(dt_fs) * int(sample_every),
                            float(abs(np.linalg.det(cell))))


__all__ = ["DipoleTrajectory", "dipole_trajectory"]

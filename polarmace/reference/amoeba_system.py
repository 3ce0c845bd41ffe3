"""AMOEBA water with OpenMM: the system (AMOEBA 2018, flexible, mutual polarization) and the label
engine `AmoebaWater` (energy, forces, dipoles, field response, finite-difference Born effective
charges). Units: eV, Å, e; see `polarmace.reference.amoeba_water` for the stored labels."""

from __future__ import annotations

import functools
import logging
from typing import Dict, Optional, Tuple

import numpy as np

from polarmace.units import COULOMB, DEBYE

from .amoeba_constants import ANGSTROM_PER_NM, KJ_PER_MOL_IN_EV, LABEL_EPSILON

log = logging.getLogger("polarmace.reference.amoeba_water")


# --------------------------------------------------------------------------------------------
# OpenMM system construction
# --------------------------------------------------------------------------------------------
def _openmm():
    """Import OpenMM lazily (an optional dependency); returns (openmm, app, unit)."""
    try:
        import openmm
        from openmm import app, unit
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("polarmace.reference.amoeba_water needs OpenMM (pip install openmm)") from err
    return openmm, app, unit


@functools.lru_cache(maxsize=1)
def _forcefield():
    _, app, _ = _openmm()
    return app.ForceField("amoeba2018.xml")


def _topology(n_molecules: int, cell: Optional[np.ndarray]):
    """OpenMM topology of `n_molecules` HOH residues (atoms O, H1, H2); cell in Å or None."""
    _, app, unit = _openmm()
    top = app.Topology()
    chain = top.addChain()
    for _ in range(n_molecules):
        res = top.addResidue("HOH", chain)
        o = top.addAtom("O", app.element.oxygen, res)
        h1 = top.addAtom("H1", app.element.hydrogen, res)
        h2 = top.addAtom("H2", app.element.hydrogen, res)
        top.addBond(o, h1)
        top.addBond(o, h2)
    if cell is not None:
        top.setPeriodicBoxVectors([list(v / ANGSTROM_PER_NM) for v in np.asarray(cell, float)] * unit.nanometer)
    return top


def _multipole_force(system):
    openmm, _, _ = _openmm()
    for force in system.getForces():
        if isinstance(force, openmm.AmoebaMultipoleForce):
            return force
    raise RuntimeError("the AMOEBA system has no AmoebaMultipoleForce")


def _create_system(n_molecules: int, cell: Optional[np.ndarray], cutoff: float, epsilon: float,
                   max_iterations: int, ewald_tolerance: float, polarization: str,
                   remove_cm_motion: bool):
    """amoeba2018 system of flexible water; PME when `cell` (Å) is given, else no cutoff."""
    _, app, unit = _openmm()
    kwargs = dict(polarization=polarization, mutualInducedTargetEpsilon=epsilon,
                  mutualInducedMaxIterations=max_iterations, rigidWater=False, constraints=None,
                  removeCMMotion=remove_cm_motion)
    if cell is not None:
        widths = _cell_widths(cell)
        if cutoff > 0.5 * widths.min() + 1e-9:
            raise ValueError(f"cutoff {cutoff} Å exceeds half the smallest cell width ({0.5 * widths.min():.3f} Å)")
        kwargs.update(nonbondedMethod=app.PME, nonbondedCutoff=cutoff / ANGSTROM_PER_NM * unit.nanometer,
                      ewaldErrorTolerance=ewald_tolerance)
    else:
        kwargs.update(nonbondedMethod=app.NoCutoff)
    system = _forcefield().createSystem(_topology(n_molecules, cell), **kwargs)
    _drop_empty_forces(system)
    return system


_TERM_COUNTERS = ("getNumBonds", "getNumAngles", "getNumTorsions", "getNumTorsionTorsions",
                  "getNumParticles", "getNumMultipoles")


def _drop_empty_forces(system) -> None:
    """Remove forces without a single term (torsion, out-of-plane, in-plane ... terms that water
    does not have). They add nothing, but compiling their custom expressions costs ~10 s each
    when a Context is created."""
    for index in reversed(range(system.getNumForces())):
        force = system.getForce(index)
        counter = next((name for name in _TERM_COUNTERS if hasattr(force, name)), None)
        if counter is not None and getattr(force, counter)() == 0:
            system.removeForce(index)


def _platform_context(system, integrator, threads: int):
    openmm, _, _ = _openmm()
    platform = openmm.Platform.getPlatformByName("CPU")
    return openmm.Context(system, integrator, platform, {"Threads": str(int(threads))})


def _cell_widths(cell: np.ndarray) -> np.ndarray:
    """Perpendicular widths (Å) of a cell with lattice vectors as rows."""
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def _check_positions(positions: np.ndarray, n_atoms: int) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n_atoms, 3):
        raise ValueError(f"positions have shape {pos.shape}, expected ({n_atoms}, 3)")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions contain NaN or inf")
    return pos


# --------------------------------------------------------------------------------------------
# Label engine
# --------------------------------------------------------------------------------------------
class AmoebaWater:
    """Energies, forces, dipoles and responses of AMOEBA-2018 water (molecules ordered O, H, H).

    Args:
        n_molecules: number of water molecules (3·n_molecules atoms).
        cell: [3, 3] lattice vectors as rows (Å) for a periodic box (PME), or None for an open
            cluster (no cutoff).
        cutoff: real-space / vdW cutoff (Å), periodic only.
        epsilon: convergence of the mutual induced dipoles (OpenMM's RMS change, Debye).
        max_iterations: iteration limit of the induced-dipole solver.
        ewald_tolerance: OpenMM's PME error tolerance (periodic only).
        polarization: "mutual" (default), "direct" or "extrapolated".
        field_probe: (field strength in V/Å, distance D in Å) to add the two far point charges
            that apply a uniform external field (open clusters only; see the module docstring).
        threads: CPU threads (the AMOEBA forces run single-threaded in OpenMM's reference code).
    """

    def __init__(self, n_molecules: int, cell: Optional[np.ndarray] = None, *, cutoff: float = 6.0,
                 epsilon: float = LABEL_EPSILON, max_iterations: int = 500, ewald_tolerance: float = 1e-5,
                 polarization: str = "mutual", field_probe: Optional[Tuple[float, float]] = None,
                 threads: int = 1) -> None:
        openmm, _, unit = _openmm()
        if int(n_molecules) < 1:
            raise ValueError(f"n_molecules must be >= 1, got {n_molecules}")
        self.n_molecules = int(n_molecules)
        self.n_atoms = 3 * self.n_molecules
        self.cell = None if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
        if field_probe is not None and self.cell is not None:
            raise ValueError("the field probe is only defined for open clusters")
        self.system = _create_system(self.n_molecules, self.cell, cutoff, epsilon, max_iterations,
                                     ewald_tolerance, polarization, remove_cm_motion=False)
        self.multipoles = _multipole_force(self.system)
        self.charges = np.array([self.multipoles.getMultipoleParameters(i)[0].value_in_unit(unit.elementary_charge)
                                 for i in range(self.n_atoms)])
        self.field_probe = None
        if field_probe is not None:
            self._add_probe_charges(*field_probe)
        self.context = _platform_context(self.system, openmm.VerletIntegrator(0.5 * unit.femtosecond), threads)
        # Lab-frame permanent dipoles depend only on each molecule's own geometry; OpenMM computes
        # them with a full (PME, mutual) evaluation, so read them from a cheap open-boundary,
        # direct-polarization copy of the same molecules instead (identical values, tested).
        frames = _create_system(self.n_molecules, None, cutoff, epsilon, max_iterations, ewald_tolerance,
                                "direct", remove_cm_motion=False)
        self._frame_multipoles = _multipole_force(frames)
        self._frame_context = _platform_context(frames, openmm.VerletIntegrator(0.5 * unit.femtosecond), threads)
        self._unit = unit

    # -- external field by two distant charges ------------------------------------------------
    def _add_probe_charges(self, field: float, distance: float) -> None:
        openmm, _, unit = _openmm()
        if not (field > 0 and distance > 0):
            raise ValueError("field_probe needs a positive field (V/Å) and distance (Å)")
        q = field * distance ** 2 / (2.0 * COULOMB)
        vdw = [f for f in self.system.getForces() if isinstance(f, openmm.AmoebaVdwForce)]
        for sign in (1.0, -1.0):
            index = self.system.addParticle(1.0)
            self.multipoles.addMultipole(sign * q, [0.0] * 3, [0.0] * 9, openmm.AmoebaMultipoleForce.NoAxisType,
                                         -1, -1, -1, 0.0, 0.0, 0.0)
            for force in vdw:
                if force.getUseParticleTypes():
                    ghost_type = force.addParticleType(0.1, 0.0)
                    force.addParticle(index, ghost_type, 1.0)
                else:
                    force.addParticle(index, 0.1, 0.0, 1.0)
        self.field_probe = (float(field), float(distance))

    def _probe_positions(self, positions: np.ndarray, direction: int, sign: float) -> np.ndarray:
        """Append the probe charges so that the field at the centroid is sign·field·ê_direction."""
        _, distance = self.field_probe
        centre = positions.mean(axis=0)
        e = np.zeros(3)
        e[direction] = sign
        return np.vstack([positions, centre - distance * e, centre + distance * e])

    # -- evaluation ---------------------------------------------------------------------------
    def _set(self, positions: np.ndarray, direction: Optional[int] = None, sign: float = 1.0) -> np.ndarray:
        pos = _check_positions(positions, self.n_atoms)
        if self.field_probe is None:
            full = pos
        elif direction is None:
            raise ValueError("an AmoebaWater with field_probe only supports field_response(); "
                             "use an engine without the probe for zero-field labels")
        else:
            full = self._probe_positions(pos, direction, sign)
        self.context.setPositions(full / ANGSTROM_PER_NM)
        self._frame_context.setPositions(pos / ANGSTROM_PER_NM)
        return pos

    def energy_forces(self, positions: np.ndarray) -> Tuple[float, np.ndarray]:
        """Potential energy (eV) and forces [N, 3] (eV/Å) at `positions` [N, 3] (Å)."""
        self._set(positions)
        return self._energy_forces()

    def _energy_forces(self) -> Tuple[float, np.ndarray]:
        unit = self._unit
        state = self.context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
        forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
        return float(energy), forces[: self.n_atoms] * (KJ_PER_MOL_IN_EV / ANGSTROM_PER_NM)

    def _dipole(self, pos: np.ndarray) -> np.ndarray:
        n = self.n_atoms
        permanent = np.asarray(self._frame_multipoles.getLabFramePermanentDipoles(self._frame_context), dtype=np.float64)
        induced = np.asarray(self.multipoles.getInducedDipoles(self.context), dtype=np.float64)[:n]
        return self.charges @ pos + (permanent.sum(axis=0) + induced.sum(axis=0)) * ANGSTROM_PER_NM

    def dipole(self, positions: np.ndarray) -> np.ndarray:
        """Total dipole [3] (e·Å): Σ q r (positions as given) + permanent + induced dipoles."""
        pos = self._set(positions)
        return self._dipole(pos)

    def labels(self, positions: np.ndarray) -> Dict[str, np.ndarray]:
        """{"energy": eV, "forces": [N, 3] eV/Å, "dipole": [3] e·Å} at `positions` (Å)."""
        pos = self._set(positions)
        energy, forces = self._energy_forces()
        return {"energy": energy, "forces": forces, "dipole": self._dipole(pos)}

    def openmm_permanent_dipoles(self, positions: np.ndarray) -> np.ndarray:
        """Lab-frame permanent atomic dipoles [N, 3] (e·Å) from the labelling context itself."""
        self._set(positions)
        dipoles = self.multipoles.getLabFramePermanentDipoles(self.context)
        return np.asarray(dipoles, dtype=np.float64)[: self.n_atoms] * ANGSTROM_PER_NM

    def openmm_system_dipole(self, positions: np.ndarray) -> np.ndarray:
        """OpenMM's own `getSystemMultipoleMoments` dipole [3], converted Debye → e·Å."""
        self._set(positions)
        moments = self.multipoles.getSystemMultipoleMoments(self.context)
        return np.asarray(moments[1:4], dtype=np.float64) * DEBYE

    def field_response(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Clamped-nuclei response to a uniform field by central differences (±E along x, y, z).

        Returns:
            alpha: [3, 3] ∂μ_a/∂E_b in e·Å²/V (multiply by `COULOMB` for Å³).
            bec: [N, 3, 3] Z*_i,ab = ∂F_ib/∂E_a (e), the Maxwell-relation route to the BEC.
        """
        if self.field_probe is None:
            raise ValueError("field_response needs an engine built with field_probe=(field, distance)")
        field, _ = self.field_probe
        alpha = np.zeros((3, 3))
        bec = np.zeros((self.n_atoms, 3, 3))
        for b in range(3):
            mu, force = [], []
            for sign in (1.0, -1.0):
                pos = self._set(positions, direction=b, sign=sign)
                force.append(self._energy_forces()[1])
                mu.append(self._dipole(pos))
            alpha[:, b] = (mu[0] - mu[1]) / (2.0 * field)
            bec[:, b, :] = (force[0] - force[1]) / (2.0 * field)
        return alpha, bec


def born_effective_charges(engine: AmoebaWater, positions: np.ndarray, step: float = 1e-3) -> np.ndarray:
    """Born effective charges [N, 3, 3] (e), Z[i, a, b] = ∂μ_a/∂r_ib, by central differences.

    Args:
        engine: an `AmoebaWater` (open or periodic) without field probe.
        positions: [N, 3] Å.
        step: displacement h (Å); error O(h²) plus the induced-dipole convergence error / h.
    """
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    pos = _check_positions(positions, engine.n_atoms)
    bec = np.zeros((engine.n_atoms, 3, 3))
    for i in range(engine.n_atoms):
        for b in range(3):
            plus = pos.copy()
            plus[i, b] += step
            minus = pos.copy()
            minus[i, b] -= step
            bec[i, :, b] = (engine.dipole(plus) - engine.dipole(minus)) / (2.0 * step)
    return bec


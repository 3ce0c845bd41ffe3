"""AMOEBA (OpenMM, amoeba2018) reference data for liquid water and water clusters.

AMOEBA is a polarizable force field with permanent atomic charges, dipoles and quadrupoles and
induced atomic dipoles that are solved self-consistently ("mutual" polarization). Its total
dipole, Born effective charges and polarizability are exact functions of the geometry, so a model
trained on its energies and forces can be checked on electrical observables it never saw.

Two sets are produced, one extended-XYZ file each, written frame by frame (``append=True``):

* `generate_periodic`: cubic boxes of 64 flexible water molecules (PME, 3D periodic), sampled by
  Langevin MD at several temperatures.
* `generate_clusters`: isolated clusters of whole molecules (16–32 by default) cut from the same
  kind of periodic MD, labelled with open boundaries (no cutoff), with Born effective charges
  and (optionally) the cluster polarizability.

Stored labels (eV, Å, e):

* ``atoms.info``: ``energy`` (eV), ``dipole`` (3, e·Å), ``total_charge`` (0.0), ``temperature`` (K
  of the MD that produced the geometry), ``source`` ("amoeba2018"); clusters also ``n_molecules``,
  ``bec_asr`` (max_ab |Σ_i Z*_i,ab|, e: the acoustic-sum-rule residual of the stored BEC) and,
  when computed, ``polarizability`` (9 values, row-major α_ab = k_e ∂μ_a/∂E_b, Å³, i.e. α/(4πε0)).
* ``atoms.arrays``: ``forces`` (eV/Å); clusters also ``BEC`` (N×9, row-major [a, b]),
  BEC[i, a, b] = Z*_i,ab = ∂μ_a/∂r_ib (e).
* Periodic frames carry ``pbc=True`` and the cell; clusters ``pbc=False`` and no cell.

Conventions.

* Atom order: O, H, H per molecule. Positions are written with every molecule whole: in periodic
  frames each O lies inside the cell and its H atoms sit at the minimum image next to it.
* Dipole: μ = Σ_i q_i r_i + Σ_i p_i + Σ_i u_i with the written positions r_i, the AMOEBA atomic
  charges q_i, the lab-frame permanent atomic dipoles p_i and the converged induced dipoles u_i
  (OpenMM `getMultipoleParameters`, `getLabFramePermanentDipoles`, `getInducedDipoles`). For a
  periodic cell this is the cell dipole of the whole-molecule representation (defined modulo the
  polarization quantum, which the whole-molecule convention fixes). For clusters it equals
  OpenMM's `getSystemMultipoleMoments` (tested).
* Units: OpenMM works in nm, kJ/mol, e. 1 kJ/mol = 1000 J / (N_A·e) eV with the exact SI-2019
  values of N_A and e, i.e. 0.010364269656262175 eV (`KJ_PER_MOL_IN_EV`); 1 nm = 10 Å.
* Model details: amoeba2018 water (flexible, no constraints); periodic labels with PME, a 6 Å
  real-space and vdW cutoff (the 64-molecule box is 12.4 Å wide) and AMOEBA's vdW long-range
  dispersion correction; clusters with no cutoff. Induced dipoles are converged to
  `LABEL_EPSILON` (OpenMM's RMS induced-dipole change, Debye) for every label; the MD that
  *samples* geometries uses the looser OpenMM defaults (1e-5 and PME tolerance 1e-4), which only
  affects which geometries are visited, not the labels.

Born effective charges are central finite differences of the total dipole (6N dipole
evaluations). The polarizability needs an external field, which OpenMM's AMOEBA does not offer;
it is applied here by two distant point charges ±Q at ∓D ê from the cluster centroid (a field
E = 2 k_e Q / D² along ê, uniform over the cluster to O((R/D)²) ≈ 1e-6 for D = 1e4 Å; both
charges have no polarizability, no vdW and no damping). The same probe gives an independent BEC
route through the Maxwell relation Z*_i,ab = ∂F_ib/∂E_a, used in the tests.

Resuming. A killed run is resumed by calling the function again with the same arguments: the
complete frames already in the file are counted (a partly written last frame is cut off) and the
generation continues with the next frame. After every frame the OpenMM state of the sampling MD
(positions, velocities, thermostat random state) is saved next to the output
(``<out>.ckpt.npz``); when it matches the frame count the continuation is the same trajectory
as an uninterrupted run (on the same machine and platform). Without it the MD restarts from the
last written frame (periodic set) or from the starting box (clusters) with fresh velocities drawn
from a seed derived from (seed, frame index) and a short re-equilibration, so the continuation is
deterministic given the file but not identical to an uninterrupted run. The temperature of frame
k follows from `n_configs` (equal consecutive blocks), and the checkpoint is used only when all
arguments match, so resume with the same `n_configs`; `stop_after` writes a run in chunks.
Periodic cells must be in OpenMM's reduced form (a along x, b in the xy plane); the shipped and
built boxes are cubic.

Frames whose labels are not finite, or whose largest force exceeds `max_force`, are rejected
(not written, logged); the MD is then restarted from the last accepted state with fresh
velocities.

Cost on one core (measured on the 2-core development machine; AMOEBA runs on OpenMM's reference
code path, single-threaded, so more threads do not help): one MD step of the 192-atom box with
mutual polarization ≈ 30 ms (sampling settings), one periodic label ≈ 0.3 s (two full
evaluations, energy/forces and induced dipoles, plus a cheap one for the permanent dipoles), one cluster label
with FD-BEC ≈ 0.6 s (16 molecules), 3 s (24), 6 s (32), the polarizability ≈ 0.02–0.4 s. With the
defaults `generate_periodic` needs ≈ 1.6 s per frame on an idle core (≈ 55–60 min for 2,000
frames); on a loaded machine 2.4–5 s per frame was observed. Context creation is ≈ 1 s (empty
AMOEBA forces, whose custom expressions take ~10 s each to compile, are removed).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from polarmace.units import COULOMB, DEBYE

__all__ = ["generate_periodic", "generate_clusters", "AmoebaWater", "born_effective_charges",
           "cut_cluster", "water_box", "KJ_PER_MOL_IN_EV", "LABEL_EPSILON"]

log = logging.getLogger(__name__)

#: 1 kJ/mol in eV: 1000 J / (N_A · e), exact SI-2019 constants (= 0.010364269656262175).
KJ_PER_MOL_IN_EV = 1000.0 / (6.02214076e23 * 1.602176634e-19)
#: Å per nm.
ANGSTROM_PER_NM = 10.0
#: Avogadro constant (exact, SI 2019), used for the density of a built box.
_AVOGADRO = 6.02214076e23
#: Molar mass of water (g/mol).
_WATER_MOLAR_MASS = 18.01528
#: Convergence of the induced dipoles for every stored label (RMS change, Debye; OpenMM's unit).
LABEL_EPSILON = 1e-7
#: Default starting box: 64 molecules (192 atoms), cell in the file.
SOURCE = "amoeba2018"
DEFAULT_TEMPERATURES = (280.0, 300.0, 320.0, 340.0, 360.0)
_PathLike = Union[str, "os.PathLike[str]"]


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
              start: Optional[_PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
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
    volume = n_molecules * _WATER_MOLAR_MASS / _AVOGADRO / density * 1e24  # Å³
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


# --------------------------------------------------------------------------------------------
# Output file: count / truncate / append / checkpoint
# --------------------------------------------------------------------------------------------
def _complete_frames(path: Path, n_atoms: Optional[int] = None) -> int:
    """Number of complete extxyz frames in `path`; a partly written last frame is cut off.

    Raises ValueError when a frame has the wrong atom count or a header is not a number.
    """
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")  # lines[:-1] end with a newline; lines[-1] is an unterminated tail
    terminated = len(lines) - 1
    i, count, end = 0, 0, 0
    while i < terminated:
        header = lines[i].strip()
        try:
            n = int(header)
        except ValueError:
            raise ValueError(f"{path}: line {i + 1} should hold an atom count, got {header[:40]!r}") from None
        if n_atoms is not None and n != n_atoms:
            raise ValueError(f"{path}: frame {count} has {n} atoms, expected {n_atoms} (different settings?)")
        if n <= 0 or n % 3:
            raise ValueError(f"{path}: frame {count} has {n} atoms, not whole water molecules")
        if i + n + 2 > terminated:
            break
        end += sum(len(line) + 1 for line in lines[i:i + n + 2])
        i += n + 2
        count += 1
    if end < len(data):
        log.warning("%s: removing a partly written last frame (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return count


def _read_frame(path: Path, index: int):
    import ase.io

    atoms = ase.io.read(str(path), index=index, format="extxyz")
    source = atoms.info.get("source")
    if source != SOURCE:
        raise ValueError(f"{path}: frames were not written by this generator (source={source!r})")
    return atoms


def _write_frame(path: Path, positions: np.ndarray, cell: Optional[np.ndarray], info: Dict, arrays: Dict) -> None:
    import ase.io
    from ase import Atoms

    n_molecules = len(positions) // 3
    atoms = Atoms("OH2" * n_molecules, positions=positions, cell=cell if cell is not None else np.zeros((3, 3)),
                  pbc=cell is not None)
    atoms.info.update(info)
    for key, value in arrays.items():
        atoms.arrays[key] = np.asarray(value, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), atoms, format="extxyz", append=True)


def _checkpoint_path(path: Path) -> Path:
    return path.with_name(path.name + ".ckpt.npz")


def _save_checkpoint(path: Path, frames: int, state: bytes, signature: str) -> None:
    target = _checkpoint_path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, frames=np.int64(frames), state=np.frombuffer(state, dtype=np.uint8),
                 signature=np.array(signature))
    os.replace(tmp, target)


def _load_checkpoint(path: Path, frames: int, signature: str) -> Optional[bytes]:
    """The saved MD state when it belongs to exactly `frames` frames of a run with `signature`."""
    target = _checkpoint_path(path)
    if not target.exists():
        return None
    with np.load(target) as data:
        if int(data["frames"]) != frames or str(data["signature"]) != signature:
            log.warning("%s does not match the %d frames in the file or the arguments; "
                        "restarting the MD from the file instead", target, frames)
            return None
        return data["state"].tobytes()


def _labels_ok(labels: Dict[str, np.ndarray], max_force: float) -> bool:
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in labels.values())
    return finite and float(np.abs(labels["forces"]).max()) <= max_force


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="frame", disable=not enabled)


def _check_count(n_configs: int) -> int:
    if isinstance(n_configs, bool) or int(n_configs) != n_configs or n_configs < 1:
        raise ValueError(f"n_configs must be a positive integer, got {n_configs!r}")
    return int(n_configs)


class _Driver:
    """Shared frame loop of both generators: MD sampling, equilibration, rejection, resume."""

    def __init__(self, out_path: _PathLike, n_configs: int, settings: _MDSettings, seed: int,
                 n_molecules: int, start: Optional[_PathLike], kind: str, frame_atoms: Optional[int],
                 max_rejects: int) -> None:
        settings.validate()
        self.path = Path(out_path)
        self.n_configs = _check_count(n_configs)
        self.settings = settings
        self.seed = int(seed)
        self.kind = kind
        self.max_rejects = int(max_rejects)
        self.schedule = settings.schedule(self.n_configs)
        self.box, self.cell = water_box(n_molecules, seed=self.seed, start=start)
        self.signature = repr((kind, self.seed, n_molecules, tuple(float(t) for t in settings.temperatures),
                               int(settings.sample_every), float(settings.dt_fs), float(settings.friction_per_ps),
                               self.n_configs))
        self.done = _complete_frames(self.path, frame_atoms)
        self.sampler: Optional[_Sampler] = None
        self.first_extra_steps = 0

    def open(self, restart_positions: Optional[np.ndarray]) -> None:
        """Build the MD at frame `self.done`: checkpoint, else `restart_positions`, else the box."""
        s = self.settings
        k = self.done
        state = _load_checkpoint(self.path, k, self.signature) if k > 0 else None
        positions = self.box if (state is not None or restart_positions is None) else restart_positions
        self.sampler = _Sampler(positions, self.cell, s, _seed(self.seed, k, 1))
        if state is not None:
            self.sampler.restore(state)
            self.sampler.set_temperature(float(self.schedule[k]))
            return
        if restart_positions is None:
            self.sampler.minimize(s.minimize_iterations)
            # A restart from the starting box (no checkpoint) repeats the initial equilibration.
            self.first_extra_steps = s.initial_equilibration_steps if k > 0 else 0
        else:
            self.first_extra_steps = s.resume_equilibration_steps
        self.sampler.thermalize(float(self.schedule[k]), _seed(self.seed, k, 2))

    def steps_before(self, k: int, retry: bool) -> int:
        """MD steps to run before frame k: sampling interval plus any equilibration."""
        s = self.settings
        steps = s.sample_every
        if k == 0:
            steps += s.initial_equilibration_steps
        if k == 0 or self.schedule[k] != self.schedule[k - 1]:
            steps += s.equilibration_steps
        if retry:
            steps += max(s.resume_equilibration_steps, self.first_extra_steps if k == self.done else 0)
        elif k == self.done:
            steps += self.first_extra_steps
        return steps

    def run(self, label_frame, stop_after: Optional[int], progress: bool, desc: str) -> Path:
        """Loop over frames; `label_frame(k, md_positions) -> (positions, cell, info, arrays) or
        None` (None rejects the frame)."""
        openmm, _, _ = _openmm()
        end = self.n_configs if stop_after is None else min(self.n_configs, self.done + int(stop_after))
        if self.done >= end:
            return self.path
        last_good = self.sampler.checkpoint()
        rejects, retry = 0, False
        bar = _progress(self.n_configs, self.done, desc, progress)
        try:
            k = self.done
            while k < end:
                temperature = float(self.schedule[k])
                self.sampler.set_temperature(temperature)
                frame = None
                try:
                    self.sampler.step(self.steps_before(k, retry))
                    frame = label_frame(k, self.sampler.positions())
                except openmm.OpenMMException as err:
                    log.warning("frame %d: OpenMM failed (%s)", k, err)
                if frame is None:
                    rejects += 1
                    log.warning("frame %d rejected (%d so far); restarting the MD from the last accepted frame", k, rejects)
                    if rejects > self.max_rejects:
                        raise RuntimeError(f"{self.path}: more than {self.max_rejects} rejected frames; stopping")
                    self.sampler.restore(last_good)
                    self.sampler.thermalize(temperature, _seed(self.seed, k, 3, rejects))
                    retry = True
                    continue
                positions, cell, info, arrays = frame
                info.update(total_charge=0.0, temperature=temperature, source=SOURCE)
                _write_frame(self.path, positions, cell, info, arrays)
                last_good = self.sampler.checkpoint()
                _save_checkpoint(self.path, k + 1, last_good, self.signature)
                retry = False
                k += 1
                bar.update(1)
                bar.set_postfix(T=temperature, rejected=rejects)
        finally:
            bar.close()
        return self.path


def _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                 initial_equilibration_steps, resume_equilibration_steps, minimize_iterations, cutoff,
                 threads) -> _MDSettings:
    return _MDSettings(temperatures=tuple(float(t) for t in temperatures), sample_every=int(sample_every),
                       dt_fs=float(dt_fs), friction_per_ps=float(friction_per_ps),
                       equilibration_steps=int(equilibration_steps),
                       initial_equilibration_steps=int(initial_equilibration_steps),
                       resume_equilibration_steps=int(resume_equilibration_steps),
                       minimize_iterations=int(minimize_iterations), cutoff=float(cutoff), threads=int(threads))


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------
def generate_periodic(out_path: _PathLike, n_configs: int = 2000, n_molecules: int = 64,
                      temperatures: Sequence[float] = DEFAULT_TEMPERATURES, sample_every: int = 40,
                      dt_fs: float = 0.5, seed: int = 0, progress: bool = True, *,
                      friction_per_ps: float = 1.0, equilibration_steps: int = 1000,
                      initial_equilibration_steps: int = 2000, resume_equilibration_steps: int = 200,
                      minimize_iterations: int = 200, cutoff: float = 6.0, epsilon: float = LABEL_EPSILON,
                      ewald_tolerance: float = 1e-5, start: Optional[_PathLike] = None,
                      max_force: float = 50.0, max_rejects: int = 20, stop_after: Optional[int] = None,
                      threads: int = 1) -> Path:
    """Periodic boxes of flexible AMOEBA water, labelled with energy, forces and cell dipole.

    Langevin MD (time step `dt_fs` fs, friction `friction_per_ps` 1/ps) runs through
    `temperatures` (K) in equal consecutive blocks of frames; a frame is stored every
    `sample_every` steps. The run starts from `start` (an extxyz box of `n_molecules`
    molecules; default: a built 1 g/cm³ box), minimised for `minimize_iterations`, equilibrated
    `initial_equilibration_steps` steps, plus `equilibration_steps` at the start of every
    temperature block. Labels use PME with `cutoff` (Å) and `ewald_tolerance`, and induced dipoles
    converged to `epsilon` (Debye); see the module docstring for the stored keys and units.

    Calling again with the same arguments resumes a killed run (see the module docstring);
    `stop_after` writes at most that many new frames in this call. Frames with non-finite labels
    or a force above `max_force` (eV/Å) are rejected and the MD restarts from the last accepted
    frame (at most `max_rejects` times per call).

    Cost (one core, idle machine): ≈ 0.03 s per MD step + 0.3 s per label, i.e. ≈ 1.6 s per frame
    with the defaults, ≈ 55–60 min for 2,000 frames (longer on a loaded machine).

    Returns:
        the output path.
    """
    settings = _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                            initial_equilibration_steps, resume_equilibration_steps, minimize_iterations,
                            cutoff, threads)
    driver = _Driver(out_path, n_configs, settings, seed, int(n_molecules), start, "periodic",
                     3 * int(n_molecules), max_rejects)
    end = driver.n_configs if stop_after is None else min(driver.n_configs, driver.done + int(stop_after))
    if driver.done >= end:
        return driver.path
    restart = None
    if driver.done > 0:
        last = _read_frame(driver.path, -1)
        if not np.allclose(last.cell.array, driver.cell, atol=1e-6):
            raise ValueError(f"{driver.path}: the stored cell differs from the starting box")
        restart = last.positions
    driver.open(restart)
    engine = AmoebaWater(int(n_molecules), driver.cell, cutoff=cutoff, epsilon=epsilon,
                         ewald_tolerance=ewald_tolerance, threads=threads)

    def label_frame(k: int, md_positions: np.ndarray):
        positions = whole_molecules(md_positions, driver.cell)
        labels = engine.labels(positions)
        if not _labels_ok(labels, max_force):
            return None
        info = {"energy": labels["energy"], "dipole": labels["dipole"]}
        return positions, driver.cell, info, {"forces": labels["forces"]}

    return driver.run(label_frame, stop_after, progress, "AMOEBA water (periodic)")


def generate_clusters(out_path: _PathLike, n_configs: int = 200,
                      n_molecules: Union[int, Tuple[int, int]] = (16, 32), seed: int = 0,
                      fd_step: float = 1e-3, *, polarizability: bool = True, field: float = 0.05,
                      field_distance: float = 1.0e4, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                      sample_every: int = 100, dt_fs: float = 0.5, friction_per_ps: float = 1.0,
                      equilibration_steps: int = 1000, initial_equilibration_steps: int = 2000,
                      resume_equilibration_steps: int = 200, minimize_iterations: int = 200,
                      box_molecules: int = 64, cutoff: float = 6.0, epsilon: float = LABEL_EPSILON,
                      start: Optional[_PathLike] = None, max_force: float = 50.0, max_rejects: int = 20,
                      stop_after: Optional[int] = None, progress: bool = True, threads: int = 1) -> Path:
    """Isolated water clusters with energy, forces, dipole, BEC and polarizability.

    Geometries: Langevin MD of a periodic box of `box_molecules` molecules (same schedule and
    options as `generate_periodic`, one cluster every `sample_every` steps); each cluster takes a
    random molecule and its nearest neighbours (O–O minimum-image distance) up to a random size
    drawn uniformly from `n_molecules` = (min, max) inclusive (or a fixed int), whole molecules,
    centred on their centroid. Labels are evaluated with open boundaries (no cutoff), induced
    dipoles converged to `epsilon` (Debye):

    * BEC[i, a, b] = ∂μ_a/∂r_ib (e) by central differences of the total dipole, step `fd_step` Å
      (6N dipole evaluations); the acoustic-sum-rule residual max|Σ_i Z*_i| is stored as `bec_asr`.
    * with `polarizability`, α_ab = k_e ∂μ_a/∂E_b (Å³) at clamped nuclei by ±`field` (V/Å) applied
      through two probe charges at `field_distance` Å (6 extra evaluations).

    Cost (one core, idle machine): ≈ 0.03 s per MD step plus ≈ 1–3 s per 16–32-molecule cluster
    for the BEC, i.e. ≈ 5 s per cluster with the defaults.

    Returns:
        the output path.
    """
    lo, hi = (int(n_molecules), int(n_molecules)) if np.ndim(n_molecules) == 0 else tuple(int(v) for v in n_molecules)
    if not 1 <= lo <= hi <= box_molecules:
        raise ValueError(f"n_molecules must be 1 <= min <= max <= box_molecules={box_molecules}, got {n_molecules}")
    if not (math.isfinite(fd_step) and fd_step > 0):
        raise ValueError(f"fd_step must be positive (Å), got {fd_step}")
    settings = _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                            initial_equilibration_steps, resume_equilibration_steps, minimize_iterations,
                            cutoff, threads)
    driver = _Driver(out_path, n_configs, settings, seed, int(box_molecules), start, "clusters", None, max_rejects)
    driver.signature = repr((driver.signature, lo, hi, float(fd_step), bool(polarizability)))
    end = driver.n_configs if stop_after is None else min(driver.n_configs, driver.done + int(stop_after))
    if driver.done >= end:
        return driver.path
    driver.open(None)
    engines: Dict[int, AmoebaWater] = {}
    probes: Dict[int, AmoebaWater] = {}

    def label_frame(k: int, md_positions: np.ndarray):
        rng = np.random.default_rng([driver.seed, k, 7])
        size = int(rng.integers(lo, hi + 1))
        centre = int(rng.integers(box_molecules))
        positions = cut_cluster(md_positions, driver.cell, centre, size)
        if size not in engines:
            engines[size] = AmoebaWater(size, None, epsilon=epsilon, threads=threads)
        labels = engines[size].labels(positions)
        labels["BEC"] = born_effective_charges(engines[size], positions, fd_step)
        if polarizability:
            if size not in probes:
                probes[size] = AmoebaWater(size, None, epsilon=epsilon, threads=threads,
                                           field_probe=(field, field_distance))
            labels["polarizability"] = probes[size].field_response(positions)[0] * COULOMB
        if not _labels_ok(labels, max_force):
            return None
        asr = float(np.abs(labels["BEC"].sum(axis=0)).max())
        if asr > 1e-3:
            log.warning("frame %d: BEC acoustic-sum-rule residual %.2e e", k, asr)
        info = {"energy": labels["energy"], "dipole": labels["dipole"], "n_molecules": size, "bec_asr": asr}
        if polarizability:
            info["polarizability"] = labels["polarizability"].reshape(9)
        arrays = {"forces": labels["forces"], "BEC": labels["BEC"].reshape(-1, 9)}
        return positions, None, info, arrays

    return driver.run(label_frame, stop_after, progress, "AMOEBA water (clusters)")

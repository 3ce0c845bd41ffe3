"""Exactly known truth for the learned electrostatics: periodic NaCl rigid-ion and Drude melts.

Two classical models whose charges, Born effective charges and polarizabilities are known
exactly, evaluated with OpenMM (an independent code):

* **Rigid ions**: point charges ±1 e (`NonbondedForce`, Ewald with ewaldErrorTolerance 1e-10)
  plus the Born–Mayer–Huggins short-range potential with the Tosi–Fumi (1964) NaCl parameters
  (`CustomNonbondedForce`),
      U_ij(r) = A_ij exp(−r/ρ) − C_ij/r⁶ − D_ij/r⁸,   A_ij = c_ij b exp((σ_i + σ_j)/ρ),
  switched smoothly to zero between `IonModel.switch` (4.5 Å) and `IonModel.cutoff` (5.5 Å,
  also the real-space Coulomb cutoff; OpenMM's switch 1 − 10x³ + 15x⁴ − 6x⁵ keeps energy and
  forces consistent). No long-range dispersion correction. Truth: q = ±1 e, BEC = q·I, α = 0.
* **Drude ions**: the same plus a Drude particle of charge q_D on each polarizable ion (the core
  carries q − q_D), bound by a spring k_D (`DrudeForce`): α = k_e q_D²/k_D (Å³); `DRUDE` has
  α(Cl) = 3 Å³ and α(Na) = 0.3 Å³. Each core–Drude pair is excluded from Coulomb; BMH acts
  between cores only; no Thole or other damping. Labels are Born–Oppenheimer: the Drude
  positions are relaxed (cores fixed) until every Drude force is below 1e-9 eV/Å.

Ewald rather than PME: for 64-ion cells it is exact to the tolerance and ~10× cheaper than PME
at 1e-6 (7 ms vs 50 ms per evaluation). OpenMM's Ewald ignores off-diagonal box vectors, so the
shear components of the stress are taken from a PME copy (`IonEngine.shear_context`).

Sampling: Langevin MD of the rigid-ion model (OpenMM CPU platform, one thread; also for the
Drude set, see `IonSampler`) of cubic cells of 8·n³ ions at several temperatures and densities:
"crystal" conditions start from rock salt near its thermal lattice constant, "melt" conditions
are molten at `premelt_temperature` first and use the experimental liquid density. Labels are
computed separately on OpenMM's double-precision Reference platform at the sampled geometry
(ions wrapped into the cell, positions rounded to the 1e-6 Å written to file, so the labels
belong exactly to the written positions).

Stored labels (eV, Å, e), one extended-XYZ frame per structure (Drude particles are not atoms):
* info: ``energy``, ``stress`` (3×3, eV/Å³, ASE sign σ = (1/V) ∂E/∂ε, configurational part only,
  by central finite differences of the energy under strain), ``total_charge`` (0), ``temperature``
  (K of the sampling MD), ``phase`` ("melt" | "crystal"), ``density_scale`` (box length relative
  to the reference density), ``model`` ("rigid" | "drude"), ``chunk``, ``has_bec`` (whether BEC
  was computed, Drude), ``polarizability`` (Drude frames with BEC: 9 values, cell α_ab =
  k_e ∂μ_a/∂E_b, Å³), ``drude_residual`` (max |F| on the relaxed Drude particles, eV/Å).
* arrays: ``forces`` (eV/Å; at relaxed Drudes: core + Drude force, the total derivative),
  ``true_charges`` (core + Drude charge, e), ``true_polarizability`` (α_i, Å³), ``BEC`` (N×9,
  row-major BEC[i, a, b] = ∂μ_a/∂r_ib, e; rigid ions q_i·I exactly; Drude ions by finite field,
  Z*_i,ab = ∂F_ib/∂E_a, only on a seeded subset of frames, marked ``has_bec``),
  ``induced_dipoles`` (Drude: q_D·d_i, e·Å).

Units: OpenMM works in nm, kJ/mol, e; conversion only at the OpenMM boundary
(`KJ_PER_MOL_IN_EV`, `ANGSTROM_PER_NM`). OpenMM 8's Coulomb constant (138.93545764438198
kJ·nm/mol/e²) equals `polarmace.units.COULOMB` to 1e-16 after conversion.

Work is split into independent, seeded chunks (one trajectory at one condition each) written
atomically (`polarmace.reference.chunk_writer`), so a killed run resumes at the first missing
chunk and several worker processes give the same data as one (OpenMM's CPU platform with one
thread is deterministic).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from polarmace.reference.amoeba_constants import ANGSTROM_PER_NM, KJ_PER_MOL_IN_EV
from polarmace.reference.chunk_writer import check_plan, run_chunks, write_text
from polarmace.units import COULOMB

__all__ = ["IonModel", "RIGID", "DRUDE", "MeltPlan", "IonEngine", "IonSampler", "build_system",
           "rock_salt", "box_length", "stress_fd", "bec_field", "bec_displacement", "label_frame",
           "generate_melt", "read_frames", "write_frames", "CHARGE", "MASS"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
SPECIES = ("Na", "Cl")
CHARGE = {"Na": 1.0, "Cl": -1.0}
MASS = {"Na": 22.98977, "Cl": 35.453}    # amu
_AVOGADRO = 6.02214076e23
_EV = 1.602176634e-19

# Tosi & Fumi (1964) NaCl parameters (the values of scripts/make_quickstart_data.py), eV and Å.
TF_B = 0.338e-19 / _EV                   # eV
TF_RHO = 0.317                           # Å
TF_SIGMA = {"Na": 1.170, "Cl": 1.585}    # Å
TF_PAULING = {("Na", "Na"): 1.25, ("Na", "Cl"): 1.0, ("Cl", "Cl"): 0.75}
_J_M6 = 1e-79 / _EV * 1e60               # 1e-79 J m⁶ in eV Å⁶
_J_M8 = 1e-99 / _EV * 1e80               # 1e-99 J m⁸ in eV Å⁸
TF_C6 = {("Na", "Na"): 1.68, ("Na", "Cl"): 11.2, ("Cl", "Cl"): 116.0}   # 1e-79 J m⁶
TF_C8 = {("Na", "Na"): 0.8, ("Na", "Cl"): 13.9, ("Cl", "Cl"): 233.0}    # 1e-99 J m⁸

#: eV/Å per (kJ/mol/nm): forces; fields V/Å → kJ/mol/nm/e is the inverse.
_FORCE = KJ_PER_MOL_IN_EV / ANGSTROM_PER_NM


def _pair(a: str, b: str) -> Tuple[str, str]:
    return (a, b) if (a, b) in TF_PAULING else (b, a)


def bmh_parameters(a: str, b: str) -> Tuple[float, float, float]:
    """(A eV, C eV·Å⁶, D eV·Å⁸) of the Born–Mayer–Huggins pair a–b."""
    k = _pair(a, b)
    amp = TF_PAULING[k] * TF_B * math.exp((TF_SIGMA[a] + TF_SIGMA[b]) / TF_RHO)
    return amp, TF_C6[k] * _J_M6, TF_C8[k] * _J_M8


@dataclass(frozen=True)
class IonModel:
    """The Hamiltonian. `polarizabilities`: (symbol, α Å³, Drude charge e) per polarizable species."""

    name: str = "rigid"
    cutoff: float = 5.5            # Å, BMH and real-space Coulomb
    switch: float = 4.5            # Å, start of the BMH switching function
    coulomb: str = "ewald"         # "ewald" or "pme"
    ewald_tolerance: float = 1e-10  # OpenMM's ewaldErrorTolerance (energy jumps at the cutoff ~1e-11)
    polarizabilities: Tuple[Tuple[str, float, float], ...] = ()

    def drude(self, symbol: str) -> Optional[Tuple[float, float]]:
        """(α Å³, q_D e) of `symbol`, or None when it is not polarizable."""
        for s, alpha, q in self.polarizabilities:
            if s == symbol:
                return float(alpha), float(q)
        return None


RIGID = IonModel()
#: α(Cl⁻) = 3 Å³ with q_D = −4 e (k_D ≈ 77 eV/Å²), α(Na⁺) = 0.3 Å³ with q_D = −1.5 e (≈ 108 eV/Å²):
#: induced displacements of a few 0.01 Å. Stiff springs (large |q_D|) push the point where a Drude
#: particle falls onto a neighbouring cation (x(R − x)² = α q/|q_D|, R ≈ 1.7 Å here) far below the
#: closest Na–Cl contacts of the rigid-ion melt.
DRUDE = IonModel(name="drude", polarizabilities=(("Cl", 3.0, -4.0), ("Na", 0.3, -1.5)))


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
    mass = 0.5 * n_ions * (MASS["Na"] + MASS["Cl"]) / _AVOGADRO    # g
    return (mass / density * 1e24) ** (1.0 / 3.0)


def wrap(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    frac = np.asarray(positions) @ np.linalg.inv(cell)
    return (frac - np.floor(frac)) @ cell


# --------------------------------------------------------------------------------------------
# OpenMM system
# --------------------------------------------------------------------------------------------
def _openmm():
    try:
        import openmm
        from openmm import unit
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("polarmace.reference.openmm_ions needs OpenMM (pip install openmm)") from err
    return openmm, unit


@dataclass
class SystemInfo:
    """What build_system made: particle layout (ions first, then Drudes) and Drude constants."""

    n_ions: int
    parents: np.ndarray          # [M] ion index of each Drude particle
    drude_charges: np.ndarray    # [M] e
    drude_k: np.ndarray          # [M] eV/Å² (OpenMM's spring constant, converted)
    core_charges: np.ndarray     # [N + M] charges of all particles (e)


def _box_vectors(cell: np.ndarray):
    cell = np.asarray(cell, dtype=np.float64)
    if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 0:
        raise ValueError("OpenMM needs a reduced cell: a = (ax,0,0), b = (bx,by,0)")
    openmm, unit = _openmm()
    return [openmm.Vec3(*(v / ANGSTROM_PER_NM)) for v in cell] * unit.nanometer


def _bmh_force(symbols: Sequence[str], n_drudes: int, model: IonModel):
    """Born–Mayer–Huggins between cores. Per particle: s (0 Na, 1 Cl) and w (1 core, 0 Drude);
    a pair coefficient X is X_NaNa (1−s1)(1−s2) + X_NaCl (s1 + s2 − 2 s1 s2) + X_ClCl s1 s2
    (arithmetic instead of a Discrete2DFunction: 5× faster on the CPU platform)."""
    openmm, _ = _openmm()
    pairs = {"nn": ("Na", "Na"), "nc": ("Na", "Cl"), "cc": ("Cl", "Cl")}
    mix = "{0}nn*(1-s1)*(1-s2) + {0}nc*(s1+s2-2*s1*s2) + {0}cc*s1*s2"
    expression = ("w1*w2*(A*exp(-r/rho) - C/r^6 - D/r^8); "
                  + "; ".join(f"{x}=" + mix.format(x) for x in ("A", "C", "D")))
    force = openmm.CustomNonbondedForce(expression)
    force.addGlobalParameter("rho", TF_RHO / ANGSTROM_PER_NM)
    for key, (a, b) in pairs.items():
        amp, c6, c8 = bmh_parameters(a, b)
        force.addGlobalParameter("A" + key, amp / KJ_PER_MOL_IN_EV)
        force.addGlobalParameter("C" + key, c6 / KJ_PER_MOL_IN_EV / ANGSTROM_PER_NM ** 6)
        force.addGlobalParameter("D" + key, c8 / KJ_PER_MOL_IN_EV / ANGSTROM_PER_NM ** 8)
    force.addPerParticleParameter("s")
    force.addPerParticleParameter("w")
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(model.cutoff / ANGSTROM_PER_NM)
    force.setUseSwitchingFunction(True)
    force.setSwitchingDistance(model.switch / ANGSTROM_PER_NM)
    force.setUseLongRangeCorrection(False)
    for s in symbols:
        force.addParticle([float(SPECIES.index(s)), 1.0])
    for _ in range(n_drudes):
        force.addParticle([0.0, 0.0])
    return force


def _coulomb_force(charges: Sequence[float], model: IonModel):
    openmm, _ = _openmm()
    force = openmm.NonbondedForce()
    methods = {"ewald": openmm.NonbondedForce.Ewald, "pme": openmm.NonbondedForce.PME}
    if model.coulomb not in methods:
        raise ValueError(f"coulomb must be 'ewald' or 'pme', got {model.coulomb!r}")
    force.setNonbondedMethod(methods[model.coulomb])
    force.setCutoffDistance(model.cutoff / ANGSTROM_PER_NM)
    force.setEwaldErrorTolerance(model.ewald_tolerance)
    force.setUseDispersionCorrection(False)
    for q in charges:
        force.addParticle(float(q), 0.1, 0.0)
    return force


def _field_force(charges: Sequence[float]):
    """−Σ_i q_i E·r_i for a uniform field E = (ex, ey, ez) (kJ/mol/nm/e), force group 3. Its
    forces q_i E do not depend on how positions are wrapped."""
    openmm, _ = _openmm()
    force = openmm.CustomExternalForce("-q*(ex*x + ey*y + ez*z)")
    for name in ("ex", "ey", "ez"):
        force.addGlobalParameter(name, 0.0)
    force.addPerParticleParameter("q")
    for i, q in enumerate(charges):
        force.addParticle(i, [float(q)])
    force.setForceGroup(3)
    return force


def build_system(symbols: Sequence[str], cell: np.ndarray, model: IonModel = RIGID,
                 field: bool = False):
    """OpenMM System (ions first, then one massless Drude particle per polarizable ion) and its
    SystemInfo. Force groups: 0 Coulomb, 1 BMH, 2 Drude springs, 3 the uniform-field term
    −Σ q E·r (with `field`; global parameters ex, ey, ez in kJ/mol/nm/e).
    """
    openmm, _ = _openmm()
    symbols = list(symbols)
    n = len(symbols)
    if any(s not in SPECIES for s in symbols):
        raise ValueError(f"only {SPECIES} are parametrised")
    widths = np.diag(np.asarray(cell, dtype=np.float64))
    if model.cutoff >= 0.5 * widths.min():
        raise ValueError(f"cutoff {model.cutoff} Å must stay below half the box ({0.5 * widths.min():.3f} Å)")
    parents = np.array([i for i, s in enumerate(symbols) if model.drude(s) is not None], dtype=int)
    qd = np.array([model.drude(symbols[i])[1] for i in parents])
    alpha = np.array([model.drude(symbols[i])[0] for i in parents])
    charges = np.array([CHARGE[s] for s in symbols] + list(qd))
    charges[parents] -= qd

    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*_box_vectors(cell))
    for s in symbols:
        system.addParticle(MASS[s])
    for _ in parents:
        system.addParticle(0.0)
    coulomb = _coulomb_force(charges, model)
    bmh = _bmh_force(symbols, len(parents), model)
    springs = openmm.DrudeForce()
    for k, i in enumerate(parents):
        coulomb.addException(int(i), n + k, 0.0, 0.1, 0.0)
        bmh.addExclusion(int(i), n + k)
        springs.addParticle(n + k, int(i), -1, -1, -1, float(qd[k]), float(alpha[k]) / ANGSTROM_PER_NM ** 3, 1.0, 1.0)
    for group, force in enumerate((coulomb, bmh, springs)):
        force.setForceGroup(group)
        system.addForce(force)
    if field:
        system.addForce(_field_force(charges))
    # OpenMM's k_D = ONE_4PI_EPS0·q²/α; its ONE_4PI_EPS0 (138.93545764438198 kJ·nm/mol/e²) is
    # polarmace.units.COULOMB to 1e-16, so k_D = k_e q²/α in eV/Å²
    info = SystemInfo(n_ions=n, parents=parents, drude_charges=qd, drude_k=COULOMB * qd ** 2 / alpha,
                      core_charges=charges)
    return system, info


def _fft_size(n: float) -> int:
    """The smallest integer ≥ n whose prime factors are 2, 3 and 5."""
    m = max(int(math.ceil(n)), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _context(system, integrator, platform: str, threads: int = 1):
    openmm, _ = _openmm()
    plat = openmm.Platform.getPlatformByName(platform)
    props = {"Threads": str(int(threads))} if platform == "CPU" else {}
    return openmm.Context(system, integrator, plat, props)


# --------------------------------------------------------------------------------------------
# Label engine
# --------------------------------------------------------------------------------------------
class IonEngine:
    """Double-precision (OpenMM Reference platform) energies and forces with relaxed Drudes.

    Positions are those of the ions [N, 3] (Å); Drude displacements d [M, 3] (Å) are relaxed by
    the fixed-point iteration d ← d + F_D/k_D (F_D: total force on the Drude particle), which
    converges geometrically for these weakly coupled dipoles.
    """

    def __init__(self, symbols: Sequence[str], cell: np.ndarray, model: IonModel = RIGID,
                 field: bool = False, relax_tolerance: float = 1e-9, max_iterations: int = 500) -> None:
        openmm, unit = _openmm()
        self.symbols = list(symbols)
        self.model = model
        self.system, self.info = build_system(self.symbols, cell, model, field=field)
        self.context = _context(self.system, openmm.VerletIntegrator(1e-3), "Reference")
        self.cell = np.asarray(cell, dtype=np.float64).copy()
        self.field = np.zeros(3)
        self.has_field = field
        self.relax_tolerance = float(relax_tolerance)
        self.max_iterations = int(max_iterations)
        self._d = np.zeros((len(self.info.parents), 3))
        self._shear = None
        self.iterations = 0
        self._unit = unit

    @property
    def n_drudes(self) -> int:
        return len(self.info.parents)

    def set_cell(self, cell: np.ndarray) -> None:
        self.context.setPeriodicBoxVectors(*_box_vectors(cell))
        if self._shear is not None:
            self._shear.setPeriodicBoxVectors(*_box_vectors(cell))
        self.cell = np.asarray(cell, dtype=np.float64).copy()

    def shear_context(self):
        """A PME copy of the system for sheared cells, where OpenMM's Ewald is wrong (it ignores
        the off-diagonal box vectors: σ_xy off by ~4× against PME and an independent Ewald).
        Splitting α from `model.ewald_tolerance`, mesh spacing ≤ 0.2 Å: the sheared energy
        derivatives agree with the Ewald limit to ~1e-9 relative (tested)."""
        if self._shear is None:
            openmm, _ = _openmm()
            system = openmm.XmlSerializer.clone(self.system)
            coulomb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
            coulomb.setNonbondedMethod(openmm.NonbondedForce.PME)
            alpha = math.sqrt(-math.log(2.0 * self.model.ewald_tolerance)) / (self.model.cutoff / ANGSTROM_PER_NM)
            mesh = [_fft_size(w / 0.2) for w in np.diag(self.cell)]
            coulomb.setPMEParameters(alpha, *mesh)
            self._shear = _context(system, openmm.VerletIntegrator(1e-3), "Reference")
            self._shear.setPeriodicBoxVectors(*_box_vectors(self.cell))
        return self._shear

    def set_field(self, field: Sequence[float]) -> None:
        """Uniform external field (V/Å) acting on every charge (needs field=True)."""
        if not self.has_field:
            raise ValueError("the engine was built without the field term")
        self.field = np.asarray(field, dtype=np.float64).copy()
        for name, value in zip(("ex", "ey", "ez"), self.field / _FORCE):
            self.context.setParameter(name, float(value))

    def evaluate(self, positions: np.ndarray, d: np.ndarray, groups=-1,
                 context=None) -> Tuple[float, np.ndarray]:
        """(energy eV, forces [N + M, 3] eV/Å) with Drude i at ion parents[i] + d[i];
        `groups`: a set of force groups (default all)."""
        unit = self._unit
        context = self.context if context is None else context
        full = np.concatenate([positions, positions[self.info.parents] + d]) if self.n_drudes else positions
        context.setPositions(full / ANGSTROM_PER_NM)
        kwargs = {} if groups == -1 else {"groups": groups}
        state = context.getState(getEnergy=True, getForces=True, **kwargs)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        return float(energy), np.asarray(forces) * _FORCE

    def relax(self, positions: np.ndarray, d0: Optional[np.ndarray] = None,
              tolerance: Optional[float] = None, context=None) -> Tuple[float, np.ndarray, np.ndarray, float]:
        """Relax the Drudes at fixed ions: (energy eV, forces on ions [N, 3] eV/Å, d [M, 3] Å,
        residual max |F_D| eV/Å). Ion forces are core + Drude force (the total derivative).
        `context`: another context of the same system (e.g. `shear_context()`)."""
        positions = np.asarray(positions, dtype=np.float64)
        n = len(positions)
        tol = self.relax_tolerance if tolerance is None else float(tolerance)
        d = self._d.copy() if d0 is None else np.asarray(d0, dtype=np.float64).copy()
        if self.n_drudes and not np.any(d):
            d[:] = 1e-4  # away from the (excluded, singular-looking) core position
        k = self.info.drude_k[:, None]
        history: List[Tuple[np.ndarray, np.ndarray]] = []
        for it in range(self.max_iterations + 1):
            energy, forces = self.evaluate(positions, d, context=context)
            fd = forces[n:]
            residual = float(np.abs(fd).max()) if self.n_drudes else 0.0
            if residual <= tol:
                break
            if not np.isfinite(residual) or np.abs(d).max() > 1.0:
                break  # polarization catastrophe: a Drude particle runs away
            d = _anderson_step(history, d, fd / k)
        if residual > tol:
            raise RuntimeError(f"Drude relaxation did not converge: residual {residual:.2e} eV/Å")
        self.iterations = it
        self._d = d
        ion_forces = forces[:n].copy()
        np.add.at(ion_forces, self.info.parents, fd)
        return energy, ion_forces, d, residual

    def dipole(self, positions: np.ndarray, d: np.ndarray) -> np.ndarray:
        """μ = Σ_i q_i r_i + Σ_D q_D d (e·Å) with the ion positions as given (unwrapped)."""
        q = np.array([CHARGE[s] for s in self.symbols])
        mu = q @ positions
        return mu + self.info.drude_charges @ d if self.n_drudes else mu

    def true_charges(self) -> np.ndarray:
        return np.array([CHARGE[s] for s in self.symbols])

    def true_polarizability(self) -> np.ndarray:
        """α_i = k_e q_D²/k_D (Å³), 0 for ions without a Drude particle."""
        alpha = np.zeros(len(self.symbols))
        alpha[self.info.parents] = COULOMB * self.info.drude_charges ** 2 / self.info.drude_k
        return alpha

    def induced_dipoles(self, d: np.ndarray) -> np.ndarray:
        mu = np.zeros((len(self.symbols), 3))
        mu[self.info.parents] = self.info.drude_charges[:, None] * d
        return mu


def _anderson_step(history: List[Tuple[np.ndarray, np.ndarray]], x: np.ndarray, f: np.ndarray,
                   depth: int = 6) -> np.ndarray:
    """One Anderson-accelerated step of the fixed point x ← x + f(x) (f = F_D/k_D, Å).

    Mixes the last `depth` iterates: x' = x + f − (ΔX + ΔF) γ with γ = argmin |f − ΔF γ|. For this
    nearly linear problem it converges like GMRES (~10 force evaluations instead of ~30).
    """
    history.append((x.reshape(-1).copy(), f.reshape(-1).copy()))
    del history[:-(depth + 1)]
    if len(history) < 2:
        return x + f
    xs = np.array([h[0] for h in history])
    fs = np.array([h[1] for h in history])
    dx, df = np.diff(xs, axis=0).T, np.diff(fs, axis=0).T
    gamma = np.linalg.lstsq(df, fs[-1], rcond=None)[0]
    step = fs[-1] - (dx + df) @ gamma
    return (xs[-1] + step).reshape(x.shape)


def stress_fd(engine: IonEngine, positions: np.ndarray, step: float = 1e-4,
              relax: bool = False) -> np.ndarray:
    """Stress σ_ab = (1/V) ∂E/∂ε_ab (eV/Å³, ASE sign) by central differences of the energy.

    OpenMM keeps cells in reduced (lower-triangular) form, so the deformation is F = I + h e_a e_bᵀ
    with a ≤ b, applied as r' = r Fᵀ, cell' = cell Fᵀ; the energy is rotation invariant, so the
    derivative along this (non-symmetric) F is the symmetric component σ_ab. Shears (a < b) take
    their energies from `IonEngine.shear_context` (PME), as OpenMM's Ewald ignores the
    off-diagonal box vectors. Drude displacements are strained with the cell and, unless
    `relax`, not re-relaxed: at relaxed Drudes ∂E/∂d = 0, so the first derivative is the same
    and the central difference keeps its O(h²) error (for shears the Drudes are first relaxed in
    the PME copy, whose forces differ from Ewald's by ~1e-4 eV/Å). Call right after
    `engine.relax(positions)`.
    """
    cell0 = engine.cell.copy()
    volume = abs(np.linalg.det(cell0))
    d_ref = engine._d.copy()
    sigma = np.zeros((3, 3))
    d_shear = engine.relax(positions, d_ref, context=engine.shear_context())[2] if engine.n_drudes else d_ref
    try:
        for a in range(3):
            for b in range(a, 3):
                energies = []
                for sign in (1.0, -1.0):
                    f = np.eye(3)
                    f[a, b] += sign * step
                    engine.set_cell(cell0 @ f.T)
                    strained = positions @ f.T
                    context, d = (engine.context, d_ref) if a == b else (engine.shear_context(), d_shear)
                    energies.append(engine.relax(strained, d @ f.T, context=context)[0] if relax
                                    else engine.evaluate(strained, d @ f.T, context=context)[0])
                sigma[a, b] = sigma[b, a] = (energies[0] - energies[1]) / (2.0 * step * volume)
    finally:
        engine.set_cell(cell0)
        engine._d = d_ref
    return sigma


def bec_field(engine: IonEngine, positions: np.ndarray, step: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Finite-field route: (Z* [N, 3, 3] with Z*_i,ab = ∂F_ib/∂E_a (e), cell α [3, 3] Å³ =
    k_e ∂μ_a/∂E_b), central differences at ±step V/Å, Drudes relaxed in each field."""
    n = len(positions)
    z = np.zeros((n, 3, 3))
    dmu = np.zeros((3, 3))
    d_ref = engine._d.copy()
    try:
        for a in range(3):
            out = []
            for sign in (1.0, -1.0):
                e = np.zeros(3)
                e[a] = sign * step
                engine.set_field(e)
                _, forces, d, _ = engine.relax(positions, d0=d_ref)
                out.append((forces, engine.dipole(positions, d)))
            z[:, a, :] = (out[0][0] - out[1][0]) / (2.0 * step)
            dmu[:, a] = (out[0][1] - out[1][1]) / (2.0 * step)
    finally:
        engine.set_field(np.zeros(3))
        engine._d = d_ref
    return z, COULOMB * dmu


def bec_displacement(engine: IonEngine, positions: np.ndarray, step: float = 1e-3,
                     atoms: Optional[Sequence[int]] = None) -> np.ndarray:
    """Displacement route: Z*_i,ab = ∂μ_a/∂r_ib (e) by central differences of the cell dipole
    (ion i moved by ±step Å, Drudes relaxed, positions unwrapped). `atoms`: subset (default all);
    rows of other atoms stay zero."""
    positions = np.asarray(positions, dtype=np.float64)
    z = np.zeros((len(positions), 3, 3))
    d_ref = engine._d.copy()
    for i in (range(len(positions)) if atoms is None else atoms):
        for b in range(3):
            mu = []
            for sign in (1.0, -1.0):
                p = positions.copy()
                p[i, b] += sign * step
                _, _, d, _ = engine.relax(p, d0=d_ref)
                mu.append(engine.dipole(p, d))
            z[i, :, b] = (mu[0] - mu[1]) / (2.0 * step)
    engine._d = d_ref
    return z


def label_frame(engine: IonEngine, positions: np.ndarray, with_stress: bool = True,
                with_bec: bool = False, field_step: float = 0.01, stress_step: float = 1e-4) -> Dict:
    """Every label of one frame as {"info": {...}, "arrays": {...}} (eV, Å, e).

    Rigid ions get BEC = q·I exactly; Drude ions get the finite-field BEC only when `with_bec`
    (info has_bec; frames without carry no BEC column, so readers see "no label", not zeros).
    """
    energy, forces, d, residual = engine.relax(positions, d0=np.zeros((engine.n_drudes, 3)))
    q = engine.true_charges()
    info = {"energy": energy, "total_charge": float(q.sum())}
    arrays = {"forces": forces, "true_charges": q, "true_polarizability": engine.true_polarizability()}
    if with_stress:
        info["stress"] = stress_fd(engine, positions, stress_step)
    if engine.n_drudes == 0:
        arrays["BEC"] = (q[:, None, None] * np.eye(3)).reshape(-1, 9)
    else:
        arrays["induced_dipoles"] = engine.induced_dipoles(d)
        info["drude_residual"] = residual
        info["has_bec"] = bool(with_bec)
        if with_bec:
            z, alpha = bec_field(engine, positions, field_step)
            arrays["BEC"] = z.reshape(-1, 9)
            info["polarizability"] = alpha
    return {"info": info, "arrays": arrays}


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
        self.integrator.setTemperature(temperature)

    def step(self, n: int) -> None:
        if n > 0:
            self.integrator.step(int(n))

    def positions(self) -> np.ndarray:
        """Ion positions [N, 3] Å, unwrapped."""
        state = self.context.getState(getPositions=True)
        return np.asarray(state.getPositions(asNumpy=True).value_in_unit(self._unit.nanometer)) * ANGSTROM_PER_NM


# --------------------------------------------------------------------------------------------
# Plan, chunks, files
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    temperature: float
    phase: str
    scale: float


@dataclass(frozen=True)
class MeltPlan:
    """What to generate. Chunks (one trajectory each, `chunks_per_condition` per condition) are
    the unit of resumption; `frames` are split over them as evenly as possible."""

    model: IonModel = RIGID
    n_cells: int = 2                                    # 8·n³ ions: 2 → 64, 3 → 216
    melt_temperatures: Tuple[float, ...] = (1100.0, 1300.0, 1500.0)
    crystal_temperatures: Tuple[float, ...] = (800.0, 1000.0)
    scales: Tuple[float, ...] = (0.96, 1.0, 1.04)       # box length relative to the reference
    chunks_per_condition: int = 2
    frames: int = 1500
    sample_every: int = 250                             # MD steps between frames (0.5 ps)
    equilibration_steps: int = 2500
    premelt_steps: int = 2500
    premelt_temperature: float = 2500.0
    dt_fs: float = 2.0
    friction_per_ps: float = 2.0
    stress: bool = True
    bec_frames: int = 0                                 # Drude: seeded subset with field BEC
    field_step: float = 0.01                            # V/Å
    max_rejects: int = 20                               # per chunk (frames without a Drude minimum)
    seed: int = 0

    def conditions(self) -> List[Condition]:
        out = [Condition(t, "crystal", s) for t in self.crystal_temperatures for s in self.scales]
        return out + [Condition(t, "melt", s) for t in self.melt_temperatures for s in self.scales]

    def chunks(self) -> List[Tuple[Condition, int]]:
        """(condition, replica) of every chunk, in file order."""
        return [(c, r) for r in range(self.chunks_per_condition) for c in self.conditions()]

    def sizes(self) -> List[int]:
        return [len(a) for a in np.array_split(np.arange(self.frames), len(self.chunks()))]

    def bec_subset(self) -> np.ndarray:
        """Sorted global frame indices that carry the (finite-field) BEC."""
        rng = np.random.default_rng([self.seed, 3])
        k = min(self.bec_frames, self.frames)
        return np.sort(rng.choice(self.frames, size=k, replace=False)) if k else np.zeros(0, int)


def _start(plan: MeltPlan, cond: Condition, rng: np.random.Generator):
    n_ions = 8 * plan.n_cells ** 3
    length = box_length(n_ions, cond.temperature, cond.phase) * cond.scale
    symbols, pos, cell = rock_salt(plan.n_cells, length / plan.n_cells)
    pos = pos + rng.normal(scale=0.02, size=pos.shape)
    return symbols, pos, cell


def _chunk_frames(plan: MeltPlan, index: int, threads: int = 1) -> List[Dict]:
    """Sample and label one chunk: a seeded trajectory at one condition."""
    cond, replica = plan.chunks()[index]
    size = plan.sizes()[index]
    first = int(np.sum(plan.sizes()[:index]))
    bec = set(plan.bec_subset().tolist())
    rng = np.random.default_rng([plan.seed, 1, index])
    symbols, pos, cell = _start(plan, cond, rng)
    hot = cond.phase == "melt"
    md = IonSampler(symbols, pos, cell, plan.premelt_temperature if hot else cond.temperature,
                    _seed(plan.seed, index, 2), plan.dt_fs, plan.friction_per_ps)
    if hot:
        md.step(plan.premelt_steps)
        md.set_temperature(cond.temperature)
    md.step(plan.equilibration_steps)
    engine = IonEngine(symbols, cell, plan.model, field=plan.model.polarizabilities != ())
    frames, rejected = [], 0
    while len(frames) < size:
        md.step(plan.sample_every)
        positions = np.round(wrap(md.positions(), cell), 6)
        k = len(frames)
        try:
            labels = label_frame(engine, positions, with_stress=plan.stress, with_bec=(first + k) in bec,
                                 field_step=plan.field_step)
        except RuntimeError as err:  # no Drude minimum at this geometry: sample the next one
            rejected += 1
            log.warning("chunk %d frame %d rejected (%s)", index, k, err)
            if rejected > plan.max_rejects:
                raise
            continue
        labels["info"].update(temperature=cond.temperature, phase=cond.phase, density_scale=cond.scale,
                              model=plan.model.name, chunk=index, replica=replica)
        frames.append({"symbols": symbols, "positions": positions, "cell": cell, **labels})
    return frames


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, str):
        return value
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return f"{float(arr):.12g}"
    return '"' + " ".join(f"{v:.12g}" for v in arr.reshape(-1)) + '"'


def _frame_text(frame: Dict) -> str:
    """One extended-XYZ frame, compact: positions %.6f, other floats %.10g (exact 0/±1 stay short)."""
    arrays = frame["arrays"]
    n = len(frame["symbols"])
    # + 0.0 turns −0.0 (e.g. −1·0 in q·I) into 0.0
    cols = [(name, np.asarray(a, dtype=np.float64).reshape(n, -1) + 0.0) for name, a in arrays.items()]
    props = "species:S:1:pos:R:3" + "".join(f":{name}:R:{a.shape[1]}" for name, a in cols)
    info = {"Lattice": _fmt(np.asarray(frame["cell"]).reshape(-1)), "Properties": props}
    info.update({k: _fmt(v) for k, v in frame["info"].items()})
    info["pbc"] = '"T T T"'
    lines = [str(n), " ".join(f"{k}={v}" for k, v in info.items())]
    for i, s in enumerate(frame["symbols"]):
        words = [s] + [f"{x:.6f}" for x in frame["positions"][i]]
        for _, a in cols:
            words += [f"{x:.10g}" for x in a[i]]
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def write_frames(path: Path, frames: Sequence[Dict]) -> None:
    """Write frames atomically (`chunk_writer.write_text`): the file exists only once it is complete."""
    write_text(Path(path), (_frame_text(frame) for frame in frames))


def read_frames(path: Path):
    """The frames of a file as ASE Atoms, labels back in info/arrays (not in a calculator)."""
    from ase.io import read

    out = []
    for atoms in read(str(path), index=":", format="extxyz"):
        if atoms.calc is not None:
            for key, value in atoms.calc.results.items():
                if key == "forces":
                    atoms.arrays[key] = np.asarray(value)
                elif key == "stress":
                    atoms.info[key] = _voigt_to_3x3(np.asarray(value))
                elif key != "free_energy":
                    atoms.info[key] = value
            atoms.calc = None
        out.append(atoms)
    return out


def _voigt_to_3x3(s: np.ndarray) -> np.ndarray:
    if s.size == 9:
        return s.reshape(3, 3)
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _run_chunk(job: Tuple[MeltPlan, int, Path]) -> int:
    plan, index, path = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    frames = _chunk_frames(plan, index)
    write_frames(path, frames)
    return len(frames)


def generate_melt(out_path: Path, plan: Optional[MeltPlan] = None, progress: bool = True,
                  workers: int = 1, stop_after: Optional[int] = None,
                  chunk_dir: Optional[Path] = None) -> Path:
    """Generate (or resume) one set: chunks in `chunk_dir` (default `<out>.chunks/`), then the
    concatenated `out_path`.

    `stop_after` computes at most that many missing chunks in this call (then returns without
    writing `out_path`): an interrupted run, for tests. Returns `out_path`.
    """
    plan = plan or MeltPlan()
    out_path = Path(out_path)
    chunk_dir = Path(chunk_dir) if chunk_dir is not None else out_path.with_name(out_path.name + ".chunks")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    sizes = plan.sizes()
    paths = [chunk_dir / f"chunk_{c:03d}.extxyz" for c in range(len(sizes))]
    check_plan(chunk_dir, repr(plan))
    jobs = [(plan, c, paths[c]) for c in range(len(sizes))]
    if not run_chunks(paths, sizes, jobs, _run_chunk, f"NaCl {plan.model.name} melt", progress=progress,
                      workers=workers, stop_after=stop_after):
        return out_path
    frames = [f for s, p in zip(sizes, paths) if s > 0 for f in _split_frames(p.read_text())]
    write_text(out_path, frames)
    if plan.bec_frames:
        # the BEC subset as a test set, the rest as a training set
        stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
        test = [" has_bec=T " in f.split("\n", 2)[1] for f in frames]
        write_text(out_path.with_name(f"{stem}_test{out_path.suffix}"), [f for f, t in zip(frames, test) if t])
        write_text(out_path.with_name(f"{stem}_train{out_path.suffix}"), [f for f, t in zip(frames, test) if not t])
    log.info("%s: %d frames", out_path, plan.frames)
    return out_path


def _split_frames(text: str) -> List[str]:
    """The frames of an extended-XYZ text (each n + 2 lines)."""
    lines = text.splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        out.append("".join(lines[i:i + n + 2]))
        i += n + 2
    return out

"""Labels of the NaCl ion models: `IonEngine` (double-precision OpenMM energies and forces with
the Drude particles relaxed, dipoles, true charges and polarizabilities), the finite-difference
stress, the two Born-effective-charge routes (finite field, displacement) and `label_frame`, all
labels of one frame. Units: eV, Å, e; see `polarmace.reference.openmm_ions` for the stored
labels."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from polarmace.units import COULOMB

from .amoeba_constants import ANGSTROM_PER_NM, KJ_PER_MOL_IN_EV
from .ions_system import CHARGE, RIGID, IonModel, _box_vectors, _context, _openmm, build_system

if TYPE_CHECKING:  # pragma: no cover
    import openmm

#: eV/Å per (kJ/mol/nm): forces; fields V/Å → kJ/mol/nm/e is the inverse.
_FORCE = KJ_PER_MOL_IN_EV / ANGSTROM_PER_NM


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
        """Number M of Drude particles (0 for rigid ions)."""
        return len(self.info.parents)

    def set_cell(self, cell: np.ndarray) -> None:
        """New (reduced) cell [3, 3] in Å, for this context and the PME copy."""
        self.context.setPeriodicBoxVectors(*_box_vectors(cell))
        if self._shear is not None:
            self._shear.setPeriodicBoxVectors(*_box_vectors(cell))
        self.cell = np.asarray(cell, dtype=np.float64).copy()

    def shear_context(self) -> openmm.Context:
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
        """Charge of each ion [N] (e): core + Drude charge, ±1."""
        return np.array([CHARGE[s] for s in self.symbols])

    def true_polarizability(self) -> np.ndarray:
        """α_i = k_e q_D²/k_D (Å³), 0 for ions without a Drude particle."""
        alpha = np.zeros(len(self.symbols))
        alpha[self.info.parents] = COULOMB * self.info.drude_charges ** 2 / self.info.drude_k
        return alpha

    def induced_dipoles(self, d: np.ndarray) -> np.ndarray:
        """Induced dipole q_D·d of each ion [N, 3] (e·Å) from Drude displacements d [M, 3] (Å);
        0 for ions without a Drude particle."""
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

"""The NaCl ion models and their OpenMM systems: species constants (charges, masses), the
Tosi–Fumi Born–Mayer–Huggins parameters, `IonModel` (`RIGID`, `DRUDE`) and `build_system`
(Ewald/PME Coulomb, switched BMH between cores, Drude springs, optional uniform field).
Parameters are in eV, Å, e; OpenMM's nm and kJ/mol appear only inside the system. See
`polarmace.reference.openmm_ions` for the models and the stored labels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from polarmace.units import COULOMB

from .amoeba_constants import ANGSTROM_PER_NM, KJ_PER_MOL_IN_EV

if TYPE_CHECKING:  # pragma: no cover
    import openmm

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
SPECIES = ("Na", "Cl")
CHARGE = {"Na": 1.0, "Cl": -1.0}        # e
MASS = {"Na": 22.98977, "Cl": 35.453}    # amu
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
# OpenMM system
# --------------------------------------------------------------------------------------------
def _openmm():
    """Import OpenMM lazily (an optional dependency); returns (openmm, unit)."""
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
                 field: bool = False) -> Tuple[openmm.System, SystemInfo]:
    """OpenMM System (ions first, then one massless Drude particle per polarizable ion) and its
    SystemInfo, for a reduced cell [3, 3] (Å) wider than twice the cutoff. Force groups:
    0 Coulomb, 1 BMH, 2 Drude springs, 3 the uniform-field term −Σ q E·r (with `field`; global
    parameters ex, ey, ez in kJ/mol/nm/e).
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


def _context(system: openmm.System, integrator: openmm.Integrator, platform: str,
             threads: int = 1) -> openmm.Context:
    """A Context on the named OpenMM platform ("CPU" with `threads` threads, or "Reference")."""
    openmm, _ = _openmm()
    plat = openmm.Platform.getPlatformByName(platform)
    props = {"Threads": str(int(threads))} if platform == "CPU" else {}
    return openmm.Context(system, integrator, plat, props)

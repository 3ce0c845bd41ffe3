"""Independent reference: polarmace point multipoles (σ = 0) against OpenMM's AMOEBA multipoles.

OpenMM's `AmoebaMultipoleForce` is an independent implementation of Ewald/PME electrostatics of
point charges, dipoles and quadrupoles with (optional) direct polarization. We use it with
`NoAxisType` frames (the moments given are lab-frame moments), no covalent maps (every pair
interacts fully, in both AMOEBA's "direct" and "polarization" groups), Thole damping off, on the
Reference platform.

Conventions, each checked below by a small case solved by hand (open boundaries):

* Units. OpenMM: nm, kJ/mol, e, dipoles e·nm, quadrupoles e·nm², polarizabilities nm³.
  1 kJ/mol = 1000 / (N_A · e[C]) eV = 0.010364269656… eV (exact SI-2019 constants).
  OpenMM 8.6's Coulomb constant, measured from a two-charge energy, equals polarmace's
  COULOMB = 14.399645478 eV·Å/e² to ~1e-16 (both CODATA 2018); the older literal
  138.935456 kJ·nm/mol/e² would differ by 1.2e-8 relative, far below the 1e-5 tolerances.
* Dipoles: same sign and meaning (μ = Σ q r); OpenMM input = μ[e·Å] / 10.
* Quadrupoles: polarmace's Θ is the traceless second moment Θ_ab = Σ q (r_a r_b − δ_ab r²/3).
  OpenMM's input is Buckingham's Θ^B/3 = (3/2)Θ/3 = Θ/2, so the OpenMM input is Θ/2 [e·Å²] / 100.
  Verified (test_openmm_quadrupole_convention): a probe charge's hand Coulomb sum with six
  explicit point charges whose traceless second moment is Θ equals the hand point-quadrupole
  formula k q (3/2) R̂ᵀΘR̂/R³, OpenMM's energy with Θ/2 entered, and polarmace's; entering Θ
  itself doubles every quadrupole interaction. Dipoles are checked the same way (±q at ±d/2).
* Polarizability: OpenMM α in nm³; polarmace α in e·Å²/V = α[Å³] / k_e.  With
  PolarizationType Direct, μ_ind = α E_perm and E_pol = −½ Σ μ_ind·E_perm, i.e. polarmace's
  one-step response (docs/method.md §3).
* Damping: AMOEBA's Thole damping applies only when dampingFactor_i·dampingFactor_j ≠ 0; with
  dampingFactor = 0 the Thole parameter has no effect (checked). Note that thole = 0 with a
  nonzero dampingFactor does NOT disable damping: it zeroes the damped field entirely.

Accuracy of the periodic references. polarmace's Ewald sum at accuracy 1e-12 is converged to
~1e-9 relative (energies and fields independent of the splitting β to that level; checked when
writing this file). Note that `accuracy` is not a relative error bound for quadrupoles: the
quadrupole–quadrupole energy is off by ~3e-5 relative at accuracy 1e-8 and ~5e-7 at 1e-10, hence
1e-12 here. OpenMM's PME (B-spline order 5) is the less accurate side: its error depends on the
real-space cutoff r_c (≤ half the smallest box width), the splitting α and the grid, and shrinks
towards polarmace's value as the grid is refined. With r_c = 0.95 nm and α = 4.0 nm⁻¹, a 128³ grid
gives energies to ~1e-6 but fields (induced dipoles) only to ~2e-5; a 192³ grid gives fields to
≤ 4e-6 (max-norm relative). OpenMM's own `setEwaldErrorTolerance(1e-7)` picks a ~140³ grid and
α ≈ 4.13 nm⁻¹ and leaves field errors up to ~1.3e-5, hence the explicit PME parameters.
Measured here: permanent energy 1.4e-6 (cubic) / 1.4e-7 (triclinic), total energy 3e-9 / 1.3e-6,
induced dipoles 8.6e-7 / 3.2e-6, polarization energy 3e-7 / 4.5e-7, against tolerances 1e-5.
polarmace's PME route (order 10, accuracy 1e-10) equals its Ewald route to ~1e-11 here.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")

from polarmace.electrostatics import Electrostatics  # noqa: E402
from polarmace.units import COULOMB  # noqa: E402

#: 1 kJ/mol in eV: 1000 J / (N_A · e) with the exact SI-2019 N_A and e.
KJ_PER_MOL_IN_EV = 1000.0 / (6.02214076e23 * 1.602176634e-19)
DTYPE = torch.float64

#: OpenMM PME settings for the periodic references (see the module docstring).
PME_CUTOFF_NM = 0.95
PME_ALPHA_PER_NM = 4.0
#: grid for the polarization-off energy (energies converge faster than fields) and for the
#: direct-polarization run (induced dipoles = α × field need the finer grid)
PME_GRID_ENERGY = 128
PME_GRID_FIELD = 192

CELLS = {
    "cubic": np.eye(3) * 20.0,
    # reduced triclinic form required by OpenMM: a ∥ x, b in the xy plane,
    # |b_x| ≤ a_x/2, |c_x| ≤ a_x/2, |c_y| ≤ b_y/2
    "triclinic": np.array([[21.0, 0.0, 0.0], [-6.0, 20.5, 0.0], [5.0, -7.0, 20.5]]),
}


# --------------------------------------------------------------------------- helpers
def traceless(m: np.ndarray) -> np.ndarray:
    """Symmetric traceless part of a 3×3 matrix."""
    m = 0.5 * (m + m.T)
    return m - np.trace(m) / 3.0 * np.eye(3)


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances [3] between opposite faces of the cell (Å)."""
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3]))
                     for i in range(3)])


def separated_sites(rng: np.random.Generator, n: int, cell: np.ndarray,
                    min_distance: float = 1.5) -> np.ndarray:
    """n random positions [n,3] (Å) in the cell, every periodic image pair > min_distance apart."""
    images = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    points: list = []
    while len(points) < n:
        trial = rng.random(3) @ cell
        ok = True
        for p in points:
            frac = np.linalg.solve(cell.T, trial - p)
            frac -= np.round(frac)
            if np.linalg.norm((frac + images) @ cell, axis=1).min() < min_distance:
                ok = False
                break
        if ok:
            points.append(trial)
    return np.array(points)


def random_multipoles(rng: np.random.Generator, n: int
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neutral charges [n] e, dipoles [n,3] e·Å, traceless quadrupoles [n,3,3] e·Å² and
    isotropic polarizabilities [n] Å³."""
    q = rng.normal(size=n) * 0.5
    q -= q.mean()
    mu = rng.normal(size=(n, 3)) * 0.3
    theta = np.array([traceless(rng.normal(size=(3, 3))) * 0.5 for _ in range(n)])
    alpha = rng.uniform(0.5, 2.0, size=n)
    return q, mu, theta, alpha


def openmm_multipoles(positions: np.ndarray, q: np.ndarray, mu: np.ndarray, theta: np.ndarray,
                      alpha_a3: Optional[np.ndarray] = None, cell: Optional[np.ndarray] = None,
                      thole: float = 0.0, damping: float = 0.0,
                      quadrupole_factor: float = 0.5,
                      grid: int = PME_GRID_FIELD) -> Tuple[float, np.ndarray]:
    """OpenMM AMOEBA energy (eV) and induced dipoles [n,3] (e·Å).

    positions Å, q e, mu e·Å, theta e·Å² (polarmace's traceless second moment; OpenMM gets
    quadrupole_factor·Θ, 0.5 being the right convention), alpha_a3 Å³ (None: 0), cell Å (None:
    open boundaries, NoCutoff; else PME with the module's cutoff and α, grid³ points).
    Direct polarization, NoAxisType frames, no covalent maps.
    """
    mm = openmm
    n = len(q)
    system = mm.System()
    for _ in range(n):
        system.addParticle(1.0)
    force = mm.AmoebaMultipoleForce()
    if cell is None:
        force.setNonbondedMethod(mm.AmoebaMultipoleForce.NoCutoff)
    else:
        force.setNonbondedMethod(mm.AmoebaMultipoleForce.PME)
        force.setCutoffDistance(PME_CUTOFF_NM)
        force.setPMEParameters(PME_ALPHA_PER_NM, grid, grid, grid)
        system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*(cell[i] / 10.0)) for i in range(3)])
    force.setPolarizationType(mm.AmoebaMultipoleForce.Direct)
    for i in range(n):
        polarity = 0.0 if alpha_a3 is None else float(alpha_a3[i]) * 1e-3   # Å³ -> nm³
        force.addMultipole(float(q[i]), [float(x) for x in mu[i] / 10.0],
                           [float(x) for x in (quadrupole_factor * theta[i] / 100.0).ravel()],
                           mm.AmoebaMultipoleForce.NoAxisType, -1, -1, -1,
                           thole, damping, polarity)
    system.addForce(force)
    context = mm.Context(system, mm.VerletIntegrator(1e-3), mm.Platform.getPlatformByName("Reference"))
    context.setPositions([mm.Vec3(*(p / 10.0)) for p in positions])
    state = context.getState(getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(mm.unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
    induced = np.array(force.getInducedDipoles(context)) * 10.0                # e·nm -> e·Å
    lab_dipoles = np.array(force.getLabFramePermanentDipoles(context)) * 10.0
    # NoAxisType: the lab-frame moments are the input moments
    np.testing.assert_allclose(lab_dipoles, mu, rtol=0, atol=1e-12)
    del context
    return energy, induced


def polarmace_multipoles(positions: np.ndarray, q: np.ndarray, mu: Optional[np.ndarray],
                         theta: Optional[np.ndarray], alpha_a3: Optional[np.ndarray] = None,
                         cell: Optional[np.ndarray] = None, method: str = "ewald"):
    """polarmace point-multipole result (open direct sum if cell is None, else Ewald, or smooth
    PME with method="pme": order 10, where the mesh for accuracy 1e-10 is small; at the default
    order 6 the calibrated quadrupole rule asks for a ~1000³ mesh in these 20 Å cells)."""
    t = lambda x: None if x is None else torch.as_tensor(x, dtype=DTYPE)  # noqa: E731
    if cell is None:
        engine = Electrostatics(sigma=0.0)
        cell_t = torch.zeros(1, 3, 3, dtype=DTYPE)
        pbc = torch.zeros(1, 3, dtype=torch.bool)
    else:
        if method == "pme":
            engine = Electrostatics(sigma=0.0, method="pme", accuracy=1e-10,
                                    real_space_cutoff=10.0, pme_order=10)
        else:
            engine = Electrostatics(sigma=0.0, method="ewald", accuracy=1e-12,
                                    real_space_cutoff=10.0)
        cell_t = t(cell)[None]
        pbc = torch.ones(1, 3, dtype=torch.bool)
    alpha = None if alpha_a3 is None else t(alpha_a3 / COULOMB)             # Å³ -> e·Å²/V
    return engine(t(positions), cell_t, pbc, t(q), t(mu), t(theta), alpha=alpha)


def coulomb_with_probe(probe_position: np.ndarray, probe_charge: float, positions: np.ndarray,
                       charges: np.ndarray) -> float:
    """Hand Coulomb sum (eV) of one probe charge with point charges: Σ k q_p q_j / |r_p − r_j|."""
    distances = np.linalg.norm(positions - probe_position, axis=1)
    return float(COULOMB * probe_charge * np.sum(charges / distances))


# --------------------------------------------------------------------------- open two-site checks
PAIR = np.array([[0.0, 0.0, 0.0], [1.3, 2.1, -0.7]])


def test_openmm_units_and_coulomb_constant():
    """Two charges: OpenMM's energy gives its Coulomb constant; compare with polarmace's."""
    q = np.array([0.7, -0.4])
    zeros3, zeros33 = np.zeros((2, 3)), np.zeros((2, 3, 3))
    e_omm, _ = openmm_multipoles(PAIR, q, zeros3, zeros33)
    r = np.linalg.norm(PAIR[1] - PAIR[0])
    k_openmm = e_omm * r / (q[0] * q[1])                    # eV·Å/e²
    assert abs(k_openmm / COULOMB - 1.0) < 1e-9
    e_pm = polarmace_multipoles(PAIR, q, None, None).energy.item()
    assert e_pm == pytest.approx(COULOMB * q[0] * q[1] / r, rel=1e-13)


def test_openmm_dipole_convention():
    """A probe charge next to a dipole: the Coulomb sum over ±q at ±d/2 (μ = q d), the hand
    point-dipole formula, OpenMM's point dipole entered as μ/10 e·nm and polarmace all agree."""
    rng = np.random.default_rng(11)
    probe = 0.8
    mu = rng.normal(size=3) * 0.4
    d = 1e-3 * mu / np.linalg.norm(mu)                      # Å, small separation
    qd = np.linalg.norm(mu) / np.linalg.norm(d)
    e_cloud = coulomb_with_probe(PAIR[0], probe, np.array([PAIR[1] + d / 2, PAIR[1] - d / 2]),
                                 np.array([qd, -qd]))
    q = np.array([probe, 0.0])
    mus = np.array([np.zeros(3), mu])
    e_omm, _ = openmm_multipoles(PAIR, q, mus, np.zeros((2, 3, 3)))
    # hand: potential of μ at R = r_probe − r_μ is k μ·R/R³
    big_r = PAIR[0] - PAIR[1]
    e_hand = probe * COULOMB * mu @ big_r / np.linalg.norm(big_r) ** 3
    e_pm = polarmace_multipoles(PAIR, q, mus, None).energy.item()
    assert e_cloud == pytest.approx(e_hand, rel=1e-5)      # finite-d error ~ (d/R)² ~ 1e-7
    assert e_omm == pytest.approx(e_hand, rel=1e-12)
    assert e_pm == pytest.approx(e_hand, rel=1e-12)
    # dipole–dipole against the hand formula k [μ1·μ2 − 3 (μ1·R̂)(μ2·R̂)] / R³
    mus = rng.normal(size=(2, 3)) * 0.3
    rhat = big_r / np.linalg.norm(big_r)
    e_hand = (COULOMB * (mus[0] @ mus[1] - 3 * (mus[0] @ rhat) * (mus[1] @ rhat))
              / np.linalg.norm(big_r) ** 3)
    e_omm, _ = openmm_multipoles(PAIR, np.zeros(2), mus, np.zeros((2, 3, 3)))
    e_pm = polarmace_multipoles(PAIR, np.zeros(2), mus, None).energy.item()
    assert e_omm == pytest.approx(e_hand, rel=1e-12)
    assert e_pm == pytest.approx(e_hand, rel=1e-12)


def test_openmm_quadrupole_convention():
    """OpenMM's quadrupole input is Θ/2 (Θ = traceless second moment, polarmace's convention).

    Θ = Σ_k λ_k e_k e_kᵀ (eigen-decomposition, Σλ = 0) is exactly the traceless second moment of
    six charges λ_k/(2d²) at ±d e_k (net charge, dipole and octupole zero; the trace term
    vanishes because Σλ = 0). A probe charge's Coulomb energy with these charges must equal the
    hand formula k q (3/2) R̂ᵀΘR̂/R³, OpenMM's energy with the point quadrupole entered as Θ/2
    (and twice it if entered as Θ) and polarmace's.
    """
    rng = np.random.default_rng(12)
    theta = traceless(rng.normal(size=(3, 3))) * 0.6
    lam, vecs = np.linalg.eigh(theta)
    d = 1e-3
    cloud_pos = []
    cloud_q = []
    for k in range(3):
        for sign in (1.0, -1.0):
            cloud_pos.append(PAIR[1] + sign * d * vecs[:, k])
            cloud_q.append(lam[k] / (2 * d * d))
    cloud_pos = np.array(cloud_pos)
    cloud_q = np.array(cloud_q)
    assert abs(cloud_q.sum()) < 1e-6 * np.abs(cloud_q).max()
    second_moment = np.einsum("k,ka,kb->ab", cloud_q, cloud_pos - PAIR[1], cloud_pos - PAIR[1])
    np.testing.assert_allclose(traceless(second_moment), theta, atol=1e-9)
    e_cloud = coulomb_with_probe(PAIR[0], 0.8, cloud_pos, cloud_q)
    q = np.array([0.8, 0.0])
    thetas = np.array([np.zeros((3, 3)), theta])
    big_r = PAIR[0] - PAIR[1]
    rr = np.linalg.norm(big_r)
    e_hand = 0.8 * COULOMB * 1.5 * big_r @ theta @ big_r / rr ** 5
    e_omm, _ = openmm_multipoles(PAIR, q, np.zeros((2, 3)), thetas)
    e_omm_full, _ = openmm_multipoles(PAIR, q, np.zeros((2, 3)), thetas, quadrupole_factor=1.0)
    e_pm = polarmace_multipoles(PAIR, q, None, thetas).energy.item()
    assert e_cloud == pytest.approx(e_hand, rel=1e-5)      # finite-d error ~ (d/R)² ~ 1e-7
    assert e_omm == pytest.approx(e_hand, rel=1e-12)
    assert e_omm_full == pytest.approx(2.0 * e_hand, rel=1e-12)   # Θ entered unhalved: 2× wrong
    assert e_pm == pytest.approx(e_hand, rel=1e-12)


def test_open_cluster_all_multipoles():
    """Random open cluster with q, μ, Θ: OpenMM NoCutoff vs polarmace's direct sum."""
    rng = np.random.default_rng(13)
    pos = separated_sites(rng, 12, np.eye(3) * 8.0)
    q, mu, theta, _ = random_multipoles(rng, 12)
    e_omm, _ = openmm_multipoles(pos, q, mu, theta)
    e_pm = polarmace_multipoles(pos, q, mu, theta).energy.item()
    assert e_pm == pytest.approx(e_omm, rel=1e-11)


def test_openmm_direct_polarization_undamped():
    """Two sites, direct polarization: OpenMM's induced dipoles and energy equal the hand result
    μ_i = α_i E_i, E = E_perm − ½ Σ α_i |E_i|², and polarmace's, when dampingFactor = 0
    (whatever the Thole parameter); a nonzero damping would change them."""
    q = np.array([0.7, -0.4])
    zeros3, zeros33 = np.zeros((2, 3)), np.zeros((2, 3, 3))
    alpha_a3 = np.array([1.2, 0.8])
    big_r = PAIR[0] - PAIR[1]
    rr = np.linalg.norm(big_r)
    field = np.array([COULOMB * q[1] * big_r / rr ** 3, -COULOMB * q[0] * big_r / rr ** 3])
    alpha = alpha_a3 / COULOMB                               # e·Å²/V
    mu_hand = alpha[:, None] * field
    e_hand = COULOMB * q[0] * q[1] / rr - 0.5 * np.sum(alpha * (field * field).sum(-1))
    for thole in (0.0, 0.39):
        e_omm, mu_omm = openmm_multipoles(PAIR, q, zeros3, zeros33, alpha_a3, thole=thole)
        assert e_omm == pytest.approx(e_hand, rel=1e-12)
        np.testing.assert_allclose(mu_omm, mu_hand, rtol=1e-12, atol=1e-15)
    e_damped, _ = openmm_multipoles(PAIR, q, zeros3, zeros33, alpha_a3, thole=0.39, damping=0.3)
    assert abs(e_damped - e_hand) > 1e-6 * abs(e_hand)
    res = polarmace_multipoles(PAIR, q, None, None, alpha_a3)
    assert res.energy.item() == pytest.approx(e_hand, rel=1e-12)
    np.testing.assert_allclose(res.induced_dipoles.numpy(), mu_hand, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- periodic references
@pytest.fixture(scope="module", params=sorted(CELLS))
def periodic_case(request) -> Dict[str, object]:
    """One random neutral multipole system per cell, evaluated once by both codes."""
    cell = CELLS[request.param]
    assert PME_CUTOFF_NM * 10.0 <= perpendicular_widths(cell).min() / 2.0
    assert cell[0, 1] == cell[0, 2] == cell[1, 2] == 0.0
    assert abs(cell[1, 0]) <= cell[0, 0] / 2 and abs(cell[2, 0]) <= cell[0, 0] / 2
    assert abs(cell[2, 1]) <= cell[1, 1] / 2
    rng = np.random.default_rng(2024 if request.param == "cubic" else 7)
    n = 16
    pos = separated_sites(rng, n, cell)
    q, mu, theta, alpha_a3 = random_multipoles(rng, n)
    e_perm_omm, mu_off = openmm_multipoles(pos, q, mu, theta, None, cell, grid=PME_GRID_ENERGY)
    e_total_omm, mu_ind_omm = openmm_multipoles(pos, q, mu, theta, alpha_a3, cell)
    res = polarmace_multipoles(pos, q, mu, theta, alpha_a3, cell)
    return dict(name=request.param, pos=pos, q=q, mu=mu, theta=theta, cell=cell,
                e_perm_omm=e_perm_omm, mu_off=mu_off,
                e_total_omm=e_total_omm, mu_ind_omm=mu_ind_omm, alpha_a3=alpha_a3,
                e_perm_pm=res.permanent_energy.item(), e_total_pm=res.energy.item(),
                e_resp_pm=res.response_energy.item(),
                mu_ind_pm=res.induced_dipoles.numpy())


def test_periodic_permanent_energy_matches_openmm(periodic_case):
    """Polarization off (α = 0): permanent multipole energy, cubic and triclinic PME."""
    c = periodic_case
    assert np.all(c["mu_off"] == 0.0)
    assert c["e_perm_pm"] == pytest.approx(c["e_perm_omm"], rel=1e-5)


def test_periodic_direct_polarization_matches_openmm(periodic_case):
    """Direct polarization, no damping: induced dipoles (max-norm relative) and total energy."""
    c = periodic_case
    mu_pm, mu_omm = c["mu_ind_pm"], c["mu_ind_omm"]
    assert np.abs(mu_pm - mu_omm).max() <= 1e-5 * np.abs(mu_pm).max()
    assert c["e_total_pm"] == pytest.approx(c["e_total_omm"], rel=1e-5)
    # the polarization energy alone (4–8 % of the total here) against
    # −½ Σ μ_ind·E = −½ Σ |μ_ind|²/α built from OpenMM's induced dipoles (the AMOEBA
    # direct-polarization energy, checked exactly in the open two-site test)
    alpha = c["alpha_a3"] / COULOMB
    e_pol_omm = -0.5 * np.sum((mu_omm ** 2).sum(-1) / alpha)
    assert c["e_resp_pm"] == pytest.approx(e_pol_omm, rel=1e-5)


def test_periodic_pme_matches_openmm(periodic_case):
    """polarmace's smooth PME route against the same OpenMM references (same tolerances)."""
    c = periodic_case
    off = polarmace_multipoles(c["pos"], c["q"], c["mu"], c["theta"], None, c["cell"], "pme")
    assert off.energy.item() == pytest.approx(c["e_perm_omm"], rel=1e-5)
    res = polarmace_multipoles(c["pos"], c["q"], c["mu"], c["theta"], c["alpha_a3"], c["cell"],
                               "pme")
    mu_pm = res.induced_dipoles.numpy()
    assert np.abs(mu_pm - c["mu_ind_omm"]).max() <= 1e-5 * np.abs(mu_pm).max()
    assert res.energy.item() == pytest.approx(c["e_total_omm"], rel=1e-5)

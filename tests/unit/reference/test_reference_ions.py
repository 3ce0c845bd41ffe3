"""Exact-truth NaCl reference data (polarmace.reference.openmm_ions): labels against finite
differences and an independent implementation, BEC routes, sum rules, Drude relaxation, resume,
and the shipped quickstart file.

Every label is computed in double precision (OpenMM Reference platform), so the tolerances below
come from the finite-difference truncation (O(h²)), the Ewald truncation (ewaldErrorTolerance
1e-8) and the Drude relaxation tolerance (1e-9 eV/Å), not from the machine.
"""


import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from polarmace.reference import openmm_ions as oi  # noqa: E402
from polarmace.units import COULOMB  # noqa: E402
from repo_paths import ROOT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"


def _geometry(temperature=1300.0, phase="melt", scale=1.0, noise=0.15, seed=0):
    """A disordered 64-ion cell (rock salt at the reference density plus Gaussian noise)."""
    length = oi.box_length(64, temperature, phase) * scale
    symbols, pos, cell = oi.rock_salt(2, length / 2)
    pos = pos + np.random.default_rng(seed).normal(scale=noise, size=pos.shape)
    return symbols, oi.wrap(pos, cell), cell


@pytest.fixture(scope="module")
def rigid():
    symbols, pos, cell = _geometry()
    engine = oi.IonEngine(symbols, cell, oi.RIGID, field=True)
    return engine, pos


@pytest.fixture(scope="module")
def drude():
    symbols, pos, cell = _geometry(scale=0.97, seed=1)
    engine = oi.IonEngine(symbols, cell, oi.DRUDE, field=True)
    labels = oi.label_frame(engine, pos, with_bec=True)
    return engine, pos, labels


def _fd_forces(engine, pos, components, h=1e-3):
    out = []
    for i, b in components:
        e = []
        for sign in (1.0, -1.0):
            p = pos.copy()
            p[i, b] += sign * h
            e.append(engine.relax(p, d0=np.zeros((engine.n_drudes, 3)))[0])
        out.append(-(e[0] - e[1]) / (2 * h))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Rigid ions
# --------------------------------------------------------------------------------------------
def test_rigid_forces_are_minus_gradient(rigid):
    engine, pos = rigid
    _, forces, _, _ = engine.relax(pos)
    comps = [(i, b) for i in (0, 1, 17, 40) for b in range(3)]
    fd = _fd_forces(engine, pos, comps)
    # central differences, h = 1e-3 Å: error h²/6·|∂³E| ≲ 1e-6·(A/ρ³)e^(−r/ρ) ~ 1e-5 eV/Å at
    # the closest contacts; a unit or sign error would be O(1) eV/Å
    assert np.abs(fd - np.array([forces[i, b] for i, b in comps])).max() < 1e-4
    assert np.abs(forces).max() > 0.3  # a real test: the forces are not ~0


def _torch_energy(symbols, positions, cell):
    """Independent rigid-ion energy: BMH with OpenMM's switch (torch, minimum image) plus
    polarmace's own Ewald for ±1 e point charges."""
    from polarmace.electrostatics import Electrostatics

    model = oi.RIGID
    n = len(symbols)
    i, j = np.triu_indices(n, 1)
    frac = positions @ torch.linalg.inv(cell)
    dfrac = frac[j] - frac[i]
    dfrac = dfrac - torch.round(dfrac.detach())
    r = (dfrac @ cell).norm(dim=1)
    params = np.array([oi.bmh_parameters(symbols[a], symbols[b]) for a, b in zip(i, j)])
    amp, c6, c8 = (torch.tensor(params[:, k]) for k in range(3))
    u = amp * torch.exp(-r / oi.TF_RHO) - c6 / r ** 6 - c8 / r ** 8
    x = ((r - model.switch) / (model.cutoff - model.switch)).clamp(0.0, 1.0)
    switch = 1 - 10 * x ** 3 + 15 * x ** 4 - 6 * x ** 5
    short = torch.where(r < model.cutoff, u * switch, torch.zeros_like(r)).sum()
    q = torch.tensor([oi.CHARGE[s] for s in symbols])
    coulomb = Electrostatics(sigma=0.0, method="ewald", accuracy=1e-12, real_space_cutoff=5.5)(
        positions, cell[None], torch.tensor([[True] * 3]), q).energy.sum()
    return short, coulomb


def test_rigid_labels_match_independent_implementation(rigid, float64_default):
    """Energy, forces and stress of OpenMM (FD stress) vs torch BMH + polarmace Ewald (autograd)."""
    from polarmace.derivatives import apply_strain

    engine, pos = rigid
    energy, forces, _, _ = engine.relax(pos)
    stress = oi.stress_fd(engine, pos)
    coul_openmm, _ = engine.evaluate(pos, np.zeros((0, 3)), groups={0})

    p = torch.tensor(pos, requires_grad=True)
    cell = torch.tensor(engine.cell)
    strain = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    ps, cs = apply_strain(p, cell[None], torch.zeros(len(pos), dtype=torch.long), strain)
    short, coulomb = _torch_energy(engine.symbols, ps, cs[0])
    total = short + coulomb
    g_pos, g_strain = torch.autograd.grad(total, (p, strain))
    volume = float(torch.linalg.det(cell))
    # Coulomb part alone: OpenMM's Ewald at ewaldErrorTolerance 1e-10 and polarmace's at 1e-12
    # (measured 3e-9 eV of ~250 eV; OpenMM 8's k_e equals polarmace's to 1e-16); a unit error
    # (nm/Å, kJ/eV, k_e) would be ≥ 1e-2 relative
    assert abs(float(coulomb.detach()) - coul_openmm) < 1e-6
    assert abs(float(total.detach()) - energy) < 1e-6
    assert np.abs(-g_pos.numpy() - forces).max() < 1e-7
    # FD stress (h = 1e-4): O(h²) error ~1e-9 eV/Å³ (BMH third strain derivative); shears from
    # the PME copy: measured ≤ 4e-10. Stresses here are ~1e-2 eV/Å³.
    assert np.abs(g_strain[0].numpy() / volume - stress).max() < 2e-8
    assert np.abs(stress).max() > 1e-3


def test_stress_sign_convention(rigid):
    """ASE sign: a compressed crystal has negative diagonal stress, an expanded one positive."""
    for scale, sign in ((0.965, -1.0), (1.06, 1.0)):
        symbols, pos, cell = _geometry(800.0, "crystal", scale, noise=0.0)
        engine = oi.IonEngine(symbols, cell, oi.RIGID)
        engine.relax(pos)
        sigma = oi.stress_fd(engine, pos)
        assert np.all(sign * np.diag(sigma) > 1e-3)


def test_rigid_bec_is_charge_times_identity(rigid):
    engine, pos = rigid
    labels = oi.label_frame(engine, pos, with_stress=False)
    z = labels["arrays"]["BEC"].reshape(-1, 3, 3)
    q = labels["arrays"]["true_charges"]
    assert np.array_equal(z, q[:, None, None] * np.eye(3))
    assert np.array_equal(z.sum(axis=0), np.zeros((3, 3)))          # ASR, Q = 0
    assert np.array_equal(labels["arrays"]["true_polarizability"], np.zeros(len(q)))
    # the field route on the same rigid system: F(E) = F(0) + qE exactly (linear in E)
    zf, alpha = oi.bec_field(engine, pos)
    assert np.abs(zf - z).max() < 1e-8
    assert np.abs(alpha).max() < 1e-8


# --------------------------------------------------------------------------------------------
# Drude ions
# --------------------------------------------------------------------------------------------
def test_drude_residual_forces_vanish(drude):
    engine, pos, labels = drude
    d = labels["arrays"]["induced_dipoles"][engine.info.parents] / engine.info.drude_charges[:, None]
    # a fresh evaluation at the stored Drude positions: the Drude forces are ~0
    _, forces = engine.evaluate(pos, d)
    assert np.abs(forces[len(pos):]).max() <= engine.relax_tolerance * 1.0001
    assert labels["info"]["drude_residual"] <= engine.relax_tolerance
    # displacements small but not zero (the Drudes do respond)
    assert 1e-3 < np.abs(d).max() < 0.2


def test_drude_forces_are_total_derivative(drude):
    engine, pos, labels = drude
    comps = [(0, 0), (1, 1), (22, 2), (45, 1)]
    fd = _fd_forces(engine, pos, comps)
    # FD of the relaxed energy: O(h²) truncation ~1e-5 eV/Å; relaxation error enters the energy
    # quadratically (residual²/k ~ 1e-20 eV)
    assert np.abs(fd - np.array([labels["arrays"]["forces"][i, b] for i, b in comps])).max() < 1e-4


def test_drude_stress_matches_relaxed_fd(drude):
    engine, pos, labels = drude
    engine.relax(pos, d0=np.zeros((engine.n_drudes, 3)))
    relaxed = oi.stress_fd(engine, pos, relax=True)
    # the label strains the relaxed Drudes without relaxing them again: same first derivative, so
    # at the same step h = 1e-4 the two differ only at O(h²) (measured ~3e-10 eV/Å³, like the
    # ~5e-9 change of either from h = 1e-4 to 3e-5); the stress itself is ~2e-2 eV/Å³
    assert np.abs(relaxed - labels["info"]["stress"]).max() < 1e-8
    assert np.abs(relaxed).max() > 1e-3


def test_drude_bec_field_route_equals_displacement_route(drude):
    engine, pos, labels = drude
    z = labels["arrays"]["BEC"].reshape(-1, 3, 3)
    atoms = [0, 9]   # one Na, one Cl (all 64: test_drude_bec_routes_all_atoms, slow)
    zd = oi.bec_displacement(engine, pos, step=1e-3, atoms=atoms)
    # field ±0.01 V/Å and displacement ±1e-3 Å, both central: O(h²) ≲ 1e-7 e; relaxation
    # residual 1e-9 eV/Å → ≲ 1e-6 e after division by 2h. Z* − q·I is ~0.1–0.5 e here.
    assert np.abs(zd[atoms] - z[atoms]).max() < 1e-5
    q = labels["arrays"]["true_charges"]
    assert np.abs(z[atoms] - q[atoms, None, None] * np.eye(3)).max() > 0.05


@pytest.mark.slow
def test_drude_bec_routes_all_atoms(drude):
    """Both BEC routes for every ion (384 relaxations, ~1 min)."""
    engine, pos, labels = drude
    zd = oi.bec_displacement(engine, pos, step=1e-3)
    assert np.abs(zd - labels["arrays"]["BEC"].reshape(-1, 3, 3)).max() < 1e-5
    assert np.abs(zd.sum(axis=0)).max() < 1e-5  # ASR by the displacement route


def test_drude_bec_acoustic_sum_rule(drude):
    _, _, labels = drude
    z = labels["arrays"]["BEC"].reshape(-1, 3, 3)
    # Σ_i Z*_i = Q·I = 0: Ewald forces conserve momentum to rounding (≲1e-10 e after 1/(2h))
    assert np.abs(z.sum(axis=0)).max() < 1e-8
    assert labels["info"]["total_charge"] == 0.0


def test_drude_polarizability_and_induced_dipoles(drude):
    engine, pos, labels = drude
    alpha_i = labels["arrays"]["true_polarizability"]
    symbols = np.array(engine.symbols)
    assert np.allclose(alpha_i[symbols == "Cl"], 3.0, rtol=1e-7)    # OpenMM k_D implies the input α
    assert np.allclose(alpha_i[symbols == "Na"], 0.3, rtol=1e-7)
    # μ_ind = α E_loc / k_e with E_loc = (Coulomb + BMH force on the Drude) / q_D
    mu = labels["arrays"]["induced_dipoles"]
    d = mu[engine.info.parents] / engine.info.drude_charges[:, None]
    _, f_elec = engine.evaluate(pos, d, groups={0, 1})
    e_loc = f_elec[len(pos):] / engine.info.drude_charges[:, None]
    predicted = alpha_i[engine.info.parents, None] * e_loc / COULOMB
    assert np.abs(predicted - mu[engine.info.parents]).max() < 1e-9  # residual·|q_D|/k_D ~ 5e-11
    assert np.abs(mu).max() > 0.05
    # cell polarizability: symmetric (a second derivative) and positive definite
    a = labels["info"]["polarizability"]
    assert np.abs(a - a.T).max() < 1e-6 * np.abs(a).max()
    assert np.linalg.eigvalsh(0.5 * (a + a.T)).min() > 0.5 * alpha_i.sum()


# --------------------------------------------------------------------------------------------
# Generator: resume, file format
# --------------------------------------------------------------------------------------------
def _tiny_plan(model=oi.RIGID, **kw):
    base = dict(model=model, melt_temperatures=(1300.0,), crystal_temperatures=(1000.0,), scales=(1.0,),
                chunks_per_condition=2, frames=6, sample_every=20, equilibration_steps=50,
                premelt_steps=50, seed=3)
    base.update(kw)
    return oi.MeltPlan(**base)


def test_resume_gives_the_same_frames(tmp_path):
    plan = _tiny_plan()
    full = oi.generate_melt(tmp_path / "a" / "set.extxyz", plan, progress=False)
    out = tmp_path / "b" / "set.extxyz"
    oi.generate_melt(out, plan, progress=False, stop_after=2)       # "killed" after two chunks
    assert not out.exists()
    chunks = out.with_name(out.name + ".chunks")
    assert len(list(chunks.glob("chunk_*.extxyz"))) == 2
    (chunks / "chunk_003.extxyz.partial").write_text("3\ntorn")     # a chunk killed mid-write
    oi.generate_melt(out, plan, progress=False)
    assert out.read_bytes() == full.read_bytes()
    frames = oi.read_frames(out)
    assert len(frames) == plan.frames
    assert {f.info["phase"] for f in frames} == {"melt", "crystal"}
    with pytest.raises(ValueError, match="different plan"):
        oi.generate_melt(out, _tiny_plan(seed=4), progress=False)


def test_drude_generator_marks_bec_frames(tmp_path):
    from polarmace.data.atoms import read_configurations

    plan = _tiny_plan(oi.DRUDE, chunks_per_condition=1, frames=3, bec_frames=1, stress=False)
    path = oi.generate_melt(tmp_path / "drude.extxyz", plan, progress=False)
    frames = oi.read_frames(path)
    has = [bool(f.info["has_bec"]) for f in frames]
    assert sum(has) == 1 and has.index(True) == int(plan.bec_subset()[0])
    for f, config in zip(frames, read_configurations(path)):
        assert ("BEC" in f.arrays) == f.info["has_bec"] == (config.bec is not None)
        if f.info["has_bec"]:  # ASR; 64 entries written with 10 significant digits (≤ 5e-10 each)
            assert np.abs(f.arrays["BEC"].reshape(-1, 3, 3).sum(axis=0)).max() < 1e-7
        assert f.info["drude_residual"] <= 1e-9
        assert np.allclose(f.arrays["true_charges"], [oi.CHARGE[s] for s in f.get_chemical_symbols()])
    assert len(oi.read_frames(tmp_path / "drude_test.extxyz")) == 1
    assert len(oi.read_frames(tmp_path / "drude_train.extxyz")) == 2


def test_quickstart_file():
    from polarmace.data.atoms import read_configurations

    assert QUICKSTART.stat().st_size < 2e6
    configs = read_configurations(QUICKSTART, required=("energy", "forces", "stress", "bec"))
    assert len(configs) == 200
    frames = oi.read_frames(QUICKSTART)
    for config, atoms in zip(configs, frames):
        q = atoms.arrays["true_charges"]
        assert config.num_atoms == 64 and atoms.pbc.all()
        assert np.array_equal(config.bec, q[:, None, None] * np.eye(3))
        assert np.array_equal(np.sort(np.unique(q)), [-1.0, 1.0]) and q.sum() == 0
        assert not np.any(atoms.arrays["true_polarizability"])
        assert float(config.total_charge) == 0.0
    temps = {a.info["temperature"] for a in frames}
    scales = {a.info["density_scale"] for a in frames}
    assert len(temps) >= 4 and len(scales) >= 3


def test_quickstart_labels_reproduce():
    """A stored frame's energy, forces and stress are those of the model at the stored positions."""
    atoms = oi.read_frames(QUICKSTART)[57]
    engine = oi.IonEngine(atoms.get_chemical_symbols(), atoms.cell.array, oi.RIGID)
    energy, forces, _, _ = engine.relax(atoms.positions)
    # written with 12 significant digits (energy) and %.10g (forces)
    assert abs(energy - atoms.info["energy"]) < 1e-8
    assert np.abs(forces - atoms.arrays["forces"]).max() < 1e-8
    assert np.abs(oi.stress_fd(engine, atoms.positions) - atoms.info["stress"]).max() < 1e-10

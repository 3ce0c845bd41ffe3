"""AMOEBA water reference data (polarmace.reference.amoeba_water).

Independent checks: forces against finite differences of the energy, the total dipole against
OpenMM's own `getSystemMultipoleMoments`, Born effective charges against the acoustic sum rule,
against rotation covariance and against a second route (Maxwell relation Z*_i,ab = ∂F_ib/∂E_a
from an applied field), the polarizability against symmetry and rotation, and the generators'
file output, resume and rejection logic.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("openmm")

import ase.io  # noqa: E402

from polarmace.reference import amoeba_water as aw  # noqa: E402
from polarmace.units import COULOMB, DEBYE, HARTREE  # noqa: E402

#: CODATA 2018 Hartree energy in kJ/mol, for an independent check of KJ_PER_MOL_IN_EV.
HARTREE_IN_KJ_PER_MOL = 2625.4996394799
#: Settings that keep the generator tests short (no equilibration, a few MD steps per frame).
FAST = dict(sample_every=2, equilibration_steps=0, initial_equilibration_steps=0,
            resume_equilibration_steps=2, minimize_iterations=20, progress=False)


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _label(atoms, key):
    """A per-structure label from atoms.info or (after ASE's extxyz reader) atoms.calc."""
    if key in atoms.info:
        return np.asarray(atoms.info[key])
    return np.asarray(atoms.calc.results[key])


@pytest.fixture(scope="module")
def box():
    # The seeded built box, never ../shared's liquid-64.xyz: the fixtures (and every number the
    # tests below compare) must not depend on the machine the suite runs on.
    return aw.built_water_box(64, seed=0)


@pytest.fixture(scope="module")
def cluster4(box):
    return aw.cut_cluster(box[0], box[1], 5, 4)


@pytest.fixture(scope="module")
def engine4():
    return aw.AmoebaWater(4)


@pytest.fixture(scope="module")
def periodic_engine(box):
    return aw.AmoebaWater(64, box[1])


def test_kj_per_mol_conversion():
    assert aw.KJ_PER_MOL_IN_EV == pytest.approx(HARTREE / HARTREE_IN_KJ_PER_MOL, rel=1e-9)
    assert aw.KJ_PER_MOL_IN_EV == pytest.approx(0.010364269656262175, rel=1e-15)


def test_water_box_and_cluster_geometry(box):
    pos, cell = box
    assert pos.shape == (192, 3) and cell.shape == (3, 3)
    mol = pos.reshape(-1, 3, 3)
    oh = np.linalg.norm(mol[:, 1:] - mol[:, :1], axis=-1)
    assert oh.min() > 0.8 and oh.max() < 1.2  # whole molecules, O first
    frac = mol[:, 0] @ np.linalg.inv(cell)
    assert frac.min() >= 0.0 and frac.max() < 1.0  # O inside the cell
    cluster = aw.cut_cluster(pos, cell, 0, 10).reshape(-1, 3, 3)
    assert np.abs(cluster.reshape(-1, 3).mean(axis=0)).max() < 1e-12
    oh = np.linalg.norm(cluster[:, 1:] - cluster[:, :1], axis=-1)
    assert oh.max() < 1.2
    built, built_cell = aw.water_box(27, seed=3)  # no start file: a built box
    assert built.shape == (81, 3)
    density = 27 * 18.01528 / 6.02214076e23 / abs(np.linalg.det(built_cell)) * 1e24
    assert density == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(FileNotFoundError):
        aw.water_box(64, start="/nonexistent/start.xyz")


def test_cluster_forces_are_minus_energy_gradient(engine4, cluster4):
    energy, forces = engine4.energy_forces(cluster4)
    assert np.isfinite(energy) and forces.shape == (12, 3)
    # The fixture is seeded (the built box): check that it is a meaningful one, i.e. its forces
    # are far above the finite-difference tolerance below, so agreement is not trivially met.
    atol = 5e-6
    assert np.abs(forces).max() > 1e4 * atol
    h = 1e-4
    numeric = np.zeros_like(forces)
    for i in range(12):
        for b in range(3):
            p = cluster4.copy()
            p[i, b] += h
            e_plus = engine4.energy_forces(p)[0]
            p[i, b] -= 2 * h
            e_minus = engine4.energy_forces(p)[0]
            numeric[i, b] = -(e_plus - e_minus) / (2 * h)
    np.testing.assert_allclose(numeric, forces, atol=atol)


def test_periodic_forces_dipole_and_permanent_dipoles(periodic_engine, box):
    pos, cell = box
    labels = periodic_engine.labels(pos)
    h = 1e-3
    for i, b in [(0, 0), (100, 2)]:
        p = pos.copy()
        p[i, b] += h
        e_plus = periodic_engine.energy_forces(p)[0]
        p[i, b] -= 2 * h
        e_minus = periodic_engine.energy_forces(p)[0]
        # O(h²) truncation at h = 1e-3 Å is ~3e-5 eV/Å here (cf. the cluster test at h = 1e-4).
        assert -(e_plus - e_minus) / (2 * h) == pytest.approx(labels["forces"][i, b], abs=2e-4)
    # Dipole rebuilt from the PME context itself (permanent + induced dipoles + Σ q r).
    permanent = periodic_engine.openmm_permanent_dipoles(pos)
    induced = np.asarray(periodic_engine.multipoles.getInducedDipoles(periodic_engine.context))[:192] * 10.0
    expected = periodic_engine.charges @ pos + permanent.sum(0) + induced.sum(0)
    np.testing.assert_allclose(labels["dipole"], expected, atol=1e-9)
    assert abs(periodic_engine.charges.sum()) < 1e-12
    # Whole-molecule convention: moving a whole molecule by a lattice vector changes nothing.
    shifted = pos.copy()
    shifted[3:6] += cell[0]
    np.testing.assert_allclose(periodic_engine.dipole(shifted), labels["dipole"], atol=1e-6)


def test_cluster_dipole_matches_openmm_system_moments(box):
    cluster = aw.cut_cluster(box[0], box[1], 11, 8)
    engine = aw.AmoebaWater(8)
    mine = engine.dipole(cluster)
    openmm_dipole = engine.openmm_system_dipole(cluster)
    # OpenMM's e·nm → Debye factor differs from polarmace.units.DEBYE by ~1e-6 relative.
    assert np.linalg.norm(mine) > 0.1
    np.testing.assert_allclose(mine, openmm_dipole, rtol=0, atol=1e-5 * np.linalg.norm(mine))
    # Induced dipoles matter: with direct (one-step) polarization the dipole differs.
    assert np.abs(aw.AmoebaWater(8, polarization="direct").dipole(cluster) - mine).max() > 1e-3
    assert DEBYE == pytest.approx(0.20819434, rel=1e-7)


def test_bec_sum_rule_rotation_and_maxwell_relation(engine4, cluster4):
    z = aw.born_effective_charges(engine4, cluster4)
    assert z.shape == (12, 3, 3)
    assert np.abs(z).max() > 0.3
    assert np.abs(z.sum(axis=0)).max() < 1e-4  # neutral cluster: Σ_i Z*_i = 0
    # Rigid rotation about the centroid: Z*_i → R Z*_i Rᵀ.
    rot = _rotation(4)
    centre = cluster4.mean(axis=0)
    rotated = (cluster4 - centre) @ rot.T + centre
    z_rot = aw.born_effective_charges(engine4, rotated)
    np.testing.assert_allclose(z_rot, np.einsum("ab,ibc,dc->iad", rot, z, rot), atol=1e-4)
    np.testing.assert_allclose(engine4.dipole(rotated), rot @ engine4.dipole(cluster4), atol=1e-7)
    # Second route: a uniform field from two far probe charges, Z*_i,ab = ∂F_ib/∂E_a.
    probe = aw.AmoebaWater(4, field_probe=(0.05, 1e4))
    alpha, z_field = probe.field_response(cluster4)
    np.testing.assert_allclose(z_field, z, atol=1e-4)
    alpha_rot, _ = probe.field_response(rotated)
    np.testing.assert_allclose(alpha_rot, rot @ alpha @ rot.T, atol=1e-5 * np.abs(alpha).max())
    np.testing.assert_allclose(alpha, alpha.T, atol=1e-5 * np.abs(alpha).max())
    assert np.linalg.eigvalsh(0.5 * (alpha + alpha.T)).min() > 0
    # AMOEBA water's molecular polarizability is ~1.4 Å³ (experiment 1.45 Å³).
    assert np.trace(alpha) * COULOMB / 3 / 4 == pytest.approx(1.42, rel=0.1)
    # The response is linear: a weaker, farther field gives the same α.
    alpha_weak, _ = aw.AmoebaWater(4, field_probe=(0.01, 3e4)).field_response(cluster4)
    np.testing.assert_allclose(alpha_weak, alpha, rtol=0, atol=1e-5 * np.abs(alpha).max())


def test_bad_inputs(tmp_path, engine4, cluster4, box):
    bad = cluster4.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        engine4.energy_forces(bad)
    with pytest.raises(ValueError, match="shape"):
        engine4.dipole(cluster4[:-1])
    with pytest.raises(ValueError, match="field_probe"):
        engine4.field_response(cluster4)
    with pytest.raises(ValueError, match="field_probe"):
        aw.AmoebaWater(4, field_probe=(0.05, 1e4)).dipole(cluster4)
    with pytest.raises(ValueError, match="cutoff"):
        aw.AmoebaWater(64, box[1], cutoff=7.0)
    out = tmp_path / "x.extxyz"
    with pytest.raises(ValueError, match="n_configs"):
        aw.generate_periodic(out, n_configs=0, progress=False)
    with pytest.raises(ValueError, match="temperatures"):
        aw.generate_periodic(out, n_configs=2, temperatures=(300.0, -1.0), progress=False)
    with pytest.raises(ValueError, match="temperatures"):
        aw.generate_periodic(out, n_configs=2, temperatures=(float("nan"),), progress=False)
    with pytest.raises(ValueError, match="n_molecules"):
        aw.generate_clusters(out, n_configs=2, n_molecules=(10, 5), progress=False)
    with pytest.raises(ValueError, match="fd_step"):
        aw.generate_clusters(out, n_configs=2, fd_step=0.0, progress=False)
    out.write_text("6\ncomment\n")  # a frame of the wrong size
    with pytest.raises(ValueError, match="atoms"):
        aw.generate_periodic(out, n_configs=2, progress=False)
    out.write_text("hello\n")
    with pytest.raises(ValueError, match="atom count"):
        aw.generate_periodic(out, n_configs=2, progress=False)
    assert not aw._labels_ok({"energy": np.nan, "forces": np.zeros((3, 3))}, 50.0)
    assert not aw._labels_ok({"energy": 0.0, "forces": np.full((3, 3), 60.0)}, 50.0)
    assert aw._labels_ok({"energy": 0.0, "forces": np.ones((3, 3))}, 50.0)


def test_rejected_frames_are_not_written(tmp_path):
    out = tmp_path / "rejected.extxyz"
    with pytest.raises(RuntimeError, match="rejected"):
        aw.generate_periodic(out, n_configs=2, max_force=0.0, max_rejects=1, **FAST)
    assert not out.exists() or aw._complete_frames(out) == 0


def test_periodic_resume(tmp_path):
    kwargs = dict(n_configs=5, temperatures=(300.0, 320.0), seed=3, **FAST)
    full = aw.generate_periodic(tmp_path / "full.extxyz", **kwargs)
    part = tmp_path / "part.extxyz"
    aw.generate_periodic(part, stop_after=3, **kwargs)
    assert len(ase.io.read(part, ":")) == 3
    with open(part, "a") as fh:  # a run killed while writing frame 4
        fh.write("192\nProperties=species:S:1:pos:R:3 energy=1.0\nO 0.0 0.0\n")
    no_ckpt = tmp_path / "no_ckpt.extxyz"
    shutil.copy(part, no_ckpt)
    aw.generate_periodic(part, **kwargs)
    frames, reference = ase.io.read(part, ":"), ase.io.read(full, ":")
    assert len(frames) == 5
    for a, b in zip(frames, reference):  # checkpoint: the same trajectory as without the kill
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)
        assert _label(a, "energy") == pytest.approx(float(_label(b, "energy")), abs=1e-6)
    for frame, temperature in zip(frames, [300.0, 300.0, 300.0, 320.0, 320.0]):
        assert frame.info["temperature"] == temperature
        assert frame.info["source"] == "amoeba2018" and frame.info["total_charge"] == 0.0
        assert frame.pbc.all() and frame.get_forces().shape == (192, 3)
        assert np.all(np.isfinite(frame.get_forces())) and np.all(np.isfinite(_label(frame, "dipole")))
    # Without the checkpoint: restart from the last frame in the file, fresh velocities.
    aw.generate_periodic(no_ckpt, **kwargs)
    frames = ase.io.read(no_ckpt, ":")
    assert len(frames) == 5
    np.testing.assert_allclose(frames[2].positions, reference[2].positions, atol=1e-8)
    assert all(np.all(np.isfinite(f.get_forces())) for f in frames)
    # Calling again when the file is complete does nothing.
    size = no_ckpt.stat().st_size
    aw.generate_periodic(no_ckpt, **kwargs)
    assert no_ckpt.stat().st_size == size


def test_generate_clusters_file(tmp_path):
    out = aw.generate_clusters(tmp_path / "clusters.extxyz", n_configs=2, n_molecules=(3, 4), seed=1, **FAST)
    frames = ase.io.read(out, ":")
    assert len(frames) == 2
    engines = {}
    for atoms in frames:
        n = len(atoms)
        assert n in (9, 12) and atoms.info["n_molecules"] == n // 3
        assert not atoms.pbc.any() and atoms.info["total_charge"] == 0.0
        bec = atoms.arrays["BEC"].reshape(n, 3, 3)
        assert np.abs(bec.sum(axis=0)).max() < 1e-4
        assert atoms.info["bec_asr"] == pytest.approx(np.abs(bec.sum(axis=0)).max(), abs=1e-6)
        alpha = np.asarray(atoms.info["polarizability"]).reshape(3, 3)
        assert np.trace(alpha) / 3 / (n // 3) == pytest.approx(1.42, rel=0.15)
        engine = engines.setdefault(n, aw.AmoebaWater(n // 3))
        labels = engine.labels(atoms.positions)
        assert float(_label(atoms, "energy")) == pytest.approx(labels["energy"], abs=1e-6)
        np.testing.assert_allclose(_label(atoms, "dipole"), labels["dipole"], atol=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), labels["forces"], atol=1e-5)
    from polarmace.data.atoms import read_configurations

    configs = read_configurations(out)
    assert configs[0].bec is not None and configs[0].dipole is not None and configs[0].energy is not None


def test_dipole_trajectory_is_the_dipole_of_an_nve_trajectory(box):
    """The IR reference series: P(t) is continuous (no per-atom wrapping), its time difference
    equals the directional derivative of P along the stored velocities (dP/dt = Σ_i v_i·∂P/∂r_i,
    by finite differences of a second label engine), so times, velocities and units agree, and
    production conserves the total energy."""
    from polarmace.reference.amoeba_dynamics import dipole_trajectory

    pos, cell = box
    dt = 0.5
    traj = dipole_trajectory(pos, cell, dt_fs=dt, equil_ps=0.01, prod_ps=0.005, sample_every=1,
                             minimize_iterations=20, epsilon=1e-7, ewald_tolerance=1e-5,
                             progress=False)
    assert traj.dipoles.shape == (10, 3) and traj.dt_fs == dt
    assert traj.volume == pytest.approx(abs(np.linalg.det(cell)))
    # a H atom wrapped alone would jump the dipole by q_H·L ≈ 3 e·Å
    assert np.abs(np.diff(traj.dipoles, axis=0)).max() < 0.1
    # OpenMM's VerletIntegrator is leapfrog: the stored velocity of sample k is v(t_k − dt/2)
    # and r_k = r_(k−1) + dt·v exactly, so P_k − P_(k−1) is P's central difference along v
    # about the midpoint r_k − v·dt/2, which the label engine evaluates independently.
    k = 5
    from_series = (traj.dipoles[k] - traj.dipoles[k - 1]) / dt
    engine = aw.AmoebaWater(64, cell, epsilon=1e-7, ewald_tolerance=1e-5)
    v = traj.velocities[k]
    mid = traj.positions[k] - 0.5 * dt * v
    np.testing.assert_allclose(mid - 0.5 * dt * v, traj.positions[k - 1], atol=1e-5)
    h = 0.5 * dt
    directional = (engine.dipole(mid + h * v) - engine.dipole(mid - h * v)) / (2 * h)
    np.testing.assert_allclose(engine.dipole(traj.positions[k]), traj.dipoles[k], atol=1e-5)
    assert np.linalg.norm(from_series - directional) < 1e-6 * np.linalg.norm(directional)
    kinetic_scale = np.ptp(traj.temperature) * 1.5 * 192 * 8.617e-5
    assert np.ptp(traj.total_energy) < 0.1 * kinetic_scale  # NVE: E_tot flat while K swings

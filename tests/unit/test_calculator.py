"""ASE calculator and TorchScript export: agreement with the model called directly, forces and
stress against finite differences through the calculator, neighbour-list reuse along MD,
recomputation on info changes, BEC field forces, energy conservation of a field-driven open
NVE run, and the exported file loaded with plain torch.jit.load in a process without polarmace."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet

from polarmace.calculator import PolarMACECalculator
from polarmace.data.atoms import Configuration
from polarmace.data.graph import collate
from polarmace.model import build_model

R_MAX = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


def thermalize(atoms: Atoms, temperature_K: float, seed: int) -> None:
    """Maxwell-Boltzmann velocities (numpy), zero total momentum."""
    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    momenta -= masses * momenta.sum(axis=0) / masses.sum()
    atoms.set_momenta(momenta)


def tiny_model(variant: str = "uQiqiu", seed: int = 0, perturb: float = 0.0, eps_infty=None,
               scales: float = 1.0) -> torch.nn.Module:
    """hidden 4x0e+4x1o, max_ell 2, correlation 2, r_max 3 Å; `perturb` adds noise to weights."""
    cfg = {
        "model": {"elements": ["H", "C", "O"], "e0s": {"H": -0.5, "C": -1.0, "O": -2.0},
                  "avg_num_neighbors": 4.0, "hidden_irreps": "4x0e+4x1o", "max_ell": 2,
                  "correlation": 2, "num_interactions": 2, "radial_mlp": [8, 8], "r_max": R_MAX},
        "long_range": {"variant": variant, "sigma": 1.0, "polarizability": "anisotropic",
                       "eps_infty": eps_infty,
                       "readout_scales": {"charges": scales, "dipoles": scales,
                                          "quadrupoles": scales, "kappa": 0.1 * scales,
                                          "alpha": 0.1 * scales}},
    }
    torch.manual_seed(seed)
    model = build_model(cfg)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.eval()


def molecule(n: int = 6, seed: int = 0, spread: float = 1.8) -> Atoms:
    rng = np.random.default_rng(seed)
    pts: list = []
    while len(pts) < n:
        p = rng.uniform(-spread, spread, 3)
        if all(np.linalg.norm(p - x) > 1.0 for x in pts):
            pts.append(p)
    return Atoms(numbers=rng.choice([1, 6, 8], size=n), positions=np.array(pts))


def box(n: int = 10, length: float = 5.5, seed: int = 1) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.array([[length, 0.0, 0.0], [0.4, length * 0.95, 0.0], [-0.3, 0.2, length * 1.05]])
    pts: list = []
    while len(pts) < n:
        p = rng.uniform(0, 1, 3) @ cell
        ok = True
        for x in pts:
            d = p - x
            frac = np.linalg.solve(cell.T, d)
            d = (frac - np.round(frac)) @ cell
            ok &= np.linalg.norm(d) > 1.1
        if ok:
            pts.append(p)
    return Atoms(numbers=rng.choice([1, 6, 8], size=n), positions=np.array(pts), cell=cell, pbc=True)


def direct(model, atoms: Atoms, charge: float = 0.0, field=None, stress: bool = False, bec: bool = False):
    conf = Configuration(atomic_numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array,
                         pbc=atoms.pbc, total_charge=charge,
                         external_field=None if field is None else np.asarray(field, float))
    out = model(collate([conf], R_MAX, torch.float64), True, stress, bec)
    return {k: v.detach().numpy() for k, v in out.items()}


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("boundary", ["open", "periodic"])
def test_results_equal_the_model_called_directly(boundary):
    model = tiny_model(perturb=0.3)
    atoms = molecule() if boundary == "open" else box()
    atoms.info["charge"] = 1.0
    calc = PolarMACECalculator(model, compute_bec=True)
    atoms.calc = calc
    ref = direct(model, atoms, charge=1.0, stress=boundary == "periodic", bec=True)
    assert np.isclose(atoms.get_potential_energy(), ref["energy"][0], rtol=1e-12, atol=1e-12)
    assert np.isclose(calc.get_property("free_energy", atoms), ref["energy"][0], rtol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-11)
    np.testing.assert_allclose(atoms.get_charges(), ref["charges"], atol=1e-12)
    assert np.isclose(atoms.get_charges().sum(), 1.0, atol=1e-10)
    np.testing.assert_allclose(atoms.get_dipole_moment(), ref["polarization"][0], atol=1e-12)
    np.testing.assert_allclose(calc.get_property("polarizability", atoms), ref["polarizability"][0], atol=1e-12)
    np.testing.assert_allclose(calc.get_property("bec", atoms), ref["bec"], atol=1e-11)
    assert np.isclose(calc.get_property("electrostatic_energy", atoms), ref["electrostatic_energy"][0])
    energies = atoms.get_potential_energies()
    assert np.isclose(energies.sum(), ref["energy"][0], rtol=1e-12)
    if boundary == "periodic":
        s = ref["stress"][0]
        voigt = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        np.testing.assert_allclose(atoms.get_stress(), voigt, atol=1e-12)
    else:
        with pytest.raises(PropertyNotImplementedError):
            atoms.get_stress()


def test_short_range_model_has_no_bec_and_dtype_conversion():
    model = tiny_model("sr")
    atoms = molecule()
    calc = PolarMACECalculator(model, dtype="float32")
    atoms.calc = calc
    e32 = atoms.get_potential_energy()
    e64 = direct(model, atoms)["energy"][0]
    assert abs(e32 - e64) < 1e-4 * max(1.0, abs(e64))
    assert next(model.parameters()).dtype == torch.float64  # the caller's model is not converted
    with pytest.raises(PropertyNotImplementedError):
        calc.get_property("bec", atoms)


# --------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("field", [None, (0.3, -0.2, 0.1)])
def test_forces_are_minus_energy_gradient_through_calculator(field):
    model = tiny_model(perturb=0.3)
    atoms = molecule(n=5, seed=3)
    if field is not None:
        atoms.info["external_field"] = np.array(field)
    atoms.calc = PolarMACECalculator(model, skin=0.3)
    forces = atoms.get_forces()
    h = 1e-4
    rng = np.random.default_rng(0)
    for i, a in zip(rng.integers(0, len(atoms), 6), rng.integers(0, 3, 6)):
        e = []
        for s in (h, -h):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[i, a] += s
            e.append(moved.get_potential_energy())
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(fd - forces[i, a]) < 1e-6 * max(1.0, abs(fd)), (i, a, fd, forces[i, a])


def test_stress_equals_strain_derivative_through_calculator():
    model = tiny_model(perturb=0.3)
    atoms = box()
    atoms.calc = PolarMACECalculator(model)
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-5
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        e = []
        for s in (h, -h):
            strain = np.eye(3)
            strain[a, b] += s / 2
            strain[b, a] += s / 2
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            e.append(moved.get_potential_energy())
        fd = (e[0] - e[1]) / (2 * h) / volume
        assert abs(fd - stress[a, b]) < 1e-6 * max(1e-2, abs(fd)), (a, b, fd, stress[a, b])


# --------------------------------------------------------------------------- neighbour reuse
def test_neighbour_list_reuse_equals_fresh_build_along_md():
    model = tiny_model()
    atoms = box(n=10, seed=2)
    thermalize(atoms, 3000, 0)
    reuse = PolarMACECalculator(model, skin=0.4)
    fresh = PolarMACECalculator(model, skin=0.0)
    atoms.calc = reuse
    steps = 40
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    for _ in range(steps):
        dyn.run(1)
        e = atoms.get_potential_energy()
        f = atoms.get_forces()
        s = atoms.get_stress()
        probe = atoms.copy()
        probe.calc = fresh
        assert np.isclose(e, probe.get_potential_energy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(f, probe.get_forces(), atol=1e-11)
        np.testing.assert_allclose(s, probe.get_stress(), atol=1e-12)
    # hot atoms travel more than skin/2 = 0.2 Å in 40 fs: the list was rebuilt, but not every step
    assert 2 <= reuse.neighbours.builds < steps
    assert fresh.neighbours.builds >= steps


def test_rebuild_only_beyond_half_skin_and_on_cell_change():
    model = tiny_model("sr")
    atoms = box(n=8, seed=4)
    calc = PolarMACECalculator(model, skin=0.5)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.neighbours.builds == 1
    atoms.positions[3] += [0.2, 0.1, 0.0]          # 0.22 Å < skin/2
    atoms.get_potential_energy()
    assert calc.neighbours.builds == 1
    atoms.positions[3] += [0.05, 0.0, 0.03]        # now 0.28 Å from the reference > skin/2
    atoms.get_potential_energy()
    assert calc.neighbours.builds == 2
    atoms.set_cell(atoms.cell.array * 1.001, scale_atoms=True)
    atoms.get_potential_energy()
    assert calc.neighbours.builds == 3


# --------------------------------------------------------------------------- info changes
def test_charge_and_field_in_info_trigger_recomputation():
    model = tiny_model(perturb=0.3)
    atoms = molecule()
    calc = PolarMACECalculator(model)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    atoms.info["charge"] = 1.0
    e1 = atoms.get_potential_energy()
    assert not np.isclose(e0, e1)
    assert np.isclose(e1, direct(model, atoms, charge=1.0)["energy"][0], rtol=1e-12)
    del atoms.info["charge"]
    atoms.info["total_charge"] = -1.0
    assert np.isclose(atoms.get_charges().sum(), -1.0)
    atoms.info["external_field"] = [0.0, 0.0, 0.5]
    e2 = atoms.get_potential_energy()
    assert np.isclose(e2, direct(model, atoms, charge=-1.0, field=[0, 0, 0.5])["energy"][0], rtol=1e-12)
    # constructor default field, overridden by atoms.info
    calc2 = PolarMACECalculator(model, external_field=[0.0, 0.0, 0.5])
    probe = molecule()
    probe.info["charge"] = -1.0
    probe.calc = calc2
    assert np.isclose(probe.get_potential_energy(), e2, rtol=1e-12)


def test_periodic_field_adds_bec_forces_and_eps_infty_scaling():
    model = tiny_model(perturb=0.3)
    atoms = box()
    field = np.array([0.1, -0.05, 0.2])
    plain = PolarMACECalculator(model)
    atoms.calc = plain
    f0 = atoms.get_forces().copy()
    e0 = atoms.get_potential_energy()
    bec = plain.get_property("bec", atoms)
    atoms.info["external_field"] = field
    f1 = atoms.get_forces()
    assert np.isclose(atoms.get_potential_energy(), e0, rtol=1e-12)  # no energy term (periodic)
    np.testing.assert_allclose(f1 - f0, np.einsum("nab,a->nb", bec, field), atol=1e-11)
    # eps_infty in the calculator == eps_infty in the model's config (same weights)
    scaled = tiny_model(perturb=0.3, eps_infty=1.78)
    scaled.load_state_dict(model.state_dict())
    ref = direct(scaled, atoms, bec=True)
    calc = PolarMACECalculator(model, eps_infty=1.78, compute_bec=True)
    probe = atoms.copy()
    del probe.info["external_field"]
    probe.calc = calc
    np.testing.assert_allclose(calc.get_property("bec", probe), ref["bec"], atol=1e-11)
    np.testing.assert_allclose(calc.get_property("polarizability", probe), ref["polarizability"][0], atol=1e-11)
    assert not np.allclose(ref["bec"], bec)


# --------------------------------------------------------------------------- field-driven NVE
def _nve_energy_error(model, atoms0: Atoms, dt: float, steps: int):
    atoms = atoms0.copy()
    atoms.set_velocities(atoms0.get_velocities())
    atoms.calc = PolarMACECalculator(model, skin=0.5)
    dyn = VelocityVerlet(atoms, timestep=dt * units.fs)
    total, potential = [], []
    for _ in range(steps + 1):
        potential.append(atoms.get_potential_energy())
        total.append(potential[-1] + atoms.get_kinetic_energy())
        dyn.run(1)
    total = np.array(total)
    return np.abs(total - total[0]).max(), np.ptp(potential)


def test_open_system_nve_in_external_field_conserves_energy():
    """Velocity Verlet conserves a shadow energy: with forces = −∇(E incl. −E_ext·P) the total
    energy error stays bounded and scales as dt². Checks: (i) the error is < 2 % of the
    potential-energy swing over the run; (ii) halving dt cuts it by > 2.5 (ideal 4). A force
    inconsistent with the energy (e.g. the field term missing in either) gives an error that
    does not shrink with dt."""
    model = tiny_model(scales=1.0)
    atoms = molecule(n=6, seed=2)
    atoms.info["external_field"] = [0.4, 0.0, -0.3]
    thermalize(atoms, 600, 1)
    atoms.calc = PolarMACECalculator(model)
    e_field = atoms.get_potential_energy()
    no_field = atoms.copy()
    no_field.info.pop("external_field")
    no_field.calc = PolarMACECalculator(model)
    assert abs(e_field - no_field.get_potential_energy()) > 1e-2  # the field term is sizeable
    err1, swing = _nve_energy_error(model, atoms, 0.5, 100)
    err2, _ = _nve_energy_error(model, atoms, 0.25, 200)
    assert err1 < 0.02 * swing, (err1, swing)
    assert err1 / err2 > 2.5, (err1, err2)


# --------------------------------------------------------------------------- TorchScript export
@pytest.mark.parametrize("variant", ["sr", "uQiqiu"])
def test_export_loads_with_plain_torch_and_matches(tmp_path, variant):
    from polarmace.export import export_model

    model = tiny_model(variant, perturb=0.3)
    path = export_model(model, tmp_path / "model.ts")
    atoms = box()
    conf = Configuration(atomic_numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array,
                         pbc=atoms.pbc, total_charge=0.0)
    graph = collate([conf], R_MAX, torch.float64)
    torch.save({k: v for k, v in graph.items()}, tmp_path / "graph.pt")
    ref = model(graph, True, True, False)
    script = textwrap.dedent(f"""
        import sys, torch
        m = torch.jit.load({str(path)!r})
        g = torch.load({str(tmp_path / 'graph.pt')!r})
        out = m(g, True, True, False)
        torch.save({{k: v.detach() for k, v in out.items()}}, {str(tmp_path / 'out.pt')!r})
        assert not any(name.startswith(('polarmace', 'e3nn')) for name in sys.modules), 'imported'
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path))
    out = torch.load(tmp_path / "out.pt")
    keys = ["energy", "forces", "stress"] + (["charges"] if variant != "sr" else [])
    for key in keys:
        torch.testing.assert_close(out[key], ref[key].detach(), rtol=1e-6, atol=1e-6)
    # the calculator takes the exported file
    calc = PolarMACECalculator(str(path))
    atoms.calc = calc
    assert np.isclose(atoms.get_potential_energy(), float(ref["energy"].detach()[0]), rtol=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"].detach().numpy(), atol=1e-8)


def test_export_cli(tmp_path):
    from polarmace.cli.export import main
    from polarmace.export import load_torchscript

    model = tiny_model("sr")
    model.save(str(tmp_path / "m.pt"))
    main([str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.ts")])
    module, meta = load_torchscript(tmp_path / "m.ts")
    assert meta["r_max"] == R_MAX and meta["elements"] == ["H", "C", "O"]
    atoms = molecule()
    calc = PolarMACECalculator(str(tmp_path / "m.ts"))
    atoms.calc = calc
    assert np.isclose(atoms.get_potential_energy(), direct(model, atoms)["energy"][0], rtol=1e-10)



def test_periodic_nve_energy_error_scales_as_dt_squared():
    """Periodic cell (Ewald/PME + real-space electrostatics, stress path off): like the open
    test, the velocity-Verlet energy error is small against the potential swing and shrinks
    as dt² (a discontinuity or a force/energy mismatch would not)."""
    model = tiny_model()
    atoms = box(n=10, seed=2)
    thermalize(atoms, 300, 4)
    err1, swing = _nve_energy_error(model, atoms, 0.5, 60)
    err2, _ = _nve_energy_error(model, atoms, 0.25, 120)
    assert err1 < 0.02 * swing, (err1, swing)
    assert err1 / err2 > 2.5, (err1, err2)

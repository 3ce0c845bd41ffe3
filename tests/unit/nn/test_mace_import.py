"""MACE import against mace-torch itself: random MACE models (1 and 2 layers, ℓ = 1…3, ν = 1…3,
plain and residual first block, one and two heads, float64) are built, saved and exported in the
MACE environment (tests/mace_reference.py), imported here, and compared on a periodic triclinic
cell and an open molecule: energies to 1e-9 relative, forces and stress to 1e-9 (eV/Å, eV/Å³).

The MACE environment is a separate venv (mace-torch pins e3nn 0.4.x): $POLARMACE_MACE_PYTHON, or
.mace-venv/ in the repository (what .ci/run builds), or ../mace-venv next to it. Without one every
test here skips. The default run builds 6 small models (about a minute on a loaded core); the
whole 36-model grid (layers × ℓ × ν × first block) is marked slow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from contextlib import redirect_stderr
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from repo_paths import ROOT, TESTS

HELPER = TESTS / "mace_reference.py"
ELEMENTS = [1, 6, 8, 11, 17]


def _mace_python() -> Optional[str]:
    candidates = [os.environ.get("POLARMACE_MACE_PYTHON"), str(ROOT / ".mace-venv" / "bin" / "python"),
                  str(ROOT.parent / "mace-venv" / "bin" / "python")]
    for c in candidates:
        if c and Path(c).exists():
            ok = subprocess.run([c, "-c", "import mace.modules"], capture_output=True, timeout=300)
            if ok.returncode == 0:
                return c
    return None


MACE_PYTHON = _mace_python()
pytestmark = [pytest.mark.skipif(MACE_PYTHON is None, reason="no MACE environment (set POLARMACE_MACE_PYTHON "
                                 "to the python of a venv with mace-torch)"),
              pytest.mark.usefixtures("float64_default", "one_thread")]


def _structures(path: Path) -> None:
    import ase.io
    from ase.build import bulk, molecule

    rng = np.random.default_rng(1)
    a = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    a.rattle(0.1, seed=2)
    a.set_cell(a.cell.array @ (np.eye(3) + 0.03 * rng.normal(size=(3, 3))), scale_atoms=True)  # triclinic
    b = molecule("H2O")
    b += molecule("CH4")
    b.positions[3:] += [2.5, 0.3, 0.1]
    b.numbers[0] = 11
    b += molecule("HCl")
    b.positions[-2:] += [-2.0, 1.5, 0.5]
    ase.io.write(str(path), [a, b])


def _spec(name: str, layers: int, ell: int, nu: int, residual: bool, **extra) -> Dict:
    hidden = "8x0e+8x1o" if layers > 1 else "8x0e"
    spec = dict(name=name, atomic_numbers=ELEMENTS, hidden_irreps=hidden, max_ell=ell, correlation=nu,
                num_interactions=layers, residual_first=residual, r_max=4.0, radial_MLP=[16, 16],
                seed=len(name) + 7 * layers + 3 * ell + nu)
    spec.update(extra)
    return spec


DEFAULT = [
    _spec("l1_e1_n1_plain", 1, 1, 1, False),
    _spec("l1_e3_n3_res", 1, 3, 3, True),
    _spec("l2_e2_n2_plain", 2, 2, 2, False),
    _spec("l2_e3_n3_res_heads", 2, 3, 3, True, heads=["pt_head", "Default"], MLP_irreps="12x0e"),
    _spec("l2_e2_n3_mace_reduced", 2, 2, 3, False, model="MACE", use_reduced_cg=True,
          hidden_irreps="8x0e+8x1o+8x2e"),
    _spec("l2_e1_n2_res_r3", 2, 1, 2, True, radial_MLP=[12], avg_num_neighbors=3.1, num_bessel=6),
    _spec("l2_e2_n2_agnostic", 2, 2, 2, False, use_agnostic_product=True),
]
GRID = [_spec(f"grid_l{L}_e{e}_n{n}_{'res' if r else 'plain'}", L, e, n, r)
        for L in (1, 2) for e in (1, 2, 3) for n in (1, 2, 3) for r in (False, True)]
UNSUPPORTED = [
    _spec("zbl", 1, 1, 1, False, pair_repulsion=True),
    _spec("agnesi", 1, 1, 1, False, distance_transform="Agnesi"),
    _spec("gaussian", 1, 1, 1, False, radial_type="gaussian"),
]


def _build(tmp: Path, specs: List[Dict]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    xyz = tmp / "structures.xyz"
    _structures(xyz)
    (tmp / "specs.json").write_text(json.dumps(specs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([MACE_PYTHON, str(HELPER), str(tmp / "specs.json"), str(xyz), str(tmp)],
                          capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("mace"), DEFAULT + UNSUPPORTED)


def _graph(xyz: Path, r_max: float, index: Optional[int] = None):
    from polarmace.data.atoms import KeySpec, read_configurations
    from polarmace.data.graph import collate

    configs = read_configurations(str(xyz), KeySpec())
    if index is not None:
        configs = [configs[index]]
    return collate(configs, r_max)


def _compare(model, ref: Dict[str, np.ndarray], xyz: Path, suffix: str = "") -> None:
    g = _graph(xyz, model.r_max)
    out = model(g, compute_stress=True)
    e = out["energy"].detach().numpy()
    e_ref = ref["energy" + suffix]
    assert np.abs(e - e_ref).max() <= 1e-9 * np.abs(e_ref).max(), (e, e_ref)
    assert np.abs(out["forces"].detach().numpy() - ref["forces" + suffix]).max() <= 1e-9
    # stress of the periodic cell (open structures have none)
    assert np.abs(out["stress"].detach().numpy()[0] - ref["stress" + suffix][0]).max() <= 1e-9
    assert np.abs(ref["forces" + suffix]).max() > 1e-3  # a real test: the model is not flat


@pytest.mark.parametrize("spec", DEFAULT, ids=[s["name"] for s in DEFAULT])
def test_trunk_identical(built: Path, spec: Dict) -> None:
    from polarmace.nn.mace_import import import_mace

    ref = dict(np.load(built / f"{spec['name']}.ref.npz"))
    heads = spec.get("heads", ["Default"])
    for head in heads:
        model = import_mace(built / f"{spec['name']}.npz", head=head if len(heads) > 1 else None)
        m = model.config["model"]
        assert m["residual_first_block"] == spec["residual_first"]
        assert m["readout"] == ("linear" if spec["num_interactions"] == 1 else "mlp")
        _compare(model, ref, built / "structures.xyz", "" if len(heads) == 1 else f"_{head}")


def test_saved_model_and_cli(built: Path, tmp_path: Path) -> None:
    """polarmace-import-mace writes a model that PolarMACE.load rebuilds with the same numbers."""
    from polarmace.cli.import_mace import main
    from polarmace.model import PolarMACE

    name = "l2_e2_n2_plain"
    out = tmp_path / "m.pt"
    assert main([str(built / f"{name}.npz"), "-o", str(out)]) == 0
    _compare(PolarMACE.load(str(out)), dict(np.load(built / f"{name}.ref.npz")), built / "structures.xyz")


def test_les_keeps_the_trunk(built: Path) -> None:
    """With latent charges the short-range part is still MACE's; the electrostatics start small."""
    from polarmace.nn.mace_import import import_mace

    name = "l2_e3_n3_res_heads"
    ref = dict(np.load(built / f"{name}.ref.npz"))
    model = import_mace(built / f"{name}.npz", variant="les", head="Default")
    g = _graph(built / "structures.xyz", model.r_max)
    out = model(g, compute_stress=False)
    e_sr = (out["energy"] - out["electrostatic_energy"]).detach().numpy()
    assert np.abs(e_sr - ref["energy_Default"]).max() <= 1e-9 * np.abs(ref["energy_Default"]).max()
    q = out["charges"].detach().abs().max()
    assert 0 < float(q) < 1.0


def test_vector_heads_on_one_layer(built: Path) -> None:
    """A one-layer MACE model has scalar features only; dipole heads get fresh 1o features that do
    not change the short-range energy."""
    from polarmace.nn.mace_import import import_mace

    name = "l1_e3_n3_res"
    ref = dict(np.load(built / f"{name}.ref.npz"))
    model = import_mace(built / f"{name}.npz", variant="u")
    out = model(_graph(built / "structures.xyz", model.r_max), compute_forces=False)
    e_sr = (out["energy"] - out["electrostatic_energy"]).detach().numpy()
    assert np.abs(e_sr - ref["energy"]).max() <= 1e-9 * np.abs(ref["energy"]).max()


def test_element_subset(built: Path) -> None:
    """--elements Na Cl: a smaller model, same numbers on the NaCl cell."""
    from polarmace.nn.mace_import import import_mace

    name = "l2_e2_n2_plain"
    ref = dict(np.load(built / f"{name}.ref.npz"))
    model = import_mace(built / f"{name}.npz", elements=["Cl", "Na"])
    assert model.config["model"]["elements"] == ["Na", "Cl"]
    out = model(_graph(built / "structures.xyz", model.r_max, index=0), compute_stress=True)
    assert abs(float(out["energy"].detach()[0]) - ref["energy"][0]) <= 1e-9 * abs(ref["energy"][0])
    n0 = out["forces"].shape[0]
    assert np.abs(out["forces"].detach().numpy() - ref["forces"][:n0]).max() <= 1e-9
    assert np.abs(out["stress"].detach().numpy()[0] - ref["stress"][0]).max() <= 1e-9


def _cli_error(argv: List[str]) -> str:
    from polarmace.cli.import_mace import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    assert code == 2
    text = err.getvalue().strip()
    assert text.count("\n") == 0 and text.startswith("polarmace-import-mace: error: ")
    return text


def test_bad_input(built: Path, tmp_path: Path) -> None:
    heads = str(built / "l2_e3_n3_res_heads.npz")
    assert "choose one with --head" in _cli_error([heads, "-o", str(tmp_path / "x.pt")])
    assert "no head 'nope'" in _cli_error([heads, "-o", str(tmp_path / "x.pt"), "--head", "nope"])
    msg = _cli_error([str(built / "l2_e2_n2_plain.npz"), "-o", str(tmp_path / "x.pt"), "--elements", "Na", "Fe"])
    assert "Fe not in the MACE model" in msg
    for name, word in (("zbl", "ZBL"), ("agnesi", "distance transform"), ("gaussian", "radial basis")):
        assert word in _cli_error([str(built / f"{name}.npz"), "-o", str(tmp_path / "x.pt")])
    # truncated file
    blob = (built / "l1_e1_n1_plain.npz").read_bytes()
    (tmp_path / "torn.npz").write_bytes(blob[: len(blob) // 2])
    assert "cannot read the MACE export file" in _cli_error([str(tmp_path / "torn.npz"), "-o", str(tmp_path / "x.pt")])
    # a complete zip that lacks one tensor: refused before any weights are built
    src = zipfile.ZipFile(built / "l1_e1_n1_plain.npz")
    with zipfile.ZipFile(tmp_path / "part.npz", "w") as dst:
        for item in src.namelist():
            if item != "products.0.linear.weight.npy":
                dst.writestr(item, src.read(item))
    msg = _cli_error([str(tmp_path / "part.npz"), "-o", str(tmp_path / "x.pt")])
    assert "incomplete MACE export file" in msg and "products.0.linear.weight" in msg
    assert not (tmp_path / "x.pt").exists()
    # not an export at all
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    assert "not a MACE export file" in _cli_error([str(tmp_path / "plain.npz"), "-o", str(tmp_path / "x.pt")])


@pytest.mark.slow
def test_grid(tmp_path_factory) -> None:
    """1 and 2 layers × ℓ = 1, 2, 3 × ν = 1, 2, 3 × plain/residual first block."""
    from polarmace.nn.mace_import import import_mace

    built = _build(tmp_path_factory.mktemp("grid"), GRID)
    for spec in GRID:
        model = import_mace(built / f"{spec['name']}.npz")
        _compare(model, dict(np.load(built / f"{spec['name']}.ref.npz")), built / "structures.xyz")

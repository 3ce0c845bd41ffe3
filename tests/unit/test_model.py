"""PolarMACE end-to-end: equivariance of every output for every variant, finite differences,
locality, extensivity, TorchScript, save/load, and a tiny model overfitting real DFT data."""


import numpy as np
import pytest
import torch
from e3nn import o3

from polarmace.data.atoms import Configuration
from polarmace.data.graph import collate
from polarmace.model import PolarMACE, build_model
from repo_paths import DATASETS


pytestmark = pytest.mark.usefixtures("float64_default")

VARIANTS = ["sr", "les", "u", "uQ", "uiq", "uiu", "uQiqiu"]


def tiny_config(variant="uQiqiu", anisotropic=True, **model):
    cfg = {
        "model": {"elements": ["H", "C", "O"], "e0s": {"H": -0.5, "C": -1.0, "O": -2.0},
                  "avg_num_neighbors": 4.0, "hidden_irreps": "4x0e+4x1o", "max_ell": 2,
                  "correlation": 2, "num_interactions": 2, "radial_mlp": [8, 8], "r_max": 3.0},
        "long_range": {"variant": variant, "sigma": 1.0,
                       "polarizability": "anisotropic" if anisotropic else "isotropic",
                       # large readouts so that every electrostatic term is sizeable in the checks
                       "readout_scales": {"charges": 3.0, "dipoles": 3.0, "quadrupoles": 3.0,
                                          "kappa": 1.0, "alpha": 1.0}},
    }
    cfg["model"].update(model)
    return cfg


def make_model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(tiny_config(variant, **kw))
    # random (not near-zero) readouts so every term matters in the checks
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def configuration(positions, numbers, cell=None, pbc=(False,) * 3, charge=0.0):
    return Configuration(atomic_numbers=np.asarray(numbers), positions=np.asarray(positions, float),
                         cell=np.zeros((3, 3)) if cell is None else np.asarray(cell, float),
                         pbc=np.asarray(pbc, bool), total_charge=charge)


def random_molecule(n=7, seed=0, spread=2.2):
    rng = np.random.default_rng(seed)
    pts = []
    while len(pts) < n:
        p = rng.uniform(-spread, spread, 3)
        if all(np.linalg.norm(p - x) > 0.9 for x in pts):
            pts.append(p)
    numbers = rng.choice([1, 6, 8], size=n)
    return np.array(pts), numbers


def graph_of(confs, r_max=3.0):
    return collate(confs if isinstance(confs, list) else [confs], r_max, dtype=torch.float64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_and_reflection_equivariance(variant):
    model = make_model(variant)
    pos, z = random_molecule(seed=1)
    ref = model(graph_of(configuration(pos, z)), compute_bec=variant != "sr")
    torch.manual_seed(3)
    rot = o3.rand_matrix().to(torch.float64)
    for transform in (rot, -torch.eye(3, dtype=torch.float64), -rot):
        out = model(graph_of(configuration(pos @ transform.numpy().T, z)), compute_bec=variant != "sr")
        scale = float(ref["energy"].detach().abs().max())
        assert torch.allclose(out["energy"], ref["energy"], rtol=1e-10, atol=1e-10 * scale)
        assert torch.allclose(out["forces"], ref["forces"] @ transform.T, rtol=1e-9, atol=1e-10)
        if variant == "sr":
            continue
        # dipoles and polarization are polar vectors (1o): they follow the full O(3) matrix
        assert torch.allclose(out["dipoles"], ref["dipoles"] @ transform.T, atol=1e-10)
        assert torch.allclose(out["polarization"], ref["polarization"] @ transform.T, atol=1e-10)
        assert torch.allclose(out["charges"], ref["charges"], atol=1e-10)
        rank2 = lambda t: transform @ t @ transform.T  # noqa: E731  (2e: even under inversion)
        if "quadrupoles" in ref:
            assert torch.allclose(out["quadrupoles"], rank2(ref["quadrupoles"]), atol=1e-10)
        if "alpha" in ref:
            assert torch.allclose(out["alpha"], rank2(ref["alpha"]), atol=1e-10)
        assert torch.allclose(out["bec"], rank2(ref["bec"]), atol=1e-9)


@pytest.mark.parametrize("variant", ["sr", "uQiqiu"])
def test_translation_and_permutation_invariance(variant):
    model = make_model(variant)
    pos, z = random_molecule(seed=4)
    ref = model(graph_of(configuration(pos, z)))
    out = model(graph_of(configuration(pos + np.array([1.3, -0.7, 2.1]), z)))
    assert torch.allclose(out["energy"], ref["energy"], rtol=1e-11)
    perm = np.random.default_rng(5).permutation(len(z))
    out = model(graph_of(configuration(pos[perm], z[perm])))
    assert torch.allclose(out["energy"], ref["energy"], rtol=1e-11)
    assert torch.allclose(out["forces"], ref["forces"][perm], atol=1e-10)


def _numerical_forces(model, conf, h=1e-5):
    fd = np.zeros_like(conf.positions)
    for i in range(len(conf.positions)):
        for a in range(3):
            e = []
            for s in (h, -h):
                c = configuration(conf.positions.copy(), conf.atomic_numbers, conf.cell, conf.pbc)
                c.positions[i, a] += s
                e.append(model(graph_of(c), compute_forces=False)["energy"].item())
            fd[i, a] = -(e[0] - e[1]) / (2 * h)
    return torch.tensor(fd)


@pytest.mark.parametrize("boundary", ["open", "periodic", "slab"])
def test_forces_and_stress_equal_finite_differences(boundary):
    model = make_model("uQiqiu")
    pos, z = random_molecule(n=5, seed=6, spread=1.8)
    cell = {"open": None, "periodic": [[6.5, 0.3, 0.0], [0.2, 6.0, 0.4], [0.1, 0.3, 6.8]],
            "slab": [[6.5, 0.3, 0.0], [0.2, 6.0, 0.0], [0.0, 0.0, 18.0]]}[boundary]
    pbc = {"open": (False,) * 3, "periodic": (True,) * 3, "slab": (True, True, False)}[boundary]
    conf = configuration(pos + 3.0, z, cell, pbc)
    out = model(graph_of(conf), compute_stress=boundary != "open")
    assert torch.allclose(out["forces"], _numerical_forces(model, conf), rtol=1e-6, atol=1e-7)
    if boundary == "open":
        return
    cell = np.asarray(cell)
    h = 1e-5
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = []
            for s in (h, -h):
                eps = np.zeros((3, 3))
                eps[a, b] = eps[b, a] = s / 2 if a != b else s
                deform = np.eye(3) + eps
                c = configuration(conf.positions @ deform, z, cell @ deform, pbc)
                e.append(model(graph_of(c), compute_forces=False)["energy"].item())
            fd[a, b] = (e[0] - e[1]) / (2 * h)
    volume = abs(np.linalg.det(cell))
    assert torch.allclose(out["stress"][0], torch.tensor(fd) / volume, rtol=1e-6, atol=1e-8)


def test_locality_without_and_with_electrostatics():
    pos, z = random_molecule(n=6, seed=7, spread=1.8)
    # a far O–H pair (an isolated atom has zero node features, hence no latent charge)
    far = np.array([[20.0, 0.0, 0.0], [21.0, 0.3, 0.0]])
    farther = far + np.array([6.0, 0.0, 0.0])
    for variant in ("sr", "les"):
        model = make_model(variant)
        a = model(graph_of(configuration(np.vstack([pos, far]), list(z) + [8, 1])))
        b = model(graph_of(configuration(np.vstack([pos, farther]), list(z) + [8, 1])))
        # node energies of the cluster: unchanged (beyond num_interactions × r_max)
        assert torch.allclose(a["node_energy"], b["node_energy"], atol=1e-12)
        if variant == "sr":
            assert torch.allclose(a["energy"], b["energy"], atol=1e-12)
        else:
            # the total energy changes, by exactly the change of the electrostatic energy
            de = (b["energy"] - a["energy"]).item()
            assert abs(de) > 1e-5
            de_elec = (b["electrostatic_energy"] - a["electrostatic_energy"]).item()
            assert abs(de - de_elec) < 1e-10


@pytest.mark.parametrize("variant", ["les", "uQ"])
def test_size_extensivity(variant):
    """Two copies far apart: E(AB) − 2E(A) is the electrostatic interaction alone."""
    model = make_model(variant)
    pos, z = random_molecule(n=5, seed=8, spread=1.8)
    one = model(graph_of(configuration(pos, z)))
    shifted = pos + np.array([30.0, 0.0, 0.0])
    two = model(graph_of(configuration(np.vstack([pos, shifted]), list(z) * 2)))
    lhs = (two["energy"] - 2 * one["energy"]).item()
    rhs = (two["electrostatic_energy"] - 2 * one["electrostatic_energy"]).item()
    assert abs(lhs - rhs) < 1e-10 * abs(one["energy"].item())
    assert abs(rhs) > 0


def test_torchscript_equals_eager():
    model = make_model("uQiqiu")
    pos, z = random_molecule(seed=9)
    g = graph_of(configuration(pos, z))
    scripted = torch.jit.script(model)
    a = model(g)
    b = scripted(g)
    for key in ("energy", "forces", "charges", "dipoles"):
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-9), key


def test_save_and_load_rebuild_from_config(tmp_path):
    model = make_model("uiu", anisotropic=False)
    model.set_statistics(0.7, -0.1)
    path = tmp_path / "m.model"
    model.save(str(path))
    loaded = PolarMACE.load(str(path))
    pos, z = random_molecule(seed=10)
    g = graph_of(configuration(pos, z))
    assert torch.allclose(loaded(g)["energy"], model(g)["energy"], rtol=1e-12)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        PolarMACE.load(str(bad))


def test_model_file_keeps_no_paths_checks_its_format_and_reads_format_1(tmp_path):
    """The file stores model, long_range, the data conventions and the statistics, not the run
    config; a newer format is a clear error; a format-1 file (whole run config) is upgraded."""
    from polarmace.errors import ModelFileError

    cfg = tiny_config("les")
    cfg["data"] = {"train": "/somewhere/train.xyz", "default_total_charge": 1.0}
    cfg["training"] = {"lr": 0.005}
    torch.manual_seed(0)
    model = build_model(cfg, statistics={"scale": 0.7, "shift": -0.1, "elements": ["H", "C", "O"]})
    path = tmp_path / "m.model"
    model.save(str(path))
    blob = torch.load(path, weights_only=True)
    assert blob["format_version"] == 2 and set(blob["config"]) == {"model", "long_range", "data"}
    assert blob["config"]["data"] == {"keys": blob["config"]["data"]["keys"], "default_total_charge": 1.0}
    assert "/somewhere" not in repr(blob) and blob["statistics"]["scale"] == 0.7
    loaded = PolarMACE.load(str(path))
    assert loaded.statistics["shift"] == -0.1
    pos, z = random_molecule(seed=10)
    g = graph_of(configuration(pos, z))
    reference = model(g)["energy"]

    newer = dict(blob, format_version=99)
    torch.save(newer, tmp_path / "newer.model")
    with pytest.raises(ModelFileError, match=r"newer.model: model file format 99 is newer than this polarmace reads \(2\)"):
        PolarMACE.load(str(tmp_path / "newer.model"))
    old = {"format_version": 1, "config": cfg | {"model": blob["config"]["model"]},
           "state_dict": blob["state_dict"], "dtype": "float64", "versions": {}}
    torch.save(old, tmp_path / "v1.model")
    upgraded = PolarMACE.load(str(tmp_path / "v1.model"))
    assert "train" not in upgraded.config["data"] and upgraded.statistics["scale"] == pytest.approx(0.7)
    assert torch.equal(upgraded(g)["energy"], reference)


def test_unknown_element_is_a_clear_error():
    model = make_model("les")
    pos, _ = random_molecule(n=3, seed=11)
    with pytest.raises(ValueError, match="atomic number 14"):
        model(graph_of(configuration(pos, [1, 14, 8])))


def test_float32_model_runs_and_agrees():
    model = make_model("uQiqiu")
    pos, z = random_molecule(seed=12)
    e64 = model(graph_of(configuration(pos, z)))["energy"]
    model32 = model.float()
    g = collate([configuration(pos, z)], 3.0, dtype=torch.float32)
    e32 = model32(g)["energy"]
    assert e32.dtype == torch.float32
    assert abs(e32.item() - e64.item()) < 1e-4 * abs(e64.item())


@pytest.mark.slow
def test_tiny_model_overfits_five_real_configurations():
    path = DATASETS / "water_rpbe_d3" / "water16_rpbe_d3_20.extxyz"
    if not path.exists():
        pytest.skip("../shared/datasets not available")
    from polarmace.data.atoms import KeySpec, read_configurations
    confs = read_configurations(str(path), KeySpec())[:5]
    cfg = tiny_config("les")
    cfg["model"].update({"elements": ["H", "O"], "e0s": {"H": 0.0, "O": 0.0}, "r_max": 4.0,
                         "hidden_irreps": "16x0e+16x1o", "avg_num_neighbors": 12.0})
    torch.manual_seed(0)
    model = build_model(cfg)
    g = collate(confs, 4.0, dtype=torch.float64)
    mean_e = (g["energy"] / g["num_atoms"]).mean()
    model.set_statistics(1.0, float(mean_e))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(1500):
        opt.zero_grad()
        out = model(g)
        loss = ((out["forces"] - g["forces"]) ** 2).mean() + ((out["energy"] - g["energy"]) / g["num_atoms"]).pow(2).mean()
        loss.backward()
        opt.step()
    rmse = ((model(g)["forces"] - g["forces"]) ** 2).mean().sqrt().item() * 1000
    assert rmse < 5.0, f"force RMSE {rmse:.2f} meV/Å"

"""model.core_repulsion: the ZBL wall against the published formula, brute-force pair sums,
finite differences, exact zero beyond the cutoffs, TorchScript and the model file."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from ase.data import covalent_radii

from polarmace.config import Config, ConfigError
from polarmace.model import PolarMACE, build_model
from polarmace.nn.repulsion import ZBL_COEFFICIENTS, pair_cutoffs, quintic_switch, zbl_energy

pytestmark = pytest.mark.usefixtures("float64_default")

ELEMENTS = ["H", "O"]
Z = {"H": 1, "O": 8}
CELL = np.array([[5.0, 0.2, 0.0], [0.1, 5.5, 0.3], [0.0, 0.2, 6.0]])


def zbl_reference(r: float, za: int, zb: int) -> float:
    """ZBL (Ziegler, Biersack, Littmark 1985) from its published constants, in plain Python."""
    a = 0.8854 * 0.529177210903 / (za ** 0.23 + zb ** 0.23)
    phi = sum(c * math.exp(-d * r / a) for c, d in zip((0.18175, 0.50986, 0.28022, 0.02817),
                                                       (3.19980, 0.94229, 0.40290, 0.20162)))
    return 14.399645478425668 * za * zb / r * phi


def model_with(core_repulsion, seed=0):
    torch.manual_seed(seed)
    cfg = {"model": {"elements": ELEMENTS, "e0s": {"H": -0.5, "O": -2.0}, "avg_num_neighbors": 4.0,
                     "hidden_irreps": "4x0e+4x1o", "max_ell": 1, "correlation": 2, "num_interactions": 1,
                     "radial_mlp": [8], "r_max": 2.5, "core_repulsion": core_repulsion},
           "long_range": {"variant": "les", "sigma": 1.0}}
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def graph(positions, symbols, cell=CELL):
    from polarmace.data.atoms import Configuration
    from polarmace.data.graph import collate

    conf = Configuration(atomic_numbers=np.array([Z[s] for s in symbols]), positions=np.asarray(positions, float),
                         cell=cell, pbc=np.ones(3, bool), total_charge=0.0)
    return collate([conf], 2.5, dtype=torch.float64)


def brute_force_repulsion(positions, symbols, cutoffs, cell=CELL) -> float:
    """Σ_{i<j, images} ZBL·s over every periodic image within the cutoff, in plain numpy."""
    total = 0.0
    n = len(positions)
    for i, j in itertools.product(range(n), repeat=2):
        for shift in itertools.product(range(-1, 2), repeat=3):
            if i == j and shift == (0, 0, 0):
                continue
            r = float(np.linalg.norm(positions[j] + np.array(shift) @ cell - positions[i]))
            rc = cutoffs["-".join(sorted((symbols[i], symbols[j])))]
            if r < rc:
                t = r / rc
                total += 0.5 * zbl_reference(r, Z[symbols[i]], Z[symbols[j]]) * (1 - 10 * t**3 + 15 * t**4 - 6 * t**5)
    return total


def test_zbl_matches_the_published_formula_and_the_stored_constants():
    assert sum(ZBL_COEFFICIENTS) == pytest.approx(1.0, abs=1e-12)  # φ(0) = 1: bare Coulomb at r → 0
    r = torch.tensor([0.1, 0.33, 0.8, 1.5])
    for za, zb in ((1, 1), (1, 8), (8, 8)):
        got = zbl_energy(r, torch.tensor(float(za)), torch.tensor(float(zb)))
        assert got.tolist() == pytest.approx([zbl_reference(float(x), za, zb) for x in r], rel=1e-9)


def test_switch_is_one_at_zero_and_vanishes_with_slope_and_curvature_at_the_cutoff():
    t = torch.tensor([0.0, 1.0, 1.3], requires_grad=True)
    s = quintic_switch(t)
    (ds,) = torch.autograd.grad(s.sum(), t, create_graph=True)
    (d2s,) = torch.autograd.grad(ds.sum(), t)
    assert s.tolist() == [1.0, 0.0, 0.0]
    assert ds[1:].tolist() == [0.0, 0.0] and d2s[1].item() == pytest.approx(0.0, abs=1e-12)


def test_the_wall_adds_the_brute_force_pair_sum_and_forces_match_finite_differences():
    cutoffs = {"H-H": 1.2, "H-O": 1.0, "O-O": 2.0}
    bare, walled = model_with(None), model_with(cutoffs)
    walled.load_state_dict(bare.state_dict())  # same weights: the difference is the wall alone
    symbols = ["O", "H", "H", "O", "H", "H"]
    pos = np.array([[1.0, 1.0, 1.0], [1.6, 1.3, 1.1], [0.7, 1.5, 1.2],  # H–H 0.98 Å, O–H ~0.7 Å
                    [2.6, 2.9, 3.0], [3.3, 2.8, 3.4], [2.4, 3.7, 3.2]])
    g = graph(pos, symbols)
    e_bare, e_wall = bare(g)["energy"].item(), walled(g)["energy"].item()
    expected = brute_force_repulsion(pos, symbols, cutoffs)
    assert expected > 0.1  # the check below is not about a negligible term
    assert e_wall - e_bare == pytest.approx(expected, rel=1e-10)
    forces = walled(graph(pos, symbols))["forces"].detach().numpy()
    h = 1e-5
    for i, a in ((1, 0), (2, 1), (0, 2)):
        e = []
        for step in (h, -h):
            p = pos.copy()
            p[i, a] += step
            e.append(walled(graph(p, symbols), compute_forces=False)["energy"].item())
        assert forces[i, a] == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-6, abs=1e-7)


def test_nothing_changes_when_every_distance_is_beyond_the_cutoffs():
    cutoffs = {"H-H": 0.5, "H-O": 0.5, "O-O": 0.5}
    bare, walled = model_with(None), model_with(cutoffs)
    walled.load_state_dict(bare.state_dict())
    pos = np.array([[1.0, 1.0, 1.0], [1.9, 1.3, 1.1], [0.5, 1.8, 1.2]])
    g = graph(pos, ["O", "H", "H"])
    a, b = bare(g), walled(g)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])


def test_covalent_default_torchscript_and_the_model_file(tmp_path):
    cut = pair_cutoffs(ELEMENTS, "covalent")
    assert cut["H-O"] == pytest.approx(covalent_radii[1] + covalent_radii[8])
    assert pair_cutoffs(ELEMENTS, {"O-H": 0.7})["H-O"] == 0.7  # either order names the pair
    model = model_with({"O-H": 0.9})
    pos = np.array([[1.0, 1.0, 1.0], [1.5, 1.2, 1.1], [0.6, 1.5, 1.2]])
    g = graph(pos, ["O", "H", "H"])
    ref = model(g)
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(g)["energy"], ref["energy"], rtol=1e-12)
    path = tmp_path / "m.model"
    model.save(str(path))
    loaded = PolarMACE.load(str(path))
    assert loaded.config["model"]["core_repulsion"] == {"O-H": 0.9}
    assert torch.allclose(loaded(g)["energy"], ref["energy"], rtol=1e-12)


@pytest.mark.parametrize("spec, message", [({"O-X": 0.8}, "core_repulsion.O-X"),
                                           ({"OH": 0.8}, "core_repulsion.OH"),
                                           ({"O-H": 3.0}, "r_max")])
def test_a_bad_cutoff_is_a_config_error_that_names_it(spec, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"model": {"r_max": 2.5, "core_repulsion": spec}})

"""The learned-electrostatics report: per-element charges, one global sign, BEC R²."""

import numpy as np
import torch

from polarmace.data.atoms import Configuration
from polarmace.training.electrical import electrical_summary, format_electrical, r_squared
from repo_paths import ROOT


class RigidIonModel(torch.nn.Module):
    """A stand-in with known answers: charges s·q(Z) and BEC s·q(Z)·I (rigid ions), where the
    overall sign s is what an energy-only fit cannot decide."""

    use_charges = True
    r_max = 3.0

    def __init__(self, charges, sign):
        super().__init__()
        self.table = torch.zeros(119, dtype=torch.float64)
        for z, q in charges.items():
            self.table[z] = q
        self.sign = sign
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, graph, compute_forces=True, compute_bec=False):
        q = self.sign * self.table[graph["atomic_numbers"]]
        out = {"charges": q}
        if compute_bec:
            out["bec"] = q[:, None, None] * torch.eye(3, dtype=q.dtype)
        return out


def _frames(n, with_bec=True):
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        z = np.array([11, 17] * 4)
        q = np.where(z == 11, 1.0, -1.0)
        frames.append(Configuration(atomic_numbers=z, positions=rng.random((8, 3)) * 6.0,
                                    cell=np.eye(3) * 6.0, pbc=np.array([True] * 3),
                                    bec=(q[:, None, None] * np.eye(3)) if with_bec else None))
    return frames


def test_sign_is_fixed_once_and_charges_match_rigid_ions():
    for sign in (1.0, -1.0):
        model = RigidIonModel({11: 0.9, 17: -0.9}, sign)
        s = electrical_summary(model, _frames(5))
        assert s["sign"] == sign
        assert abs(s["elements"]["Na"]["charge_mean"] - 0.9) < 1e-12
        assert abs(s["elements"]["Cl"]["charge_mean"] + 0.9) < 1e-12
        assert abs(s["elements"]["Na"]["bec_iso_mean_ref"] - 1.0) < 1e-12
        assert abs(s["bec_mae"] - (0.1 * 3 / 9)) < 1e-12        # diagonal entries off by 0.1
        assert s["bec_r2"] < 1.0 and s["bec_r2"] > 0.9
        text = format_electrical(s)
        assert "Na" in text and "+0.900" in text and "BEC R²" in text


def test_without_reference_bec_the_report_says_so():
    s = electrical_summary(RigidIonModel({11: 0.5, 17: -0.5}, 1.0), _frames(3, with_bec=False))
    assert "bec_r2" not in s and s["sign"] == 1.0
    assert "cannot be checked" in format_electrical(s)


def test_no_report_for_a_model_without_charges():
    model = RigidIonModel({11: 1.0, 17: -1.0}, 1.0)
    model.use_charges = False
    assert electrical_summary(model, _frames(2)) is None


def test_r_squared_is_one_for_identity_and_zero_for_the_mean():
    ref = np.array([1.0, -1.0, 2.0, 0.0])
    assert r_squared(ref, ref) == 1.0
    assert abs(r_squared(np.full(4, ref.mean()), ref)) < 1e-15


def test_a_les_run_logs_and_writes_its_learned_charges(tmp_path):
    """End to end through polarmace-train on 12 frames of the shipped rigid-ion melt (which
    carries BEC = q·I): the run writes electrical.json and logs the per-element table."""

    import ase.io
    import json
    import yaml

    from polarmace.cli import train as train_cli

    melt = ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"
    frames = ase.io.read(melt, index=":12")
    data = tmp_path / "melt12.xyz"
    ase.io.write(data, frames)
    cfg = {"model": {"r_max": 4.0, "num_bessel": 4, "hidden_irreps": "4x0e+4x1o", "max_ell": 1,
                     "correlation": 1, "num_interactions": 1, "radial_mlp": [8], "dtype": "float64"},
           "long_range": {"variant": "les"},
           "data": {"train": str(data), "batch_size": 4, "valid_fraction": 0.2, "test_fraction": 0.2},
           "training": {"epochs": 1, "loss_weights": {"energy": 1.0, "forces": 10.0, "stress": 0.0, "bec": 0.0}},
           "output": {"directory": str(tmp_path / "run"), "name": "melt", "plots": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_cli.main([str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "electrical.json").read_text())
    assert set(summary["elements"]) == {"Na", "Cl"}
    assert summary["bec_structures"] > 0 and np.isfinite(summary["bec_r2"])
    assert abs(summary["elements"]["Na"]["bec_iso_mean_ref"] - 1.0) < 1e-9
    assert "learned electrostatics" in (tmp_path / "run" / "train.log").read_text()


class PolarizableIonModel(RigidIonModel):
    """Rigid ions with a known polarizability per element, in the model's units (e·Å²/V)."""

    def __init__(self, charges, alphas_A3, anisotropic=False):
        super().__init__(charges, 1.0)
        from polarmace.units import COULOMB
        self.alpha_table = torch.zeros(119, dtype=torch.float64)
        for z, a in alphas_A3.items():
            self.alpha_table[z] = a / COULOMB
        self.anisotropic = anisotropic

    def forward(self, graph, compute_forces=True, compute_bec=False):
        out = super().forward(graph, compute_forces, compute_bec)
        a = self.alpha_table[graph["atomic_numbers"]]
        out["alpha"] = a[:, None, None] * torch.eye(3, dtype=a.dtype) if self.anisotropic else a
        return out


def test_learned_polarizability_per_element_in_cubic_angstrom():
    for anisotropic in (False, True):
        model = PolarizableIonModel({11: 0.9, 17: -0.9}, {11: 0.3, 17: 3.0}, anisotropic)
        s = electrical_summary(model, _frames(4))
        assert abs(s["elements"]["Na"]["alpha_iso_mean"] - 0.3) < 1e-12
        assert abs(s["elements"]["Cl"]["alpha_iso_mean"] - 3.0) < 1e-12
        text = format_electrical(s)
        assert "alpha (Å³)" in text and "3.000" in text
    # a model without induced dipoles has no alpha column
    assert "alpha" not in format_electrical(electrical_summary(RigidIonModel({11: 1.0, 17: -1.0}, 1.0), _frames(2)))

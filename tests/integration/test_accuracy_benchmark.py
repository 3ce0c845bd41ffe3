"""benchmarks/accuracy.py: the sign-fixed BEC metrics, the acoustic sum rule, α = k_e ∂P/∂E_ext
against finite differences, and one tiny end-to-end run (table, JSON, CSV, plot, skip on rerun)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from repo_paths import ROOT

QUICKSTART = ROOT / "configs" / "data" / "quickstart_nacl.xyz"

pytestmark = pytest.mark.usefixtures("one_thread")


def _benchmark():
    spec = importlib.util.spec_from_file_location("polarmace_accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rigid_ion_frames(n_train: int, n_test: int):
    """Quickstart Na9Cl8+ frames; the test frames get the exact labels of the rigid-ion model
    that made them: BEC_i = q_i·I, dipole Σ q_i r_i, polarizability 0."""
    import ase
    import ase.io

    frames = ase.io.read(str(QUICKSTART), f":{n_train + n_test}")
    out = []
    for k, a in enumerate(frames):
        b = ase.Atoms(numbers=a.numbers, positions=a.positions, pbc=False)
        b.info["energy"] = a.get_potential_energy() if a.calc is not None else a.info["energy"]
        b.arrays["forces"] = a.get_forces() if a.calc is not None else a.arrays["forces"]
        b.info["total_charge"] = 1.0
        q = np.where(a.numbers == 11, 1.0, -1.0)
        if k >= n_train:
            b.info["dipole"] = (q[:, None] * a.positions).sum(0)
            b.arrays["BEC"] = np.repeat(np.eye(3).reshape(1, 9), len(q), 0) * q[:, None]
            b.info["polarizability"] = np.zeros(9)
        out.append(b)
    return out[:n_train], out[n_train:]


def test_global_sign_bec_metrics_and_sum_rule():
    acc = _benchmark()
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(5, 3, 3)) for _ in range(3)]
    flipped = [-z for z in ref]
    m = acc.bec_metrics(flipped, ref)
    assert m["sign"] == -1.0 and m["BEC_mae"] == 0.0 and m["BEC_r2"] == 1.0
    noisy = [z + 0.1 for z in ref]
    m = acc.bec_metrics(noisy, ref)
    assert m["sign"] == 1.0 and m["BEC_mae"] == pytest.approx(0.1)
    all_ref = np.concatenate([z.ravel() for z in ref])
    assert m["BEC_r2"] == pytest.approx(1 - 0.01 * all_ref.size / np.sum((all_ref - all_ref.mean()) ** 2))
    # a charged structure: the flip keeps Q, q_i -> Q/N - (q_i - Q/N); Z* and P follow
    pos = np.random.default_rng(1).normal(size=(4, 3))
    q_ref = np.array([1.0, -1.0, 1.0, 0.0])  # Q = 1
    q_flip = 2 * 1.0 / 4 - q_ref
    assert q_flip.sum() == pytest.approx(1.0)
    m = acc.bec_metrics([q_flip[:, None, None] * np.eye(3)], [q_ref[:, None, None] * np.eye(3)], [1.0])
    assert m["sign"] == -1.0 and m["BEC_mae"] == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(acc.sign_flipped_dipole(q_flip @ pos, pos, 1.0, -1.0), q_ref @ pos, atol=1e-12)
    # rigid ions: Z*_i = q_i I, Σ_i Z*_i = Q I exactly; a charge error δ on one of N atoms
    # gives √3|δ|/N per atom
    q = np.array([1.0, -1.0, 1.0])
    z = [q[:, None, None] * np.eye(3)]
    assert acc.asr_residual(z, [1.0]) == 0.0
    z_bad = [(q + np.array([0.2, 0.0, 0.0]))[:, None, None] * np.eye(3)]
    assert acc.asr_residual(z_bad, [1.0]) == pytest.approx(np.sqrt(3) * 0.2 / 3)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("variant", ["uiq", "uiu"])
def test_field_polarizability_matches_finite_differences(variant):
    from polarmace import build_model
    from polarmace.config import load_config
    from polarmace.data.atoms import configuration_from_atoms
    from polarmace.data.graph import collate
    from polarmace.units import COULOMB

    acc = _benchmark()
    _, test = _rigid_ion_frames(0, 2)
    configs = [configuration_from_atoms(a, default_total_charge=1.0) for a in test]
    cfg = load_config({"model": {"hidden_irreps": "8x0e", "max_ell": 1, "num_interactions": 1, "correlation": 1,
                                 "radial_mlp": [8], "elements": ["Na", "Cl"], "e0s": {"Na": 0.0, "Cl": 0.0},
                                 "avg_num_neighbors": 10.0},
                       "long_range": {"variant": variant, "readout_scales": {"kappa": 0.5, "alpha": 0.5}}}).to_dict()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    alpha = acc.field_polarizability(model, configs, batch_size=2)
    graph = collate(configs, 5.0)
    h, fd = 1e-4, np.zeros((2, 3, 3))
    for b in range(3):
        for s in (1.0, -1.0):
            field = torch.zeros(2, 3)
            field[:, b] = s * h
            p = model(dict(graph, external_field=field), compute_forces=False)["dipole"].detach().numpy()
            fd[:, :, b] += s * p / (2 * h) * COULOMB
    assert np.abs(alpha).max() > 1e-3  # a response, not zeros
    np.testing.assert_allclose(alpha, fd, rtol=1e-6, atol=1e-8)
    if variant == "uiu":  # one-step induced dipoles: ∂P/∂E = Σ α_i exactly
        np.testing.assert_allclose(acc.model_polarizability_output(model, configs, 2), alpha, rtol=1e-10)


def test_end_to_end_two_variants_then_skip(tmp_path, capsys):
    import ase.io
    import yaml

    acc = _benchmark()
    train, test = _rigid_ion_frames(24, 6)
    ase.io.write(str(tmp_path / "train.extxyz"), train, format="extxyz")
    ase.io.write(str(tmp_path / "test.extxyz"), test, format="extxyz")
    base = {"model": {"r_max": 4.0, "num_bessel": 4, "max_ell": 1, "hidden_irreps": "4x0e", "num_interactions": 1,
                      "correlation": 1, "radial_mlp": [4], "dtype": "float64"},
            "data": {"train": str(tmp_path / "train.extxyz"), "test": str(tmp_path / "test.extxyz"),
                     "valid_fraction": 0.25, "default_total_charge": 1.0, "batch_size": 6},
            "training": {"lr": 0.01, "ema_decay": 0.9, "loss_weights": {"energy": 1.0, "forces": 100.0}},
            "output": {"plots": False}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    argv = ["--config", str(tmp_path / "base.yaml"), "--variants", "sr", "uiq", "--epochs", "1",
            "--out", str(tmp_path / "out")]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert "E RMSE" in out and "BEC R2" in out
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    sr, uiq = summary["variants"]["sr"], summary["variants"]["uiq"]
    assert sr["status"] == uiq["status"] == "ok"
    assert sr["config"]["long_range"]["charges"] is False and uiq["config"]["long_range"]["induced_charges"] is True
    assert sr["config"]["model"] == uiq["config"]["model"] and sr["config"]["data"] == uiq["config"]["data"]
    assert "BEC_r2" not in sr["metrics"] and {"E_rmse", "F_rmse"} <= set(sr["metrics"])
    m = uiq["metrics"]
    assert {"BEC_mae", "BEC_r2", "sign", "D_mae", "D_mae_sign", "alpha_mae"} <= set(m)
    assert m["ASR"] < 1e-10  # Σ_i Z*_i = Q·I holds for any weights when Σ q = Q is enforced
    assert m["ASR_ref"] == 0.0 and m["num_test_structures"] == 6
    # what each variant learned, per element, from the trainer's summary of the test split
    na = uiq["electrical"]["elements"]["Na"]
    assert "electrical" not in sr and na["bec_iso_mean_ref"] == pytest.approx(1.0)
    line = next(x for x in summary["learned"] if x.strip().startswith("uiq:"))
    assert f"Na q {na['charge_mean']:+.3f}" in line and f"Na q {na['charge_mean']:+.3f}" in out
    assert (tmp_path / "out" / "accuracy.csv").read_text().startswith("variant,status")
    assert (tmp_path / "out" / "accuracy.png").is_file()
    assert acc.main(argv) == 0  # resumable: both are skipped
    assert capsys.readouterr().out.count("results exist") == 2


def test_worker_exits_when_the_benchmark_is_killed(tmp_path):
    """Killing accuracy.py must not leave its spawned trainings running (they would hold the
    run-directory lock and keep training): a worker watches its parent and exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text(
        "import importlib.util, os, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('acc', {str(ROOT / 'benchmarks' / 'accuracy.py')!r})\n"
        "acc = importlib.util.module_from_spec(spec); spec.loader.exec_module(acc)\n"
        "acc._exit_with_parent(os.getppid(), every=0.1)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         f"c = subprocess.Popen([sys.executable, {str(child)!r}], stdout=subprocess.PIPE, text=True)\n"
         "print(c.stdout.readline().strip(), flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 60
    stat = f"/proc/{worker}/stat"
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
            # an exited orphan that nobody has reaped yet (a container's PID 1) is a zombie: gone
            if os.path.exists(stat) and open(stat).read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker kept running after its parent was killed")

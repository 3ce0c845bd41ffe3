"""benchmarks/numerics_check.py: one model as saved and in float32, or at a looser electrostatics
accuracy, on the same structures."""

from __future__ import annotations

import numpy as np
import pytest
from repo_paths import load_benchmark
from toy_data import make_dataset, toy_config


def _script():
    return load_benchmark("numerics_check")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from polarmace.training.trainer import train

    root = tmp_path_factory.mktemp("f32")
    data = make_dataset(root / "cu_au.xyz", n=8)
    cfg = toy_config(data, root / "run", epochs=1)
    cfg["long_range"] = {"variant": "les"}
    cfg["output"]["plots"] = False
    train(cfg)
    return data, root / "run" / "toy.model"


def test_float32_differences_are_measured_against_the_model_error(trained, tmp_path):
    import ase.io
    from polarmace.cli.eval import evaluate_file, load_model

    data, model = trained
    mod = _script()
    frames = ase.io.read(str(data), ":")
    out = mod.compare(str(model), frames, bec=False)
    # the float64 error agrees with the project's own evaluation of the same file
    metrics, _, _ = evaluate_file(load_model(str(model)), str(data), batch_size=4)
    assert out["model_F_rmse_meV_A"] == pytest.approx(metrics["F_rmse"], rel=1e-6)
    # the second evaluation really ran in single precision: rounding differences exist, far
    # below the model error
    assert 0.0 < out["dF_rms_meV_A"] < 1e-2 * out["model_F_rmse_meV_A"]
    assert 0.0 < out["dE_rms_meV_atom"] and "dBEC_rms_e" not in out
    assert mod.compare(str(model), frames[:2], bec=True)["dBEC_rms_e"] > 0.0


def test_missing_file_exits_with_2(trained, tmp_path):
    _, model = trained
    assert _script().main(["--model", str(model), "--data", str(tmp_path / "nope.xyz")]) == 2


def test_a_looser_electrostatics_accuracy_moves_forces_by_about_that_fraction(trained):
    import ase.io

    data, model = trained
    frames = ase.io.read(str(data), ":4")
    mod = _script()
    # the trained les model's electrostatic forces are a small part of its forces, so the
    # change is bounded by the accuracy times the total force scale, and it is not zero
    forces = np.concatenate([a.get_forces().ravel() for a in frames]) * 1e3
    scale = float(np.sqrt(np.mean(forces ** 2)))
    loose = mod.compare(str(model), frames, bec=False, accuracy=1e-2)
    tight = mod.compare(str(model), frames, bec=False, accuracy=1e-8)
    assert 0.0 < loose["dF_rms_meV_A"] < 1e-1 * scale
    assert tight["dF_rms_meV_A"] < loose["dF_rms_meV_A"]
    assert loose["setting"] == "accuracy 0.01"

"""benchmarks/error_breakdown.py: errors per group of frames and the worst atoms' share."""

from __future__ import annotations

import numpy as np
import pytest
from repo_paths import load_benchmark
from toy_data import make_dataset, toy_config


def _script():
    return load_benchmark("error_breakdown")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import ase.io
    from polarmace.training.trainer import train

    root = tmp_path_factory.mktemp("breakdown")
    data = make_dataset(root / "cu_au.xyz", n=16)
    frames = ase.io.read(str(data), ":")
    for k, f in enumerate(frames):
        f.info["kind"] = "odd" if k % 2 else "even"
    ase.io.write(str(data), frames, format="extxyz")
    cfg = toy_config(data, root / "run", epochs=1)
    cfg["output"]["plots"] = False
    train(cfg)
    return root, data, frames, root / "run" / "toy.model"


def test_groups_match_the_frames_evaluated_alone(trained):
    import ase.io

    root, data, frames, model = trained
    mod = _script()
    out = mod.breakdown(model, data, ["kind"], batch_size=4)
    assert {k: v["frames"] for k, v in out["kind"].items()} == {"even": 8, "odd": 8}
    odd_file = root / "odd.xyz"
    ase.io.write(str(odd_file), [f for f in frames if f.info["kind"] == "odd"], format="extxyz")
    alone = mod.breakdown(model, odd_file, [], batch_size=4)["all"]
    for key in ("E_rmse", "F_rmse", "F_mae"):
        assert out["kind"]["odd"][key] == pytest.approx(alone[key], rel=1e-9)
    # the groups recombine to the whole set (equal atoms per frame: weights by frame count)
    comb = np.sqrt(np.mean([out["kind"][g]["F_rmse"] ** 2 for g in ("even", "odd")]))
    assert out["all"]["F_rmse"] == pytest.approx(comb, rel=1e-9)
    assert 0.05 <= out["worst_5pct_atoms_share_of_F_sq_error"] <= 1.0


def test_force_rmse_agrees_with_the_evaluation_metrics(trained):
    from polarmace.cli.eval import evaluate_file, load_model

    _, data, _, model = trained
    metrics, _, _ = evaluate_file(load_model(str(model)), str(data), batch_size=4)
    out = _script().breakdown(model, data, [], batch_size=4)
    assert out["all"]["F_rmse"] == pytest.approx(metrics["F_rmse"], rel=1e-9)


def test_missing_file_exits_2(tmp_path, capsys):
    assert _script().main(["--data", str(tmp_path / "none.xyz"), "--models", str(tmp_path / "m.model")]) == 2
    assert "not found" in capsys.readouterr().err

"""benchmarks/water_ir.py --reanalyse: peaks of a stored series, without MD."""

from __future__ import annotations

import json

import numpy as np
import pytest
from repo_paths import DATASETS, load_benchmark

from polarmace.units import SPEED_OF_LIGHT_CM_PER_FS

EXPERIMENTAL = DATASETS / "water_ir_experimental" / "water_IR_Segelstein_alpha_200-4500.csv"


def _series(path, kind: str, lines=(1650.0, 3400.0), dt=2.0, n=5000, **extra):
    """A stored series whose spectrum has lines at `lines` cm⁻¹ (damped oscillators driven
    by seeded noise, so the bands have a width and the ACF noise of an MD run)."""
    rng = np.random.default_rng(0)
    signal = np.zeros((n, 3))
    for nu in lines:
        omega = 2 * np.pi * nu * SPEED_OF_LIGHT_CM_PER_FS * dt
        damp = np.exp(-dt / 300.0)  # 300 fs lifetime: ~18 cm⁻¹ wide
        x = np.zeros((n, 3))
        for t in range(2, n):
            x[t] = 2 * damp * np.cos(omega) * x[t - 1] - damp ** 2 * x[t - 2] + rng.normal(size=3)
        signal += x / np.abs(x).max()
    np.savez(path, kind=kind, signal=signal, dt_fs=dt, volume=1000.0, temperature=np.full(n, 300.0),
             total_energy=np.zeros(n), n_atoms=192, source="synthetic", **extra)
    return path


@pytest.mark.skipif(not EXPERIMENTAL.exists(), reason="needs ../shared/datasets")
@pytest.mark.parametrize("kind", ["dpdt", "dipole"])
def test_reanalysed_series_finds_its_lines(tmp_path, kind):
    mod = load_benchmark("water_ir")
    series = _series(tmp_path / "series.npz", kind)
    out = tmp_path / "out"
    assert mod.main(["--reanalyse", str(series), "--out", str(out), "--block-ps", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    # the dipole route multiplies by ω², which moves a 18 cm⁻¹-wide line's maximum by < 1 cm⁻¹
    assert res["peaks"]["bend"]["model_cm-1"] == pytest.approx(1650.0, abs=3.0)
    assert res["peaks"]["stretch"]["model_cm-1"] == pytest.approx(3400.0, abs=3.0)
    assert res["block_ps"] == 1.0 and res["model"] == "synthetic"
    assert (out / "spectrum.csv").exists() and (out / "water_ir.png").exists()


@pytest.mark.skipif(not EXPERIMENTAL.exists(), reason="needs ../shared/datasets")
def test_reanalysis_takes_the_stored_run_temperature_unless_one_is_given(tmp_path):
    """The harmonic quantum correction depends on T: a re-analysis must use the run's own."""
    mod = load_benchmark("water_ir")
    stored = _series(tmp_path / "cold.npz", "dpdt", n=1500, target_temperature_K=250.0)
    old = _series(tmp_path / "old.npz", "dpdt", n=1500)  # written before the key existed

    def reanalyse(series, *extra):
        out = tmp_path / f"out_{series.stem}_{len(extra)}"
        assert mod.main(["--reanalyse", str(series), "--out", str(out), *extra]) == 0
        return json.loads((out / "results.json").read_text())["temperature_K"], \
            np.loadtxt(out / "spectrum.csv", delimiter=",")[:, 1]

    t_stored, spec_stored = reanalyse(stored)
    t_given, spec_given = reanalyse(stored, "--temperature", "300")
    t_old, spec_old = reanalyse(old)
    assert (t_stored, t_given, t_old) == (250.0, 300.0, 300.0)
    np.testing.assert_allclose(spec_given, spec_old)  # same signal, same T: same spectrum
    assert not np.allclose(spec_stored, spec_given)  # the temperature reaches the estimator


def test_missing_series_exits_with_2(tmp_path):
    assert load_benchmark("water_ir").main(["--reanalyse", str(tmp_path / "none.npz")]) == 2

"""NVE energy conservation of a trained PolarMACE model on periodic water (slow).

A tiny float64 `les` model is trained briefly on the 48-atom RPBE-D3 ice/water frames of
../shared/datasets/water_rpbe_d3 (the thermal ones: the water16 file is a rigid-molecule volume
scan around a relaxed box whose forces are all below 0.03 eV/Å, so a model trained on it alone lets
atoms pass through each other). Velocity-Verlet NVE at 0.25 fs for 0.25 ps from the first water16
frame at 300 K must drift less than the issue's 1e-4 eV/atom/ps. The same run with the forces
scaled by 1.1 (no longer −∇E of the reported energy) must fail that criterion, which shows the
check is sensitive to forces that are not the gradient of the energy. Uses the helpers of
benchmarks/nve_drift.py (the 2 ps figure of the issue comes from that script).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Dict

import pytest

from polarmace.calculator import PolarMACECalculator
from repo_paths import DATASETS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DATA = DATASETS / "water_rpbe_d3"
TARGET = 1e-4  # eV/atom/ps, the issue's bound


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("nve_drift", ROOT / "benchmarks" / "nve_drift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nve_drift"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()


class ScaledForces(PolarMACECalculator):
    """PolarMACECalculator whose forces are multiplied by `scale` (energy unchanged)."""

    def __init__(self, model: str, scale: float) -> None:
        super().__init__(model)
        self.scale = float(scale)

    def calculate(self, *args: Any, **kwargs: Any) -> None:
        super().calculate(*args, **kwargs)
        self.results["forces"] = self.results["forces"] * self.scale


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> str:
    import ase.io

    ice = DATA / "water_ice_rpbe_d3_20.extxyz"
    if not ice.exists() or not (DATA / bench.WATER16).exists():
        pytest.skip(f"reference data not found in {DATA}")
    out = tmp_path_factory.mktemp("nve")
    frames = [a for a in ase.io.read(str(ice), index=":") if len(a) == 48]
    data = out / "ice48.extxyz"
    ase.io.write(str(data), frames, format="extxyz")
    info = bench.train_model([data], out, minutes=0.0, seed=0, r_max=4.5, hidden="8x0e+8x1o",
                             epochs=25)
    return info["model"]


def nve_statistics(calc: Any, time_ps: float = 0.25) -> Dict[str, float]:
    import ase.io

    atoms = ase.io.read(str(DATA / bench.WATER16), index=0)
    atoms.calc = None
    bench.maxwell_boltzmann(atoms, 300.0, seed=0)
    traj, _, _ = bench.run_nve(atoms, calc, time_ps, 0.25, interval=4)
    return bench.drift_statistics(traj, len(atoms))


def test_nve_drift_of_trained_model_is_below_the_issue_target(trained_model):
    stats = nve_statistics(PolarMACECalculator(trained_model))
    # a drift measured on a collapsed or exploded box would mean nothing
    assert stats["min_distance_A"] > 0.7, stats
    assert stats["temperature_max_K"] < 600.0, stats
    assert abs(stats["drift_eV_per_atom_per_ps"]) < TARGET, stats


def test_forces_that_are_not_the_energy_gradient_fail_the_same_check(trained_model):
    stats = nve_statistics(ScaledForces(trained_model, 1.1))
    assert stats["min_distance_A"] > 0.7, stats
    assert abs(stats["drift_eV_per_atom_per_ps"]) > TARGET, stats

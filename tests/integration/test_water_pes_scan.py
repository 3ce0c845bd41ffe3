"""benchmarks/water_pes_scan.py: the deformations set exactly the coordinate they scan."""

from __future__ import annotations

import numpy as np
import pytest
from repo_paths import load_benchmark


def _box(seed=0, n=4):
    rng = np.random.default_rng(seed)
    pos = []
    for k in range(n):
        o = rng.uniform(0, 8, 3)
        h1 = o + 0.96 * np.array([1.0, 0.0, 0.0])
        h2 = o + 0.97 * np.array([np.cos(np.radians(104.5)), np.sin(np.radians(104.5)), 0.0])
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pos += [o, o + (h1 - o) @ rot.T, o + (h2 - o) @ rot.T]
    return np.array(pos)


@pytest.mark.parametrize("angle", [20.0, 60.0, 150.0])
def test_bend_sets_the_angle_keeps_the_bonds_and_the_bisector_and_moves_nothing_else(angle):
    scan = load_benchmark("water_pes_scan")
    pos = _box()
    out = scan.bent(pos, 2, angle)
    got_angle, got_bond = scan.geometry(out, 2)
    assert got_angle == pytest.approx(angle, abs=1e-9)
    assert got_bond == pytest.approx(np.linalg.norm(pos[7] - pos[6]), abs=1e-12)
    assert np.linalg.norm(out[8] - out[6]) == pytest.approx(np.linalg.norm(pos[8] - pos[6]), abs=1e-12)
    bis = lambda p: (p[7] - p[6]) / np.linalg.norm(p[7] - p[6]) + (p[8] - p[6]) / np.linalg.norm(p[8] - p[6])  # noqa: E731
    assert np.cross(bis(out), bis(pos)) == pytest.approx(np.zeros(3), abs=1e-9)
    others = [i for i in range(len(pos)) if i not in (7, 8)]
    assert np.array_equal(out[others], pos[others])


def test_stretch_sets_one_bond_along_its_direction():
    scan = load_benchmark("water_pes_scan")
    pos = _box(1)
    out = scan.stretched(pos, 1, 1.3)
    assert np.linalg.norm(out[4] - out[3]) == pytest.approx(1.3, abs=1e-12)
    assert np.cross(out[4] - out[3], pos[4] - pos[3]) == pytest.approx(np.zeros(3), abs=1e-12)
    assert scan.geometry(out, 1)[0] == pytest.approx(scan.geometry(pos, 1)[0], abs=1e-9)
    assert np.array_equal(np.delete(out, 4, axis=0), np.delete(pos, 4, axis=0))

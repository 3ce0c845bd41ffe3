"""GFN2-xTB NaCl reference data: the labels are physically consistent and generation resumes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tblite")

from ase.io import read  # noqa: E402

from polarmace.reference.xtb_nacl import (NaClPlan, XTBCalculator, cluster,  # noqa: E402
                                          field_response, generate_nacl)
from polarmace.units import COULOMB  # noqa: E402


@pytest.fixture(scope="module")
def na8():
    atoms = cluster("Na8Cl8")
    atoms.positions += np.random.default_rng(3).normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def _calc(atoms, **kw):
    calc = XTBCalculator(accuracy=0.01, **kw)
    calc.calculate(atoms.copy(), ["energy"])
    return calc.results


def test_cluster_compositions():
    a, b = cluster("Na9Cl8"), cluster("Na8Cl8")
    assert a.get_chemical_formula(mode="hill") == "Cl8Na9" and len(a) == 17
    assert b.get_chemical_formula(mode="hill") == "Cl8Na8" and len(b) == 16
    assert a.info["total_charge"] == b.info["total_charge"] == 1.0
    with pytest.raises(ValueError, match="Na7Cl8"):
        cluster("Na7Cl8")


def test_forces_are_energy_gradient(na8):
    f = _calc(na8)["forces"]
    h = 1e-4
    for i, c in [(0, 0), (5, 2), (11, 1)]:
        plus, minus = na8.copy(), na8.copy()
        plus.positions[i, c] += h
        minus.positions[i, c] -= h
        fd = -(_calc(plus)["energy"] - _calc(minus)["energy"]) / (2 * h)
        assert fd == pytest.approx(f[i, c], abs=2e-4)


def test_dipole_is_minus_field_derivative_of_energy(na8):
    mu = _calc(na8)["dipole"]
    h = 0.01  # V/Å
    for a in range(3):
        e = np.zeros(3)
        e[a] = h
        de = _calc(na8, field=e)["energy"] - _calc(na8, field=-e)["energy"]
        assert -de / (2 * h) == pytest.approx(mu[a], abs=2e-3)


def test_born_charges_two_routes_and_sum_rule(na8):
    """∂F/∂E (finite field) equals ∂μ/∂r (finite displacement); Σ Z* = Q·I."""
    bec, alpha = field_response(na8, charge=1.0)
    np.testing.assert_allclose(bec.sum(axis=0), np.eye(3), atol=1e-6)
    h = 1e-3
    for i in (0, 9):
        for b in range(3):
            plus, minus = na8.copy(), na8.copy()
            plus.positions[i, b] += h
            minus.positions[i, b] -= h
            dmu = (_calc(plus)["dipole"] - _calc(minus)["dipole"]) / (2 * h)
            np.testing.assert_allclose(bec[i, :, b], dmu, atol=3e-3)
    # The polarizability is a symmetric positive tensor; μ changes by α·E/k_e.
    np.testing.assert_allclose(alpha, alpha.T, atol=0.05 * np.abs(alpha).max())
    assert np.all(np.linalg.eigvalsh(0.5 * (alpha + alpha.T)) > 0)
    e = np.array([0.0, 0.0, 0.01])
    dmu = _calc(na8, field=e)["dipole"] - _calc(na8)["dipole"]
    np.testing.assert_allclose(dmu, alpha @ e / COULOMB, atol=2e-3 * np.abs(dmu).max() + 1e-5)


def test_dipole_origin_convention(na8):
    """μ(r + d) = μ(r) + Q d for the charged cluster (Σ q r about the coordinate origin)."""
    moved = na8.copy()
    moved.positions += np.array([1.0, -2.0, 0.5])
    diff = _calc(moved)["dipole"] - _calc(na8)["dipole"]
    np.testing.assert_allclose(diff, [1.0, -2.0, 0.5], atol=2e-3)


def test_generation_resumes_after_a_kill(tmp_path):
    plan = NaClPlan(md_chunks=2, frames_per_chunk=3, sample_every=2, equilibration_steps=2,
                    distorted_chunks=1, distorted_per_chunk=2, test_size=2)
    ref = generate_nacl(tmp_path, plan, progress=False)
    pool_ref = read(ref["pool"], ":")
    assert len(pool_ref) == plan.total
    # Simulate a run killed while writing the second MD chunk and before the later stages.
    chunks = tmp_path / "nacl_xtb_chunks"
    text = (chunks / "md_001.extxyz").read_text()
    (chunks / "md_001.extxyz").unlink()
    (chunks / "md_001.partial").write_text(text[: len(text) // 2])
    for name in ("distorted_000", "test_000"):
        (chunks / f"{name}.extxyz").unlink()
    paths = generate_nacl(tmp_path, plan, progress=False, workers=2)
    pool = read(paths["pool"], ":")
    assert len(pool) == len(pool_ref)
    for a, b in zip(pool, pool_ref):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-8)
    test, train = read(paths["test"], ":"), read(paths["train"], ":")
    assert len(test) == 2 and len(train) == plan.total - 2
    assert test[0].arrays["BEC"].shape == (len(test[0]), 9)
    assert np.asarray(test[0].info["polarizability"]).shape == (9,)
    np.testing.assert_allclose(test[0].arrays["BEC"].reshape(-1, 3, 3).sum(0), np.eye(3), atol=1e-6)

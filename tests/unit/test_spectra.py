"""Spectra: a harmonic diatomic with fixed charges (ASE VelocityVerlet) has its IR and Raman
peaks at ω0 = √(k/μ) within one frequency bin; estimator and correction checks; the CLI end to
end with a tiny model (CSV + PNG, experimental overlay)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.verlet import VelocityVerlet

from polarmace import spectra
from polarmace.units import SPEED_OF_LIGHT_CM_PER_FS
from repo_paths import DATASETS

K_SPRING = 10.0   # eV/Å²
D0 = 1.0          # Å
Q = 0.7           # e


pytestmark = pytest.mark.usefixtures("one_thread")


class Harmonic(Calculator):
    """E = ½ k (|r1 − r0| − d0)²."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions[1] - self.atoms.positions[0]
        r = np.linalg.norm(d)
        f = -K_SPRING * (r - D0) * d / r
        self.results = {"energy": 0.5 * K_SPRING * (r - D0) ** 2, "forces": np.array([-f, f])}


def harmonic_trajectory(dt_fs=0.25, steps=8000, every=2):
    atoms = Atoms("HO", positions=[[0, 0, 0], [D0 + 0.05, 0.02, 0.0]])
    atoms.calc = Harmonic()
    atoms.set_velocities(np.array([[0.01, 0.003, 0.0], [-0.01 / 16, -0.003 / 16, 0.0]]) / units.fs)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    pos, vel = [], []
    for _ in range(steps // every):
        dyn.run(every)
        pos.append(atoms.positions.copy())
        vel.append(atoms.get_velocities() * units.fs)          # Å/fs
    masses = atoms.get_masses()
    mu = masses[0] * masses[1] / masses.sum()                  # amu
    # ω0 in rad/fs: sqrt(k/μ) in ASE units (time unit Å·sqrt(amu/eV)) divided by units.fs ratio
    omega0 = np.sqrt(K_SPRING / mu) * units.fs
    nu0 = omega0 / (2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS)
    return np.array(pos), np.array(vel), dt_fs * every, nu0


@pytest.fixture(scope="module")
def diatomic():
    return harmonic_trajectory()


def test_ir_peak_of_harmonic_diatomic_at_sqrt_k_over_mu(diatomic):
    pos, vel, dt, nu0 = diatomic
    charges = np.array([Q, -Q])
    bec = np.broadcast_to(charges[None, :, None, None] * np.eye(3), (len(pos), 2, 3, 3))
    dpdt = spectra.dipole_derivative(bec, vel)
    spec = spectra.ir_spectrum(dpdt, dt, block_length=2000)
    assert 1500 < nu0 < 1900
    assert abs(spec.peak(200, 5000) - nu0) <= spec.resolution, (spec.peak(200, 5000), nu0, spec.resolution)
    # the dipole route (ω² S_P) gives the same peak
    dipoles = np.einsum("n,tna->ta", charges, pos)
    spec_p = spectra.ir_spectrum_from_dipoles(dipoles, dt, block_length=2000)
    assert abs(spec_p.peak(200, 5000) - nu0) <= spec_p.resolution
    # free rotation/translation carries no IR weight at the vibration: the peak dominates
    assert spec.intensity[spec.frequency > 300].max() > 20 * spec.intensity[spec.frequency > 2 * nu0].max()


def _bond_polarizability(pos):
    d = pos[:, 1] - pos[:, 0]
    r = np.linalg.norm(d, axis=1)
    u = d / r[:, None]
    # α = (a0 + a1 (r − d0)) I + (b0 + b1 (r − d0)) (u uᵀ − I/3): both parts modulated at ω0
    return ((2.0 + 0.5 * (r - D0))[:, None, None] * np.eye(3)
            + (0.8 + 0.3 * (r - D0))[:, None, None] * (np.einsum("ta,tb->tab", u, u) - np.eye(3) / 3))


def test_raman_peaks_of_bond_polarizability(diatomic):
    pos, _, dt, nu0 = diatomic
    # the MD diatomic also rotates: the isotropic part is rotation-invariant and peaks at ω0
    iso, aniso = spectra.raman_spectra(_bond_polarizability(pos), dt, block_length=2000)
    assert abs(iso.peak(200, 5000) - nu0) <= iso.resolution
    # (its anisotropic band is split into ω0 ± 2ω_rot branches). A non-rotating oscillator,
    # r(t) = d0 + A cos ω0 t along x (exact solution), has both parts at ω0:
    omega0 = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * nu0
    t = np.arange(4000) * dt
    pos_exact = np.zeros((len(t), 2, 3))
    pos_exact[:, 1, 0] = D0 + 0.05 * np.cos(omega0 * t)
    iso, aniso = spectra.raman_spectra(_bond_polarizability(pos_exact), dt, block_length=2000)
    assert abs(iso.peak(200, 5000) - nu0) <= iso.resolution
    assert abs(aniso.peak(200, 5000) - nu0) <= aniso.resolution


def test_power_spectrum_of_a_sine_and_parseval():
    dt, nu = 0.5, 1000.0
    t = np.arange(20000) * dt
    x = np.sin(2 * np.pi * nu * SPEED_OF_LIGHT_CM_PER_FS * t)
    spec = spectra.power_spectrum(x, dt, block_length=4000, window="none")
    assert abs(spec.peak() - nu) <= spec.resolution
    # ∫ S(ν) dω/2π = C(0) = ⟨x²⟩ = 1/2 (one-sided grid: factor 2 for negative frequencies)
    domega = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * spec.resolution
    integral = (2 * spec.intensity.sum() - spec.intensity[0] - spec.intensity[-1]) * domega / (2 * np.pi)
    assert abs(integral - 0.5) < 1e-3


def test_autocorrelation_equals_direct_sum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    acf = spectra.autocorrelation(x, 50)
    direct = [np.mean(np.sum(x[: 200 - k] * x[k:], axis=1)) for k in range(50)]
    np.testing.assert_allclose(acf, direct, rtol=1e-10, atol=1e-12)


def test_quantum_corrections():
    nu = np.array([0.0, 100.0, 3400.0])
    h = spectra.quantum_correction(nu, 300.0, "harmonic")
    s = spectra.quantum_correction(nu, 300.0, "standard")
    x = spectra.hbar_ev_fs() * 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * nu[2] / (8.617333262e-5 * 300.0)
    assert np.isclose(x, 16.3, rtol=0.01)        # ħω/kT of the O–H stretch at 300 K
    assert np.isclose(h[0], 1.0) and np.isclose(h[2], x / (1 - np.exp(-x)))
    assert np.isclose(s[0], 1.0) and np.isclose(s[2], 2 / (1 + np.exp(-x)))
    with pytest.raises(ValueError):
        spectra.quantum_correction(nu, None, "harmonic")


def test_ir_absorption_units_for_fixed_charge_oscillator(diatomic):
    """Units chain of α n = S_Ṗ/(6 ε0 V c kT): by Wiener–Khinchin ∫ S_Ṗ dω = 2π ⟨|Ṗ|²⟩, so
    ∫ α n dω must equal 2π ⟨|Ṗ|²⟩/(6 ε0 V c kT), computed here independently in cm⁻¹·rad/fs."""
    pos, vel, dt, nu0 = diatomic
    charges = np.array([Q, -Q])
    dpdt = np.einsum("n,tna->ta", charges, vel)
    volume, temperature = 1000.0, 300.0
    # one block spanning the run: C(0) is exactly the run's ⟨|Ṗ − mean|²⟩
    spec = spectra.ir_spectrum(dpdt, dt, block_length=len(dpdt), window="none",
                               temperature=temperature, volume=volume)
    domega = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * spec.resolution      # rad/fs
    # discrete Wiener–Khinchin on the one-sided grid k = 0..M (k = 0 and M counted once)
    integral = (2 * spec.intensity.sum() - spec.intensity[0] - spec.intensity[-1]) * domega
    c_ang_fs = SPEED_OF_LIGHT_CM_PER_FS * 1e8
    from polarmace.units import EPSILON0, KB
    expected = 2 * np.pi * np.mean(np.sum((dpdt - dpdt.mean(0)) ** 2, 1)) / (
        6 * EPSILON0 * volume * c_ang_fs * KB * temperature) * 1e8
    assert abs(integral / expected - 1) < 1e-6


# --------------------------------------------------------------------------- CLI
def test_spectra_cli_ir_and_raman_with_model(tmp_path):
    import ase.io

    from polarmace.calculator import PolarMACECalculator
    from polarmace.cli.spectra import main
    from polarmace.model import build_model

    cfg = {"model": {"elements": ["H", "O"], "e0s": {"H": -0.5, "O": -2.0}, "avg_num_neighbors": 2.0,
                     "hidden_irreps": "4x0e+4x1o", "max_ell": 2, "correlation": 2,
                     "num_interactions": 2, "radial_mlp": [8, 8], "r_max": 3.0},
           "long_range": {"variant": "uiu", "polarizability": "anisotropic"}}
    torch.manual_seed(0)
    model = build_model(cfg)
    model.save(str(tmp_path / "m.pt"))
    atoms = Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.calc = PolarMACECalculator(model)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    rng = np.random.default_rng(0)
    atoms.set_velocities(0.005 * rng.standard_normal((3, 3)) / units.fs)
    frames = []
    for step in range(40):
        dyn.run(1)
        frame = atoms.copy()
        frame.set_velocities(atoms.get_velocities())
        frame.info["time"] = (step + 1) * 0.5
        frames.append(frame)
    traj = tmp_path / "traj.extxyz"
    ase.io.write(str(traj), frames)
    exp = DATASETS / "water_ir_experimental" / "water_IR_Segelstein_alpha_200-4500.csv"
    args = ["ir", str(traj), "--model", str(tmp_path / "m.pt"), "-o", str(tmp_path / "ir"),
            "--block-length", "20", "--eps-infty", "1.78"]
    if exp.exists():
        args += ["--experimental", str(exp), "--experimental-columns", "0,4"]
    assert main(args) == 0
    rows = list(csv.reader(open(tmp_path / "ir.csv")))
    assert rows[0][0].startswith("wavenumber") and len(rows) == 1 + 21
    assert (tmp_path / "ir.png").stat().st_size > 1000
    assert main(["raman", str(traj), "--model", str(tmp_path / "m.pt"), "-o", str(tmp_path / "raman"),
                 "--block-length", "20"]) == 0
    rows = list(csv.reader(open(tmp_path / "raman.csv")))
    assert rows[0] == ["wavenumber_cm-1", "isotropic", "anisotropic"]
    assert (tmp_path / "raman.png").exists()


def test_md_cli_writes_frames_that_spectra_cli_reads_without_model(tmp_path):
    import ase.io

    from polarmace.cli.md import main as md_main
    from polarmace.cli.spectra import main as spectra_main
    from polarmace.model import build_model

    cfg = {"model": {"elements": ["H", "O"], "e0s": {"H": -0.5, "O": -2.0}, "avg_num_neighbors": 2.0,
                     "hidden_irreps": "4x0e+4x1o", "max_ell": 2, "correlation": 2,
                     "num_interactions": 2, "radial_mlp": [8, 8], "r_max": 3.0},
           "long_range": {"variant": "uiu", "polarizability": "isotropic"}}
    torch.manual_seed(1)
    build_model(cfg).save(str(tmp_path / "m.pt"))
    ase.io.write(str(tmp_path / "start.xyz"), Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    traj = tmp_path / "md.extxyz"
    assert md_main([str(tmp_path / "start.xyz"), "--model", str(tmp_path / "m.pt"), "-o", str(traj),
                    "--steps", "24", "--timestep", "0.5", "--interval", "2", "--bec",
                    "--ensemble", "nvt", "--temperature", "300"]) == 0
    frames = ase.io.read(str(traj), index=":")
    assert len(frames) == 13                                  # steps 0, 2, ..., 24
    assert [f.info["time"] for f in frames[:3]] == [0.0, 1.0, 2.0]
    assert frames[-1].arrays["bec"].shape == (3, 9) and frames[-1].get_dipole_moment().shape == (3,)
    assert np.any(frames[-1].get_velocities() != 0)
    # the per-atom "bec" and momenta in the file: Σ Z*·v without a model
    assert spectra_main(["ir", str(traj), "-o", str(tmp_path / "ir"), "--block-length", "6"]) == 0
    rows = list(csv.reader(open(tmp_path / "ir.csv")))
    assert len(rows) == 1 + 7 and all(np.isfinite(float(v)) for v in rows[1])


def test_peak_is_refined_between_grid_points():
    """A line between two grid frequencies: the grid maximum is off by ~0.4 spacing, the
    parabolic vertex (what Spectrum.peak returns) by well under 0.1."""
    dt, m = 0.5, 1000
    res = 1.0 / (2 * m * dt * SPEED_OF_LIGHT_CM_PER_FS)
    nu = 40.4 * res
    t = np.arange(40000) * dt
    x = np.sin(2 * np.pi * nu * SPEED_OF_LIGHT_CM_PER_FS * t)
    spec = spectra.power_spectrum(x, dt, block_length=m)
    assert spec.resolution == pytest.approx(res)
    grid = spec.frequency[np.argmax(spec.intensity)]
    assert abs(grid - nu) > 0.3 * res
    assert abs(spec.peak() - nu) < 0.1 * res
    # at the window's edge the grid point is returned (no neighbour to fit)
    edge = spec.peak(nu + 0.45 * res, nu + 5 * res)
    assert edge == pytest.approx(spec.frequency[spec.frequency >= nu + 0.45 * res][0])


def test_band_centroid_is_the_weighted_mean_and_ignores_negative_noise():
    from polarmace.spectra import Spectrum

    nu = np.arange(0.0, 5000.0, 10.0)
    # two lines of weights 1 and 3 at 3300 and 3500 cm⁻¹: centroid 3450; a negative dip is noise
    y = np.zeros_like(nu)
    y[nu == 3300.0], y[nu == 3500.0], y[nu == 3400.0] = 1.0, 3.0, -5.0
    spec = Spectrum(nu, y)
    assert spec.band_centroid(2800.0, 4000.0) == pytest.approx(3450.0)
    assert spec.peak(2800.0, 4000.0) == pytest.approx(3500.0, abs=10.0)
    with pytest.raises(ValueError, match="no positive intensity"):
        spec.band_centroid(1000.0, 2000.0)

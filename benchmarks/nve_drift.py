"""NVE energy drift of a small periodic water box with a trained PolarMACE model.

Trains (unless --model is given) a small latent-charge (`les`) model in float64 on the RPBE-D3
water frames of ../shared/datasets/water_rpbe_d3/*.extxyz (48- and 192-atom periodic boxes) for
about --train-minutes, then runs velocity-Verlet NVE with PolarMACECalculator from the first
48-atom water16 frame with Maxwell–Boltzmann velocities at --temperature (zero net momentum) for
--time-ps at --dt-fs, and records the total energy every --interval steps.

    python benchmarks/nve_drift.py --time-ps 2 --dt-fs 0.25 --train-minutes 6 --out runs/nve_drift
    python benchmarks/nve_drift.py --model runs/nve_drift/train/nve_water.model --time-ps 2

Printed and written to OUT/nve_drift.json: MD steps/s, the drift (slope of a least-squares line
through E_tot(t), eV/atom/ps), the RMS fluctuation of E_tot about its mean and about that line
(eV/atom), max |E_tot − E_tot(0)| (eV/atom), the temperature range (K), the smallest interatomic
distance seen (Å; a collapse or fly-apart check). OUT/nve_drift.png plots E_tot, E_pot, E_kin
(eV, relative to their t = 0 values) against time (ps). The issue's target: |drift| < 1e-4
eV/atom/ps for 2 ps at 0.25 fs in float64.

Training length: one epoch is timed in a throwaway run (OUT/calibrate), then a fresh run
(OUT/train) gets as many epochs as fit in the rest of --train-minutes (both folders are replaced
when they exist); the saved model OUT/train/nve_water.model holds the best (EMA) weights.

The run is flagged unstable (and fails the target whatever its drift) when two atoms come closer
than 0.5 Å or the temperature exceeds three times --temperature: a drift measured on a collapsed
or exploded box says nothing about the integrator or the forces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "datasets" / "water_rpbe_d3"
WATER16 = "water16_rpbe_d3_20.extxyz"


# ======================================================================== training
def model_config(data_file: Path, run_dir: Path, epochs: int, seed: int,
                 r_max: float = 4.5, hidden: str = "16x0e+16x1o") -> Dict[str, Any]:
    """A small float64 `les` model config for the water frames (energy, forces)."""
    return {
        "model": {"r_max": r_max, "num_bessel": 8, "max_ell": 2, "hidden_irreps": hidden,
                  "num_interactions": 1, "correlation": 2, "radial_mlp": [32, 32],
                  "e0s": "least_squares", "dtype": "float64"},
        "long_range": {"variant": "les", "sigma": 1.0},
        "data": {"train": str(data_file), "valid_fraction": 0.1, "test_fraction": 0.0,
                 "batch_size": 2, "seed": seed},
        "training": {"epochs": epochs, "lr": 0.01, "scheduler": "plateau", "scheduler_patience": 10,
                     "loss_weights": {"energy": 1.0, "forces": 100.0}, "ema_decay": 0.99,
                     "stage_two": {"start_fraction": 0.7, "energy_weight": 100.0,
                                   "forces_weight": 100.0, "lr": 0.002},
                     "seed": seed},
        "output": {"directory": str(run_dir), "name": "nve_water", "plots": False},
    }


def combined_data(files: Sequence[Path], out: Path) -> Path:
    """All frames of `files` in one extxyz file under `out` (the trainer reads one file)."""
    import ase.io

    if not files:
        raise SystemExit("no training data files")
    frames = [a for f in files for a in ase.io.read(str(f), index=":")]
    path = out / "water_rpbe_d3_all.extxyz"
    ase.io.write(str(path), frames, format="extxyz")
    return path


def train_model(files: Sequence[Path], out: Path, minutes: float, seed: int, r_max: float = 4.5,
                hidden: str = "16x0e+16x1o", max_epochs: int = 2000,
                epochs: Optional[int] = None) -> Dict[str, Any]:
    """Train on the frames of `files` for about `minutes` wall time (or exactly `epochs` epochs
    when given); returns model path, epochs, training seconds and final errors."""
    from polarmace.training.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    data_file = combined_data(files, out)
    calib_dir, run_dir = out / "calibrate", out / "train"
    for d in (calib_dir, run_dir):  # this script's own output folders from an earlier run
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    if epochs is None:
        first = train(model_config(data_file, calib_dir, 1, seed, r_max, hidden))
        per_epoch = max(float(first.history[-1]["time_s"]), 1e-3)
        overhead = time.perf_counter() - t0 - per_epoch  # reading, statistics, final evaluation
        remaining = minutes * 60.0 - (time.perf_counter() - t0) - overhead
        epochs = int(min(max_epochs, max(2, remaining // per_epoch)))
        print(f"calibration epoch {per_epoch:.1f} s -> training {epochs} epochs", flush=True)
    result = train(model_config(data_file, run_dir, epochs, seed, r_max, hidden))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {"model": str(result.model_path), "epochs": epochs, "train_s": time.perf_counter() - t0,
            "final_metrics": final}


# ============================================================================== MD
def maxwell_boltzmann(atoms: Any, temperature_K: float, seed: int) -> None:
    """Maxwell–Boltzmann momenta at `temperature_K` with zero total momentum (ASE units)."""
    from polarmace.units import KB

    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * KB * temperature_K)
    momenta -= masses * momenta.sum(axis=0) / masses.sum()
    atoms.set_momenta(momenta)


def temperature_of(ekin: float, n_atoms: int) -> float:
    """Kinetic temperature (K) with 3N − 3 degrees of freedom (momentum removed)."""
    from polarmace.units import KB

    return 2.0 * ekin / (max(3 * n_atoms - 3, 1) * KB)


def min_distance(atoms: Any) -> float:
    """Smallest interatomic distance (Å), minimum image."""
    d = atoms.get_all_distances(mic=True)
    return float(d[np.triu_indices(len(atoms), 1)].min())


@dataclass
class Trajectory:
    """Energies (eV) sampled along an NVE run; time in ps."""
    time_ps: List[float] = field(default_factory=list)
    epot: List[float] = field(default_factory=list)
    ekin: List[float] = field(default_factory=list)
    min_dist: List[float] = field(default_factory=list)


def run_nve(atoms: Any, calc: Any, time_ps: float, dt_fs: float, interval: int,
            progress: bool = False) -> "tuple[Trajectory, float, int]":
    """Velocity-Verlet NVE; returns (trajectory, wall seconds of the MD, steps)."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms.calc = calc
    steps = int(round(time_ps * 1000.0 / dt_fs))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    traj = Trajectory()

    def record() -> None:
        traj.time_ps.append(dyn.nsteps * dt_fs / 1000.0)
        traj.epot.append(float(atoms.get_potential_energy()))
        traj.ekin.append(float(atoms.get_kinetic_energy()))
        traj.min_dist.append(min_distance(atoms))
        if progress and dyn.nsteps % max(interval * 200, 1) == 0:
            e = traj.epot[-1] + traj.ekin[-1]
            print(f"  step {dyn.nsteps:6d}  t {traj.time_ps[-1]:.3f} ps  E_tot {e:.6f} eV  "
                  f"T {temperature_of(traj.ekin[-1], len(atoms)):.0f} K", flush=True)

    dyn.attach(record, interval=interval)
    start = time.perf_counter()
    dyn.run(steps)
    return traj, time.perf_counter() - start, steps


def drift_statistics(traj: Trajectory, n_atoms: int) -> Dict[str, float]:
    """Drift (eV/atom/ps, slope of the least-squares line), RMS fluctuation about the mean and
    about the line, max |E − E0| (eV/atom), temperature range (K), smallest distance (Å)."""
    t = np.asarray(traj.time_ps)
    etot = np.asarray(traj.epot) + np.asarray(traj.ekin)
    slope, intercept = np.polyfit(t, etot, 1)
    resid = etot - (slope * t + intercept)
    temps = np.array([temperature_of(k, n_atoms) for k in traj.ekin])
    return {
        "drift_eV_per_atom_per_ps": float(slope / n_atoms),
        "rms_fluctuation_eV_per_atom": float(np.std(etot) / n_atoms),
        "rms_about_fit_eV_per_atom": float(np.sqrt(np.mean(resid ** 2)) / n_atoms),
        "max_abs_dE_eV_per_atom": float(np.max(np.abs(etot - etot[0])) / n_atoms),
        "temperature_min_K": float(temps.min()),
        "temperature_max_K": float(temps.max()),
        "temperature_mean_K": float(temps.mean()),
        "min_distance_A": float(np.min(traj.min_dist)),
        "samples": int(len(t)),
    }


def plot(traj: Trajectory, stats: Dict[str, float], n_atoms: int, path: Path, title: str) -> None:
    """E_tot, E_pot, E_kin relative to t = 0 (eV) against time (ps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(traj.time_ps)
    epot, ekin = np.asarray(traj.epot), np.asarray(traj.ekin)
    etot = epot + ekin
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(t, epot - epot[0], label="E_pot − E_pot(0)", lw=0.8)
    ax1.plot(t, ekin - ekin[0], label="E_kin − E_kin(0)", lw=0.8)
    ax1.plot(t, etot - etot[0], label="E_tot − E_tot(0)", lw=1.2, color="k")
    ax1.set_ylabel("energy (eV)")
    ax1.legend(loc="best", fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax2.plot(t, (etot - etot[0]) * 1000.0 / n_atoms, color="k", lw=0.8)
    drift = stats["drift_eV_per_atom_per_ps"]
    slope, intercept = np.polyfit(t, (etot - etot[0]) / n_atoms, 1)
    ax2.plot(t, (slope * t + intercept) * 1000.0, "r--", lw=0.8,
             label=f"linear fit: {drift:.2e} eV/atom/ps")
    ax2.set_ylabel("E_tot − E_tot(0)\n(meV/atom)")
    ax2.set_xlabel("time (ps)")
    ax2.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


# ============================================================================= main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time-ps", type=float, default=2.0, help="NVE length, ps")
    p.add_argument("--dt-fs", type=float, default=0.25, help="time step, fs")
    p.add_argument("--temperature", type=float, default=300.0, help="initial MB temperature, K")
    p.add_argument("--interval", type=int, default=4, help="record E every n steps")
    p.add_argument("--train-minutes", type=float, default=6.0, help="training wall time, min")
    p.add_argument("--max-epochs", type=int, default=2000)
    p.add_argument("--r-max", type=float, default=4.5, help="model cutoff, Å")
    p.add_argument("--hidden", default="16x0e+16x1o", help="hidden irreps")
    p.add_argument("--seed", type=int, default=0, help="training and velocity seed")
    p.add_argument("--model", default=None, help="trained model file (skips training)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with the water *.extxyz")
    p.add_argument("--frame", type=int, default=0, help="starting frame of water16")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(REPO / "runs" / "nve_drift"), help="output folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    import ase.io

    from polarmace.calculator import PolarMACECalculator

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    report: Dict[str, Any] = {"args": vars(args)}
    if args.model is None:
        files = sorted(data_dir.glob("*.extxyz"))
        report["training"] = train_model(files, out, args.train_minutes, args.seed, args.r_max,
                                         args.hidden, args.max_epochs)
        model_path = report["training"]["model"]
        print(json.dumps(report["training"]["final_metrics"], indent=1), flush=True)
    else:
        model_path = args.model
    if not Path(model_path).exists():
        raise SystemExit(f"--model: no such file {model_path}")
    report["model"] = str(model_path)

    atoms = ase.io.read(str(data_dir / WATER16), index=args.frame)
    atoms.calc = None
    maxwell_boltzmann(atoms, args.temperature, args.seed)
    calc = PolarMACECalculator(model_path, dtype="float64")
    n = len(atoms)
    print(f"NVE: {n} atoms, {args.time_ps} ps at {args.dt_fs} fs, T0 {args.temperature} K", flush=True)
    traj, wall, steps = run_nve(atoms, calc, args.time_ps, args.dt_fs, args.interval, progress=True)
    stats = drift_statistics(traj, n)
    stats["steps"] = steps
    stats["steps_per_s"] = steps / wall
    stats["wall_s"] = wall
    stats["neighbour_builds"] = calc.neighbours.builds
    stats["target_eV_per_atom_per_ps"] = 1e-4
    stats["stable"] = bool(stats["min_distance_A"] > 0.5
                           and stats["temperature_max_K"] < 3.0 * args.temperature)
    stats["passes_target"] = bool(stats["stable"] and abs(stats["drift_eV_per_atom_per_ps"]) < 1e-4)
    report["nve"] = stats
    report["trajectory"] = asdict(traj)
    (out / "nve_drift.json").write_text(json.dumps(report, indent=1, default=str))
    title = (f"NVE water16 ({n} atoms), PolarMACE les float64, dt {args.dt_fs} fs, "
             f"T0 {args.temperature:.0f} K")
    plot(traj, stats, n, out / "nve_drift.png", title)
    print(f"{steps} steps in {wall:.1f} s ({stats['steps_per_s']:.2f} steps/s)")
    if not stats["stable"]:
        print("UNSTABLE: atoms closer than 0.5 Å or T above 3x the start; the drift below is "
              "not meaningful (train longer)")
    print(f"drift {stats['drift_eV_per_atom_per_ps']:.3e} eV/atom/ps (target |drift| < 1e-4: "
          f"{'PASS' if stats['passes_target'] else 'FAIL'})")
    print(f"RMS fluctuation of E_tot {stats['rms_fluctuation_eV_per_atom']:.3e} eV/atom "
          f"(about the fit {stats['rms_about_fit_eV_per_atom']:.3e}); max |E - E0| "
          f"{stats['max_abs_dE_eV_per_atom']:.3e} eV/atom")
    print(f"T range {stats['temperature_min_K']:.0f}-{stats['temperature_max_K']:.0f} K "
          f"(mean {stats['temperature_mean_K']:.0f}); min distance {stats['min_distance_A']:.3f} Å")
    print(f"wrote {out / 'nve_drift.json'} and {out / 'nve_drift.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

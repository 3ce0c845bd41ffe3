#!/usr/bin/env python
"""Water IR spectrum of a trained model vs experiment (O–H stretch and H–O–H bend peaks).

MD of a periodic water box with the model (Langevin NVT equilibration, then NVE production);
every `--sample-every` steps the Born effective charges are computed and dP/dt = Σ_i Z*_i·v_i
is stored; the IR absorption α(ω)n(ω) follows from its autocorrelation (polarmace.spectra).
The experimental peaks are read from the Segelstein absorption of liquid water in
../shared/datasets/water_ir_experimental (maximum of α in the same windows).

    python benchmarks/water_ir.py --model runs/water_amoeba_uiq/model.pt \
        --equil-ps 1 --prod-ps 5 --out results/water_ir

With --amoeba instead of --model the same protocol runs with AMOEBA itself in OpenMM (Langevin
NVT, then NVE with OpenMM's leapfrog Verlet; the IR from the continuous cell-dipole series, S_Ṗ = ω² S_P):
the spectrum an AMOEBA-trained model can at best reproduce, so a model's error against
experiment splits into (model − AMOEBA) + (AMOEBA − experiment).

Prints the peak table and writes series.npz (the dP/dt or dipole series, for --reanalyse),
spectrum.csv, water_ir.png and results.json to --out. Peaks: the maximum of α(ω)n(ω) in each
window, refined between grid points (Spectrum.peak).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from polarmace.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
WINDOWS = {"bend": (1400.0, 1900.0), "stretch": (2800.0, 4000.0)}
DEFAULT_TEMPERATURE = 300.0  # K
RECENT_FRAMES = 250  # sampled frames written out when the MD fails (1,000 steps at the defaults)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="trained model (.pt or .ts)")
    src.add_argument("--amoeba", action="store_true",
                     help="the reference: the same protocol with AMOEBA itself (OpenMM), IR from "
                          "the dipole series (what an AMOEBA-trained model can at best reproduce)")
    src.add_argument("--reanalyse", type=Path, metavar="SERIES_NPZ",
                     help="the series.npz of an earlier run: new spectrum and peaks (e.g. another "
                          "--block-ps), no MD")
    p.add_argument("--structure", default=str(SHARED / "water_structures" / "liquid-64.xyz"))
    p.add_argument("--experimental", default=str(SHARED / "water_ir_experimental"
                                                 / "water_IR_Segelstein_alpha_200-4500.csv"))
    p.add_argument("--temperature", type=float, default=None,
                   help="K (default 300; with --reanalyse, the stored run's target temperature)")
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    p.add_argument("--equil-ps", type=float, default=1.0)
    p.add_argument("--prod-ps", type=float, default=5.0)
    p.add_argument("--sample-every", type=int, default=4, help="steps between BEC samples")
    p.add_argument("--block-ps", type=float, default=1.0,
                   help="ACF block length, ps (longest lag; Welch blocks with 50%% overlap): water's "
                        "bands are 100-400 cm⁻¹ wide, so 1 ps resolves them and 5 ps average 9 blocks")
    p.add_argument("--eps-infty", type=float, default=None, help="scale BEC by √ε∞ (e.g. 1.78)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/water_ir"))
    p.add_argument("--also", action="append", default=[], metavar="LABEL=SPECTRUM_CSV",
                   help="overlay the spectrum.csv of an earlier run in the plot (repeatable)")
    return p.parse_args(argv)


def experimental_peaks(path: str) -> dict:
    """Peak positions (cm⁻¹) of the measured absorption coefficient α in each window."""
    from polarmace.cli.spectra import read_curve

    nu, alpha = read_curve(path, "0,3")
    out = {}
    for name, (lo, hi) in WINDOWS.items():
        sel = (nu >= lo) & (nu <= hi)
        out[name] = float(nu[sel][np.argmax(alpha[sel])])
    return out


def experimental_centroids(path: str) -> dict:
    """Band centroids (cm⁻¹, α-weighted mean frequency) of the measured absorption per window."""
    from polarmace.cli.spectra import read_curve
    from polarmace.spectra import Spectrum

    nu, alpha = read_curve(path, "0,3")
    measured = Spectrum(nu, alpha)
    return {name: measured.band_centroid(lo, hi) for name, (lo, hi) in WINDOWS.items()}


class UnstableMD(RuntimeError):
    """The model's MD left the physical region (coincident atoms, runaway temperature)."""

    def __init__(self, message: str, frames: list):
        super().__init__(message)
        self.frames = frames  # the last sampled frames before the failure, oldest first


def _model_md(args: argparse.Namespace, atoms):
    """MD with the model; returns the series (dP/dt e·Å/fs, temperatures K, total energies eV)."""
    import torch
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    from polarmace.calculator import PolarMACECalculator
    from polarmace.spectra import dipole_derivative

    torch.set_num_threads(args.threads)
    calc = PolarMACECalculator(args.model, dtype=args.dtype, eps_infty=args.eps_infty)
    bec_calc = PolarMACECalculator(args.model, dtype=args.dtype, eps_infty=args.eps_infty,
                                   compute_bec=True)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature,
                                 rng=np.random.default_rng(args.seed))
    Stationary(atoms)
    n_equil = int(round(args.equil_ps * 1000 / args.dt))
    n_prod = int(round(args.prod_ps * 1000 / args.dt))
    nvt = Langevin(atoms, args.dt * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs,
                   fixcm=False, rng=np.random.default_rng(args.seed + 1))
    for _ in tqdm(range(n_equil // 100 or 1), desc="NVT equilibration (×100 steps)"):
        nvt.run(100)
    nve = VelocityVerlet(atoms, args.dt * units.fs)
    dpdt, temps, etot = [], [], []
    recent = collections.deque(maxlen=RECENT_FRAMES)  # kept to show how an unstable run failed
    bar = tqdm(total=n_prod, desc="NVE production", unit="step")
    for k in range(n_prod // args.sample_every):
        try:
            nve.run(args.sample_every)
        except DataError as err:  # the calculator refuses coincident atoms: the model let them meet
            raise UnstableMD(f"{err} at NVE step {(k + 1) * args.sample_every} "
                             f"({(k + 1) * args.sample_every * args.dt / 1000:.2f} ps)", list(recent)) from err
        bar.update(args.sample_every)
        recent.append(atoms.copy())
        snap = atoms.copy()
        snap.calc = bec_calc
        bec = bec_calc.get_property("bec", snap)
        vel = atoms.get_velocities() / (units.Ang / units.fs)  # Å/fs
        dpdt.append(dipole_derivative(bec[None], vel[None])[0])
        temps.append(atoms.get_temperature())
        etot.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        if not np.isfinite(etot[-1]) or temps[-1] > 5 * args.temperature:
            raise UnstableMD(f"T = {temps[-1]:.0f} K at NVE step {(k + 1) * args.sample_every}", list(recent))
    bar.close()
    return {"kind": "dpdt", "signal": np.array(dpdt), "dt_fs": args.dt * args.sample_every,
            "volume": atoms.get_volume(), "temperature": np.array(temps), "total_energy": np.array(etot),
            "n_atoms": len(atoms), "source": str(args.model), "target_temperature_K": args.temperature}


def _amoeba_md(args: argparse.Namespace, atoms):
    """The same protocol with AMOEBA (OpenMM); returns the series (cell dipole e·Å, temperatures,
    total energies)."""
    from polarmace.reference.amoeba_dynamics import dipole_trajectory
    from polarmace.reference.amoeba_sampler import water_box

    positions, cell = water_box(len(atoms) // 3, start=args.structure)
    traj = dipole_trajectory(positions, cell, temperature=args.temperature, dt_fs=args.dt,
                             equil_ps=args.equil_ps, prod_ps=args.prod_ps,
                             sample_every=args.sample_every, seed=args.seed, threads=args.threads)
    return {"kind": "dipole", "signal": traj.dipoles, "dt_fs": traj.dt_fs, "volume": traj.volume,
            "temperature": traj.temperature, "total_energy": traj.total_energy,
            "n_atoms": len(positions), "source": "AMOEBA-2018 (OpenMM)",
            "target_temperature_K": args.temperature}


def spectrum_of(series: dict, temperature: float, block_ps: float):
    """The IR spectrum α(ω)n(ω) of a stored series (dP/dt or the dipole itself)."""
    from polarmace.spectra import ir_spectrum, ir_spectrum_from_dipoles

    dt = float(series["dt_fs"])
    block = max(4, int(round(block_ps * 1000.0 / dt)))
    estimator = ir_spectrum if str(series["kind"]) == "dpdt" else ir_spectrum_from_dipoles
    return estimator(np.asarray(series["signal"]), dt, block_length=block, temperature=temperature,
                     correction="harmonic", volume=float(series["volume"]))


def peak_table(spec, exp: dict, exp_centroids: Optional[dict] = None) -> dict:
    """Per band: the spectrum's peak, the experimental one (cm⁻¹) and the relative error; with
    `exp_centroids`, also both band centroids and their relative error."""
    rows = {}
    for name, (lo, hi) in WINDOWS.items():
        peak = spec.peak(lo, hi)
        rows[name] = {"model_cm-1": peak, "experiment_cm-1": exp[name],
                      "relative_error": (peak - exp[name]) / exp[name]}
        if exp_centroids is not None:
            centre = spec.band_centroid(lo, hi)
            rows[name].update({"model_centroid_cm-1": centre, "experiment_centroid_cm-1": exp_centroids[name],
                               "centroid_relative_error": (centre - exp_centroids[name]) / exp_centroids[name]})
    return rows


def write_spectrum(out: Path, spec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / "spectrum.csv", np.c_[spec.frequency, spec.intensity], delimiter=",",
               header=f"wavenumber_cm-1,intensity_{spec.unit.replace(' ', '')}")


def print_peaks(rows: dict) -> None:
    print(f"{'band':8s} {'model':>10s} {'experiment':>11s} {'error':>8s}   (maximum)")
    for name, row in rows.items():
        print(f"{name:8s} {row['model_cm-1']:10.0f} {row['experiment_cm-1']:11.0f} "
              f"{100 * row['relative_error']:7.1f}%")
    if all("model_centroid_cm-1" in row for row in rows.values()):
        print(f"{'band':8s} {'model':>10s} {'experiment':>11s} {'error':>8s}   (band centroid)")
        for name, row in rows.items():
            print(f"{name:8s} {row['model_centroid_cm-1']:10.0f} {row['experiment_centroid_cm-1']:11.0f} "
                  f"{100 * row['centroid_relative_error']:7.1f}%")


def bad_overlay(items) -> Optional[str]:
    """The error line for the first --also item that is not LABEL=existing/spectrum.csv."""
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            return f"error: --also {item!r}: expected LABEL=path/to/spectrum.csv of an existing file"
    return None


def run(args: argparse.Namespace) -> dict:
    import ase.io

    t0 = time.perf_counter()
    if args.reanalyse:
        with np.load(args.reanalyse) as blob:
            series = {k: blob[k] for k in blob.files}
        # the spectrum's quantum correction needs the run's temperature, not a default
        if args.temperature is None and "target_temperature_K" in series:
            args.temperature = float(series["target_temperature_K"])
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE
    if not args.reanalyse:
        atoms = ase.io.read(args.structure, index=-1)
        atoms.pbc = True
        series = _amoeba_md(args, atoms) if args.amoeba else _model_md(args, atoms)
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "series.npz", **series)  # re-analyse with --reanalyse, no new MD
    wall = time.perf_counter() - t0
    spec = spectrum_of(series, args.temperature, args.block_ps)
    exp = experimental_peaks(args.experimental)
    rows = peak_table(spec, exp, experimental_centroids(args.experimental))
    write_spectrum(args.out, spec)
    source = str(series["source"])
    _plot(args, spec, exp, "AMOEBA (reference MD)" if source.startswith("AMOEBA") else "model")
    etot = np.asarray(series["total_energy"])
    times_ps = np.arange(len(etot)) * float(series["dt_fs"]) / 1000.0
    drift = np.polyfit(times_ps, etot / int(series["n_atoms"]), 1)[0]
    return {"peaks": rows, "resolution_cm-1": spec.resolution, "wall_s": wall,
            "mean_temperature_K": float(np.mean(series["temperature"])),
            "nve_drift_eV_per_atom_ps": float(drift), "model": source,
            "prod_ps": float(times_ps[-1] + float(series["dt_fs"]) / 1000.0),
            "sample_fs": float(series["dt_fs"]), "block_ps": args.block_ps,
            "temperature_K": args.temperature}


def _plot(args: argparse.Namespace, spec, exp: dict, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polarmace.cli.spectra import read_curve

    nu, alpha = read_curve(args.experimental, "0,3")
    fig, ax = plt.subplots(figsize=(7, 4))
    sel = (spec.frequency > 1000) & (spec.frequency < 4500)
    ax.plot(spec.frequency[sel], spec.intensity[sel] / spec.intensity[sel].max(), label=label)
    sel_e = nu > 1000
    ax.plot(nu[sel_e], alpha[sel_e] / alpha[sel_e].max(), "k--", label="experiment (Segelstein)")
    for item in args.also:
        label, _, path = item.partition("=")
        nu_o, y_o = read_curve(path, "0,1")
        sel_o = (nu_o > 1000) & (nu_o < 4500)
        ax.plot(nu_o[sel_o], y_o[sel_o] / y_o[sel_o].max(), lw=1.0, label=label)
    for name, value in exp.items():
        ax.axvline(value, color="grey", lw=0.5)
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("normalised absorption")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "water_ir.png", dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reanalyse and not args.reanalyse.is_file():
        print(f"error: --reanalyse {args.reanalyse}: no such file", file=sys.stderr)
        return 2
    problem = bad_overlay(args.also)  # checked before the MD, not after it
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        res = run(args)
    except UnstableMD as err:
        import ase.io

        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "unstable_last_frames.extxyz"
        ase.io.write(path, err.frames, format="extxyz")
        print(f"error: the model's MD became unstable: {err}; no spectrum. The last {len(err.frames)} "
              f"frames are in {path}", file=sys.stderr)
        return 1
    print_peaks(res["peaks"])
    print(f"grid resolution {res['resolution_cm-1']:.1f} cm⁻¹, <T> = {res['mean_temperature_K']:.0f} K, "
          f"NVE drift {res['nve_drift_eV_per_atom_ps']:.2e} eV/atom/ps, wall {res['wall_s']:.0f} s")
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

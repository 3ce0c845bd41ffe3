"""Water IR with quantum nuclei: thermostatted ring-polymer MD (TRPMD) in i-PI, forces from the
model through polarmace-driver, IR from the bead-averaged dipole derivative.

Classical MD (benchmarks/water_ir.py) cannot red-shift the O–H stretch the way zero-point motion
does; TRPMD (Rossi, Ceriotti, Manolopoulos, J. Chem. Phys. 140, 234116 (2014)) can. P beads per
atom; the internal ring-polymer modes get a Langevin thermostat at λ = 0.5 of critical damping
(i-PI's PILE, `pile_lambda`), the centroid a global SVR thermostat (one velocity scale for the
whole box, which leaves the vibrational frequencies alone). The Kubo-transformed correlation of

    Ṁ(t) = (1/P) Σ_k Σ_i Z*_i(q^(k)) · v_i^(k)        (e·Å/fs; k = bead, i = atom)

goes through the same estimator and the same harmonic prefactor βħω/(1 − e^{−βħω}) as the
classical series (polarmace.spectra.ir_spectrum): that factor is the exact relation between the
Kubo-transformed and the standard correlation functions. P = 1 is classical MD with the same
thermostats, so `--beads 1` and `--beads P`, all else equal, measure the quantum shift alone.

    python benchmarks/water_ir_trpmd.py --model benchmarks/results/water_amoeba/uiu_f32_e70_core.model \\
        --dtype float32 --beads 8 --equil-ps 0.5 --prod-ps 3 --out results/water_trpmd_p8

Stages, each resumable with --resume (i-PI checkpoints every 100 steps; a killed run restarts
from the last checkpoint, after the frames written since are cut from its files):
1. equilibration/: PILE-L (local Langevin, --equil-tau-fs on the centroid), from --structure;
2. production/: PILE-G from the equilibration's final state; bead positions and velocities
   every --sample-every steps;
3. the Born effective charges of every sampled bead frame (--dipole-on beads, cached per bead in
   dpdt_bead<k>.npz) or of the centroid only (--dipole-on centroid), in --workers processes;
4. series.npz (readable by `water_ir.py --reanalyse`), spectrum.csv, water_ir.png and
   results.json (in --out/centroid_dipole for --dipole-on centroid), and the peak table.

The centroid-virial kinetic energy of H is printed as the measure of how quantum the run is:
3/2 k_B T = 38.8 meV at 300 K for classical nuclei; deep inelastic neutron scattering on liquid
water gives about 140 meV.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import water_ir  # noqa: E402  (the classical protocol's spectrum, peaks and plot)

from polarmace.cli.driver import ipi_xyz  # noqa: E402

PREFIX = "sim"
CHECKPOINT_STRIDE = 100  # i-PI steps between checkpoints (50 fs at the default dt)
MS_TO_ANG_FS = 1e-5


class RunFailed(RuntimeError):
    """i-PI or a driver stopped before the requested steps."""


class UsageError(ValueError):
    """A mistake in the command line (exit status 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trained model (.pt/.model or exported .ts)")
    p.add_argument("--beads", type=int, default=8, help="ring-polymer beads P (1 = classical)")
    p.add_argument("--structure", default=str(water_ir.SHARED / "water_structures" / "liquid-64.xyz"))
    p.add_argument("--experimental", default=str(water_ir.SHARED / "water_ir_experimental"
                                                 / "water_IR_Segelstein_alpha_200-4500.csv"))
    p.add_argument("--temperature", type=float, default=water_ir.DEFAULT_TEMPERATURE, help="K")
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    p.add_argument("--equil-ps", type=float, default=0.5)
    p.add_argument("--prod-ps", type=float, default=3.0)
    p.add_argument("--sample-every", type=int, default=6,
                   help="steps between stored bead frames (6 × 0.5 fs: Nyquist 5,560 cm⁻¹)")
    p.add_argument("--equil-tau-fs", type=float, default=20.0,
                   help="Langevin time constant of the centroid in the equilibration, fs")
    p.add_argument("--centroid-tau-fs", type=float, default=100.0,
                   help="SVR time constant of the centroid thermostat in the production, fs")
    p.add_argument("--block-ps", type=float, default=1.0, help="ACF block length, ps")
    p.add_argument("--dipole-on", choices=("beads", "centroid"), default="beads",
                   help="Born charges of every bead (the TRPMD estimator) or of the centroid only "
                        "(P times cheaper; exact for a dipole linear in the positions)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"))
    p.add_argument("--clients", type=int, default=2, help="polarmace-driver processes (one thread each)")
    p.add_argument("--workers", type=int, default=2, help="processes for the Born effective charges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--out", type=Path, default=Path("results/water_trpmd"))
    p.add_argument("--also", action="append", default=[], metavar="LABEL=SPECTRUM_CSV",
                   help="overlay the spectrum.csv of an earlier run in the plot (repeatable)")
    return p.parse_args(argv)


# ================================================================================ i-PI files
def ipi_input(args: argparse.Namespace, address: str, total_steps: int, stage: str) -> str:
    """i-PI input of one stage. "equilibration": PILE-L, a local Langevin thermostat of
    time constant --equil-tau-fs on the centroid (it takes out the heat of a start structure
    that is not at the model's equilibrium) and λ = 0.5 on the internal modes; it writes only
    the properties. "production": TRPMD from the equilibration's final state, PILE-G (SVR on the
    centroid with --centroid-tau-fs, λ = 0.5 on the internal modes); it writes bead positions
    and velocities every --sample-every steps."""
    stride = args.sample_every
    if stage == "equilibration":
        start = f"""<file mode="xyz" units="angstrom"> init.xyz </file>
              <velocities mode="thermal" units="kelvin"> {args.temperature} </velocities>"""
        thermostat, tau, trajectories = "pile_l", args.equil_tau_fs, ""
    else:
        start = '<file mode="chk"> ../equilibration/RESTART </file>'
        thermostat, tau = "pile_g", args.centroid_tau_fs
        trajectories = f"""
            <trajectory filename="pos" stride="{stride}" format="xyz" cell_units="angstrom"> positions{{angstrom}} </trajectory>
            <trajectory filename="vel" stride="{stride}" format="xyz"> velocities{{m/s}} </trajectory>"""
    return textwrap.dedent(f"""\
        <simulation verbosity="low" safe_stride="{CHECKPOINT_STRIDE}" floatformat="%25.16e">
          <output prefix="{PREFIX}">
            <properties stride="{stride}" filename="out"> [ step, time{{picosecond}}, conserved{{electronvolt}},
              temperature{{kelvin}}, potential{{electronvolt}}, kinetic_cv{{electronvolt}}(H) ] </properties>{trajectories}
            <checkpoint stride="{CHECKPOINT_STRIDE}" filename="chk" overwrite="true"/>
          </output>
          <total_steps> {total_steps} </total_steps>
          <prng><seed> {args.seed + (1 if stage == "equilibration" else 2)} </seed></prng>
          <ffsocket name="polarmace" mode="unix" pbc="false">
            <address> {address} </address>
            <latency> 1e-4 </latency>
          </ffsocket>
          <system>
            <initialize nbeads="{args.beads}">
              {start}
            </initialize>
            <forces> <force forcefield="polarmace"> </force> </forces>
            <motion mode="dynamics">
              <dynamics mode="nvt">
                <timestep units="femtosecond"> {args.dt} </timestep>
                <thermostat mode="{thermostat}">
                  <tau units="femtosecond"> {tau} </tau>
                  <pile_lambda> 0.5 </pile_lambda>
                </thermostat>
              </dynamics>
            </motion>
            <ensemble> <temperature units="kelvin"> {args.temperature} </temperature> </ensemble>
          </system>
        </simulation>
        """)


def _xyz_frames(lines: List[str]) -> Iterator[Tuple[int, int, int]]:
    """(step, first line, end line) of each complete frame of an i-PI xyz file, in file order;
    it stops at a truncated frame (a run killed while writing)."""
    k = 0
    while k + 1 < len(lines):
        n = int(lines[k])
        match = re.search(r"Step:\s*(\d+)", lines[k + 1])
        if match is None or k + 2 + n > len(lines):
            return
        yield int(match.group(1)), k, k + 2 + n
        k += 2 + n


def read_trajectory(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Steps [F] and values [F, N, 3] of an i-PI xyz trajectory (the units it was written in).
    A frame repeated by a restart keeps its last copy; a truncated last frame is dropped."""
    lines = path.read_text().splitlines()
    frames = {step: np.array([row.split()[1:4] for row in lines[start + 2:end]], dtype=float)
              for step, start, end in _xyz_frames(lines)}
    steps = np.array(sorted(frames))
    return steps, np.stack([frames[s] for s in steps]) if len(steps) else np.zeros((0, 0, 3))


def checkpoint_step(path: Path) -> int:
    """The step an i-PI checkpoint (XML) was written at."""
    match = re.search(r"<step>\s*(\d+)\s*</step>", path.read_text())
    if match is None:
        raise RunFailed(f"{path}: no <step> in the checkpoint; delete --out to start again")
    return int(match.group(1))


def cut_after(path: Path, last_step: int) -> None:
    """Drop the frames (xyz) or rows (properties) of `path` written after `last_step`, so that
    i-PI, restarted from the checkpoint at `last_step`, appends to a clean file."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept: List[str] = []
    if path.suffix == ".xyz":
        for step, start, end in _xyz_frames(lines):
            if step > last_step:
                break
            kept += lines[start:end]
    else:
        kept = [line for line in lines
                if line.startswith("#") or (line.strip() and int(float(line.split()[0])) <= last_step)]
    path.write_text("".join(kept))


# ================================================================================== the MD
def _property_rows(stage_dir: Path) -> List[List[str]]:
    """The data rows of a stage's i-PI properties file (none when it does not exist yet)."""
    path = stage_dir / f"{PREFIX}.out"
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _steps_done(stage_dir: Path) -> int:
    rows = _property_rows(stage_dir)
    return int(float(rows[-1][0])) if rows else 0


def _clear_stale_socket(address: str) -> None:
    """Remove the UNIX socket file a killed i-PI left behind (i-PI refuses to bind over it);
    one that still answers belongs to a live i-PI and is an error."""
    import socket

    from polarmace.cli.driver import IPI_SOCKET_PREFIX

    path = IPI_SOCKET_PREFIX + address
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RunFailed(f"{path}: another i-PI is serving this run's socket; stop it before --resume")


def run_stage(args: argparse.Namespace, stage_dir: Path, last_step: int) -> float:
    """Run (or, from its checkpoint, continue) one i-PI stage in `stage_dir` with `--clients`
    drivers until step `last_step` is written; returns the wall time, s (0 if already done)."""
    from tqdm import tqdm

    checkpoint = stage_dir / f"{PREFIX}.chk"
    if _steps_done(stage_dir) >= last_step and (stage_dir / "RESTART").exists():
        return 0.0
    if checkpoint.exists():  # a killed run: continue from the checkpoint, on clean outputs
        done = checkpoint_step(checkpoint)
        for path in stage_dir.glob(f"{PREFIX}.*_*.xyz"):
            cut_after(path, done)
        cut_after(stage_dir / f"{PREFIX}.out", done)
        source = checkpoint
    else:
        source = stage_dir / "input.xml"
    address = re.search(r"<address>\s*(\S+)\s*</address>", source.read_text()).group(1)
    _clear_stale_socket(address)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(stage_dir / "ipi.log", "a") as log:
        ipi = subprocess.Popen([shutil.which("i-pi"), source.name], cwd=stage_dir, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    drivers = []
    for c in range(args.clients):
        cmd = [sys.executable, "-m", "polarmace.cli.driver", "--model", str(Path(args.model).resolve()),
               "--structure", str((args.out / "structure.extxyz").resolve()), "--address", f"unix:{address}",
               "--connect-wait", "120"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        with open(stage_dir / f"driver{c}.log", "a") as log:
            drivers.append(subprocess.Popen(cmd, cwd=stage_dir, env=env, stdout=log, stderr=subprocess.STDOUT))
    bar = tqdm(total=last_step, initial=_steps_done(stage_dir), desc=f"{stage_dir.name} P={args.beads}",
               unit="step")
    try:
        while ipi.poll() is None:
            time.sleep(5.0)
            bar.n = _steps_done(stage_dir)
            bar.refresh()
            if all(d.poll() not in (None, 0) for d in drivers):
                raise RunFailed(f"every polarmace-driver stopped (see {stage_dir}/driver*.log)")
    finally:
        bar.close()
        for proc in (ipi, *drivers):
            if proc.poll() is None:
                proc.terminate()
        for proc in (ipi, *drivers):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if _steps_done(stage_dir) < last_step or not (stage_dir / "RESTART").exists():
        raise RunFailed(f"i-PI stopped at step {_steps_done(stage_dir)} of {last_step} "
                        f"(see {stage_dir}/ipi.log); continue with --resume")
    wall = time.perf_counter() - t0
    record = stage_dir / "wall_s.txt"  # summed over resumed pieces, so a re-analysis still knows it
    previous = float(record.read_text()) if record.exists() else 0.0
    record.write_text(f"{previous + wall:.1f}\n")
    return wall


# ============================================================================ dipole series
def bead_file(stage_dir: Path, what: str, bead: int) -> Path:
    """i-PI's trajectory file of one bead: sim.<what>_<k>.xyz, k zero-padded to the digits of
    the largest bead index (sim.pos_3.xyz for P = 8, sim.pos_03.xyz for P = 16)."""
    for path in stage_dir.glob(f"{PREFIX}.{what}_*.xyz"):
        if int(path.stem.rsplit("_", 1)[1]) == bead:
            return path
    raise RunFailed(f"{stage_dir}: no {what} trajectory of bead {bead}; rerun with --resume")


def production_frames(args: argparse.Namespace, bead: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps [F], positions [F, N, 3] Å and velocities [F, N, 3] Å/fs of one bead's production
    frames (step 0, the equilibration's last frame, left out)."""
    steps, pos = read_trajectory(bead_file(args.out / "production", "pos", bead))
    steps_v, vel = read_trajectory(bead_file(args.out / "production", "vel", bead))
    if not np.array_equal(steps, steps_v):
        raise RunFailed(f"bead {bead}: positions and velocities hold different steps; rerun with --resume")
    keep = steps > 0
    return steps[keep], pos[keep], vel[keep] * MS_TO_ANG_FS


def _cached(path: Path, steps: np.ndarray, compute) -> np.ndarray:
    """The dP/dt series stored in `path` for exactly these steps, else compute() (and store it)."""
    if path.exists():
        with np.load(path) as blob:
            if np.array_equal(blob["steps"], steps):
                return blob["dpdt"]
    dpdt = compute()
    np.savez(path, steps=steps, dpdt=dpdt)
    return dpdt


def dipole_derivative_series(args: argparse.Namespace, numbers: np.ndarray,
                             cell: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Steps [F] and Ṁ [F, 3] e·Å/fs of the production. --dipole-on beads: the TRPMD estimator
    (1/P) Σ_k Σ_i Z*_i(q^(k))·v^(k), the Born charges of every bead (cached per bead in
    dpdt_bead<k>.npz). centroid: Σ_i Z*_i(q̄)·v̄ with the bead-averaged positions and velocities,
    P times cheaper, the same for a dipole linear in the positions (dpdt_centroid.npz)."""
    from polarmace.bec_series import dipole_derivatives

    def on(positions, velocities, label):
        return lambda: dipole_derivatives(str(args.model), numbers, cell, positions, velocities,
                                          dtype=args.dtype, workers=args.workers, progress=label)

    frames = [production_frames(args, k) for k in range(args.beads)]
    steps = frames[0][0]
    if any(not np.array_equal(f[0], steps) for f in frames):
        raise RunFailed("the beads' trajectories hold different steps; rerun with --resume")
    if args.dipole_on == "centroid":
        x = np.mean([f[1] for f in frames], axis=0)  # i-PI's positions are unwrapped: no image jumps
        v = np.mean([f[2] for f in frames], axis=0)
        return steps, _cached(args.out / "dpdt_centroid.npz", steps, on(x, v, "Born charges, centroid"))
    per_bead = [_cached(args.out / f"dpdt_bead{k}.npz", steps,
                        on(f[1], f[2], f"Born charges, bead {k + 1}/{args.beads}"))
                for k, f in enumerate(frames)]
    return steps, np.mean(per_bead, axis=0)


def properties(out: Path) -> np.ndarray:
    """i-PI's properties rows: step, time ps, conserved eV, T K, potential eV, kinetic_cv(H) eV."""
    table = {int(float(r[0])): [float(x) for x in r] for r in _property_rows(out)}  # a repeat: the last
    return np.array([table[s] for s in sorted(table)])


# ================================================================================== driver
def prepare(args: argparse.Namespace, n_equil: int, n_prod: int) -> None:
    """init.xyz, structure.extxyz (the species for the drivers) and one input.xml per stage."""
    import ase.io

    atoms = ase.io.read(args.structure, index=-1)
    atoms.pbc = True
    if not np.allclose(atoms.cell.angles(), 90.0):
        raise UsageError(f"--structure {args.structure}: i-PI's xyz input here takes an orthorhombic cell")
    for stage, steps in (("equilibration", n_equil), ("production", n_prod)):
        (args.out / stage).mkdir(parents=True, exist_ok=True)
        address = f"pmtrpmd{uuid.uuid4().hex[:8]}"
        # i-PI runs total_steps steps and writes steps 0, stride, ..., total_steps
        (args.out / stage / "input.xml").write_text(ipi_input(args, address, steps, stage))
    (args.out / "equilibration" / "init.xyz").write_text(
        ipi_xyz(atoms.get_chemical_symbols(), atoms.positions, atoms.cell.lengths()))
    ase.io.write(args.out / "structure.extxyz", atoms, format="extxyz")


def analysis_dir(args: argparse.Namespace) -> Path:
    """Where series.npz, spectrum.csv, water_ir.png and results.json go: --out itself for the
    bead estimator, --out/centroid_dipole for --dipole-on centroid (both can share one run)."""
    return args.out if args.dipole_on == "beads" else args.out / "centroid_dipole"


def run(args: argparse.Namespace) -> dict:
    import ase.io

    stride = args.sample_every  # i-PI writes step 0 and every stride-th step after it
    n_equil = stride * max(1, int(round(args.equil_ps * 1000 / args.dt / stride)))
    n_prod = stride * int(round(args.prod_ps * 1000 / args.dt / stride))
    if not (args.out / "structure.extxyz").exists():
        prepare(args, n_equil, n_prod)
    elif not args.resume:
        raise UsageError(f"--out {args.out} already holds a run: pass --resume, or choose another --out")
    production = args.out / "production"
    for stage, steps in (("equilibration", n_equil), ("production", n_prod)):
        run_stage(args, args.out / stage, steps)
    md_wall = sum(float((args.out / stage / "wall_s.txt").read_text())
                  for stage in ("equilibration", "production") if (args.out / stage / "wall_s.txt").exists())
    atoms = ase.io.read(args.out / "structure.extxyz")
    t0 = time.perf_counter()
    steps, dpdt = dipole_derivative_series(args, atoms.numbers, atoms.cell.array)
    bec_wall = time.perf_counter() - t0
    prod = properties(production)
    prod = prod[prod[:, 0] > 0]  # step 0 is the equilibration's last frame
    series = {"kind": "dpdt", "signal": dpdt, "dt_fs": args.dt * args.sample_every,
              "volume": atoms.get_volume(), "temperature": prod[:, 3], "total_energy": prod[:, 2],
              "n_atoms": len(atoms), "source": f"{args.model} (TRPMD, P={args.beads})",
              "target_temperature_K": args.temperature, "beads": args.beads, "dipole_on": args.dipole_on}
    report = analysis_dir(args)
    report.mkdir(parents=True, exist_ok=True)
    np.savez(report / "series.npz", **series)
    spec = water_ir.spectrum_of(series, args.temperature, args.block_ps)
    exp = water_ir.experimental_peaks(args.experimental)
    rows = water_ir.peak_table(spec, exp, water_ir.experimental_centroids(args.experimental))
    water_ir.write_spectrum(report, spec)
    water_ir._plot(argparse.Namespace(**{**vars(args), "out": report}), spec, exp,
                   f"model, TRPMD P={args.beads} (Z* on {args.dipole_on})")
    times_ps = prod[:, 1]
    return {"peaks": rows, "beads": args.beads, "dipole_on": args.dipole_on, "resolution_cm-1": spec.resolution,
            "md_wall_s": md_wall, "bec_wall_s": bec_wall, "frames": int(len(steps)),
            "mean_temperature_K": float(np.mean(prod[:, 3])),
            "kinetic_cv_H_meV": float(np.mean(prod[:, 5])) * 1000.0 / int(np.sum(atoms.numbers == 1)),
            "conserved_drift_eV_per_atom_ps": float(np.polyfit(times_ps, prod[:, 2] / len(atoms), 1)[0]),
            "model": str(args.model), "prod_ps": n_prod * args.dt / 1000, "equil_ps": n_equil * args.dt / 1000,
            "sample_fs": args.dt * args.sample_every, "block_ps": args.block_ps,
            "centroid_tau_fs": args.centroid_tau_fs, "equil_tau_fs": args.equil_tau_fs,
            "temperature_K": args.temperature, "seed": args.seed}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.beads < 1:
        print(f"error: --beads {args.beads}: need at least 1", file=sys.stderr)
        return 2
    if shutil.which("i-pi") is None:
        print("error: i-pi is not on PATH (pip install ipi)", file=sys.stderr)
        return 2
    if not Path(args.model).is_file():
        print(f"error: --model {args.model}: no such file", file=sys.stderr)
        return 2
    problem = water_ir.bad_overlay(args.also)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        res = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"TRPMD P={res['beads']}: {res['frames']} frames, <T> = {res['mean_temperature_K']:.0f} K, "
          f"H centroid-virial kinetic energy {res['kinetic_cv_H_meV']:.1f} meV "
          f"(classical {1.5 * 8.617333e-2 * args.temperature:.1f})")
    water_ir.print_peaks(res["peaks"])
    print(f"MD {res['md_wall_s']:.0f} s, Born charges {res['bec_wall_s']:.0f} s")
    (analysis_dir(args) / "results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

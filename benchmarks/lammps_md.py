"""MD throughput of a latent-charge model in LAMMPS (fix polarmace + coul/long + PPPM) on 1 and 2
MPI ranks, against the ASE calculator (PolarMACECalculator + VelocityVerlet) in the same run.

    python benchmarks/lammps_md.py [--model M] [--sizes 1536 12288] [--steps 20 5] [--ranks 1 2]

Boxes are replicas of the first quickstart NaCl melt frame (64 ions, 11.05 Å): 1,536 = 2×3×4
and 12,288 = 4×6×8 cells. LAMMPS: PPPM relative accuracy --accuracy (default 1e-5), coul/long
cutoff 10 Å, 1 fs steps, timed by LAMMPS's own loop time (start-up and set-up excluded). ASE:
the same model, same step count, timed around `dyn.run` after one warm-up force call. Each
rank runs one torch/OpenMP thread (OMP_NUM_THREADS=1), the ASE run one thread too.
Prints steps/s, ns/day and the speed-up of 2 ranks over 1 and of LAMMPS over ASE, from wall
time and, because a shared machine gives each process only part of a core, also "dedicated":
steps per (wall time × the process's CPU share), i.e. per CPU-second of each rank, which is
what a run with a core per rank would approach.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
REPLICAS = {1536: (2, 3, 4), 12288: (4, 6, 8), 64: (1, 1, 1), 512: (2, 2, 2)}


def box(n_atoms: int):
    import ase.io

    base = ase.io.read(str(ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"), 0)
    if n_atoms not in REPLICAS:
        raise SystemExit(f"--sizes: {n_atoms} is not one of {sorted(REPLICAS)}")
    return base.repeat(REPLICAS[n_atoms])


def lammps_rate(plugin: Path, model: Path, atoms, steps: int, ranks: int, accuracy: float, work: Path) -> dict:
    from polarmace.deploy.lammps import input_script, run_lammps, write_data

    write_data(atoms, work / "data.lmp", ["Na", "Cl"])
    script = input_script(plugin, model, "data.lmp", ["Na", "Cl"], cut_coul=10.0, accuracy=accuracy,
                          fix_extra=f"accuracy {accuracy}", temperature=1200.0, steps=steps, thermo=steps)
    proc = run_lammps(script, work, ranks, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:])
    m = re.search(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", proc.stdout)
    loop = float(m.group(1))
    cpu = re.search(r"([0-9.]+)% CPU use with", proc.stdout)
    share = float(cpu.group(1)) / 100.0 if cpu else float("nan")  # CPU time / wall time, per rank
    grid = re.search(r"grid = (\d+ \d+ \d+)", proc.stdout)
    phases = re.search(r"fix polarmace: .*", proc.stdout)
    return {"seconds": loop, "steps_per_s": steps / loop, "cpu_share": share,
            "steps_per_s_dedicated": steps / (loop * share), "pppm_grid": grid.group(1) if grid else None,
            "phases": phases.group(0) if phases else None}


def ase_rate(model_path: Path, atoms, steps: int) -> dict:
    import numpy as np
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from polarmace.calculator import PolarMACECalculator

    torch.set_num_threads(1)
    atoms = atoms.copy()
    atoms.calc = PolarMACECalculator(str(model_path))
    MaxwellBoltzmannDistribution(atoms, temperature_K=1200.0, rng=np.random.default_rng(1))
    atoms.get_forces()  # warm-up: neighbour list, PME caches
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    t0, c0 = time.perf_counter(), time.process_time()
    dyn.run(steps)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "steps_per_s": steps / dt, "cpu_share": cpu / dt, "steps_per_s_dedicated": steps / cpu}


def ns_per_day(steps_per_s: float, dt_fs: float = 1.0) -> float:
    return steps_per_s * dt_fs * 86400 * 1e-6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "benchmarks" / "results" / "quickstart" / "quickstart.model"))
    p.add_argument("--sizes", type=int, nargs="+", default=[1536, 12288])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 5], help="MD steps per size")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accuracy", type=float, default=1e-5)
    p.add_argument("--no-ase", action="store_true", help="skip the ASE comparison")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if len(args.steps) != len(args.sizes):
        raise SystemExit("--steps: give one step count per --sizes entry")

    from polarmace.deploy.lammps import build_plugin, export_lammps

    plugin = build_plugin()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export_lammps(args.model, tmp / "model.lmp.pt")
        for n, steps in zip(args.sizes, args.steps):
            atoms = box(n)
            row = {"atoms": n, "steps": steps}
            for r in args.ranks:
                work = tmp / f"n{n}_r{r}"
                work.mkdir()
                row[f"lammps_{r}"] = lammps_rate(plugin, model, atoms, steps, r, args.accuracy, work)
            if not args.no_ase:
                row["ase"] = ase_rate(Path(args.model), atoms, steps)
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nNaCl melt boxes, PPPM {args.accuracy:g}, coul/long 10 Å, 1 fs; one thread per process")
    for metric, title in (("steps_per_s", "wall time"), ("steps_per_s_dedicated", "dedicated (per CPU-second of each rank)")):
        print(f"\n{title}")
        print(f"{'atoms':>7} {'engine':>12} {'steps/s':>10} {'ns/day':>9} {'vs ASE':>7} {'vs 1 rank':>9} {'CPU share':>9}")
        for row in results:
            ase = row.get("ase", {}).get(metric)
            one = row.get("lammps_1", {}).get(metric)
            for key in [f"lammps_{r}" for r in args.ranks] + (["ase"] if ase else []):
                sps = row[key][metric]
                label = "ASE" if key == "ase" else f"LAMMPS x{key.split('_')[1]}"
                vs_ase = f"{sps / ase:.2f}" if ase else "-"
                vs_one = f"{sps / one:.2f}" if (one and key != "ase") else "-"
                print(f"{row['atoms']:>7} {label:>12} {sps:>10.3g} {ns_per_day(sps):>9.3g} {vs_ase:>7} {vs_one:>9} "
                      f"{row[key]['cpu_share']:>9.2f}")
    for row in results:
        for r in args.ranks:
            print(f"{row['atoms']} atoms, {r} rank(s): {row[f'lammps_{r}'].get('phases')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

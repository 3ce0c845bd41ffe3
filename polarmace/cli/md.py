"""polarmace-md: NVE (velocity Verlet) or NVT (Langevin) MD with the PolarMACE calculator,
writing positions, velocities (as momenta), energies, dipoles (and BEC, polarizability) to extxyz.

    polarmace-md start.xyz --model model.pt -o traj.extxyz --steps 4000 --timestep 0.5 \\
        --ensemble nvt --temperature 300 --interval 4 --bec [--field 0 0 0.01] [--eps-infty 1.78]

Each written frame carries info: time (fs), step, energy (potential, eV), kinetic_energy (eV),
temperature (K), dipole (e·Å), polarizability (Å³, when the model has one); arrays: momenta,
forces (eV/Å), charges (e, when electrostatic) and bec (N×9, with --bec). The frames feed
`polarmace-spectra` directly (no model needed then). Periodic structures in a field get the
non-conservative BEC force (see polarmace.calculator); open ones get the field through the energy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-md", description=__doc__.split("\n")[0])
    p.add_argument("structure", help="starting structure (any ASE-readable file; last frame used)")
    p.add_argument("--model", required=True, help="model file (.pt from save, or exported .ts)")
    p.add_argument("-o", "--output", default="md.extxyz", help="output extxyz (overwritten)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--ensemble", choices=["nve", "nvt"], default="nvt")
    p.add_argument("--temperature", type=float, default=300.0, help="K (NVT bath, initial velocities)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--no-init-velocities", action="store_true",
                   help="keep the file's velocities (default: Maxwell-Boltzmann at --temperature "
                        "unless the file has momenta)")
    p.add_argument("--interval", type=int, default=10, help="write every n steps")
    p.add_argument("--bec", action="store_true", help="compute and write Born effective charges")
    p.add_argument("--field", type=float, nargs=3, default=None, metavar=("EX", "EY", "EZ"),
                   help="external field, V/Å")
    p.add_argument("--charge", type=float, default=None,
                   help="total charge, e (default: the structure's info total_charge/charge, else 0); "
                        "written to every frame as info total_charge")
    p.add_argument("--eps-infty", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å")
    p.add_argument("--seed", type=int, default=0)
    return p


def frame_of(atoms: Any, calc: Any, step: int, time_fs: float, write_bec: bool) -> Any:
    """A copy of `atoms` with the calculator's results stored in info/arrays."""
    from ase import units

    frame = atoms.copy()
    frame.calc = None
    res = calc.results
    ekin = atoms.get_kinetic_energy()
    frame.info.update({"time": time_fs, "step": step, "energy": res["energy"], "kinetic_energy": ekin,
                       "temperature": 2.0 * ekin / (3.0 * len(atoms) * units.kB)})
    frame.arrays["forces"] = np.array(res["forces"])
    if "dipole" in res:
        frame.info["dipole"] = np.array(res["dipole"])
    if "polarizability" in res:
        frame.info["polarizability"] = np.array(res["polarizability"]).reshape(9)
    if "charges" in res:
        frame.arrays["charges"] = np.array(res["charges"])
    if write_bec and "bec" in res:
        frame.arrays["bec"] = np.array(res["bec"]).reshape(len(atoms), 9)
    return frame


def run_md(atoms: Any, calc: Any, output: str, steps: int, timestep: float, ensemble: str = "nvt",
           temperature: float = 300.0, friction: float = 0.01, interval: int = 10,
           write_bec: bool = False, seed: int = 0) -> float:
    """Run MD on `atoms` with `calc`, appending a frame every `interval` steps (and step 0) to
    the extxyz file `output`. Returns the wall time in s."""
    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    atoms.calc = calc
    if ensemble == "nvt":
        dyn = Langevin(atoms, timestep * units.fs, temperature_K=temperature,
                       friction=friction / units.fs, fixcm=False,
                       rng=np.random.default_rng(seed))
    else:
        dyn = VelocityVerlet(atoms, timestep * units.fs)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()

    def write() -> None:
        atoms.get_forces()  # make sure results belong to the current positions
        frame = frame_of(atoms, calc, dyn.nsteps, dyn.nsteps * timestep, write_bec)
        ase.io.write(str(out), frame, format="extxyz", append=True)

    dyn.attach(write, interval=interval)
    start = time.perf_counter()
    dyn.run(steps)
    return time.perf_counter() - start


def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the option for values MD cannot run with; the output must not be an input."""
    from polarmace.config import ConfigError

    positive = {"--timestep": args.timestep, "--interval": args.interval}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    for name, value in {"--steps": args.steps, "--temperature": args.temperature, "--friction": args.friction,
                        "--skin": args.skin}.items():
        if not value >= 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    out = Path(args.output).resolve()
    for name, path in (("structure", args.structure), ("--model", args.model)):
        if Path(path).resolve() == out:
            raise ConfigError(f"-o/--output {args.output} is the {name} file: it would be overwritten; "
                              f"choose another output file")


def read_start(path: str, charge: Optional[float]) -> Any:
    """The last frame of `path`, carrying one total charge (info total_charge; see
    polarmace.data.atoms.total_charge_of) so that every written frame says which was used."""
    import ase.io

    from polarmace.data.atoms import DataError, set_total_charge, total_charge_of

    if not Path(path).is_file():
        raise DataError(f"{path}: no such structure file")
    try:
        atoms = ase.io.read(path, index=-1)
    except Exception as exc:  # ASE raises many kinds; the message names the file
        raise DataError(f"{path}: cannot read the structure: {exc}") from exc
    if len(atoms) == 0:
        raise DataError(f"{path}: the last frame has no atoms")
    value = charge if charge is not None else total_charge_of(atoms, 0.0, f"{path}: last frame")
    set_total_charge(atoms.info, value)
    return atoms


def main(argv: Optional[Sequence[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-md", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    check_args(args)  # before the heavy imports: a wrong option is reported at once
    atoms = read_start(args.structure, args.charge)
    from ase import units

    from polarmace.calculator import PolarMACECalculator
    from polarmace.errors import output_error, resolve_device
    from polarmace.runtime import tune_allocator

    resolve_device(args.device, "--device")
    tune_allocator()
    has_momenta = "momenta" in atoms.arrays and np.any(atoms.arrays["momenta"] != 0)
    if not args.no_init_velocities and not has_momenta:
        rng = np.random.default_rng(args.seed)
        masses = atoms.get_masses()[:, None]
        momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(masses * units.kB * args.temperature)
        momenta -= masses * momenta.sum(axis=0) / masses.sum()
        atoms.set_momenta(momenta)
    calc = PolarMACECalculator(args.model, device=args.device, dtype=args.dtype,
                               eps_infty=args.eps_infty, external_field=args.field,
                               compute_bec=args.bec, skin=args.skin)
    try:
        wall = run_md(atoms, calc, args.output, args.steps, args.timestep, args.ensemble,
                      args.temperature, args.friction, args.interval, args.bec, args.seed)
    except OSError as exc:
        raise output_error(args.output, exc) from exc
    rate = f"{args.steps / wall:.2f} steps/s, " if wall > 0 and args.steps > 0 else ""
    ns_per_day = f"{args.steps * args.timestep * 1e-6 / wall * 86400.0:.4f} ns/day" if rate else "no steps"
    print(f"{args.steps} steps in {wall:.1f} s ({rate}{ns_per_day}); total charge {calc.charge_of(atoms):+g} e; "
          f"{calc.neighbours.builds} neighbour-list builds; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

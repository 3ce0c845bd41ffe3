"""MD throughput of the ASE calculator on the 192-atom liquid-water box.

For each model size (small, MACE-default) × variant (sr, uQiqiu) × backend (Python module,
TorchScript export) it runs velocity-Verlet NVE steps (float64, 0.5 fs, random weights, 300 K
start) and reports steps/s and ns/day (median step), the pure model time per call (forces + stress,
timed inside the calculator) and the calculator overhead share 1 − Σ t_model / Σ t_step over
the same steps (neighbour list, graph assembly, tensor conversions, ASE integrator).

    python benchmarks/md_throughput.py [--sizes small default] [--variants sr uQiqiu]
        [--steps 20] [--threads N] [--json out.json] [--drift-ps 0]

--drift-ps P additionally runs P ps of NVE at 0.25 fs with the first configuration and reports
the energy drift (linear fit of total energy, eV/atom/ps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
WATER = REPO.parent / "shared" / "datasets" / "water_structures" / "liquid-64.xyz"

SIZES = {
    "small": {"hidden_irreps": "16x0e+16x1o", "max_ell": 2, "correlation": 2, "radial_mlp": [32, 32]},
    "default": {"hidden_irreps": "128x0e+128x1o", "max_ell": 3, "correlation": 3,
                "radial_mlp": [64, 64, 64]},
}


def water_box() -> Any:
    import ase.io

    if not WATER.exists():
        raise SystemExit(f"missing {WATER}")
    return ase.io.read(str(WATER))


def build(size: str, variant: str, atoms: Any) -> torch.nn.Module:
    from polarmace.model import build_model
    from polarmace.neighbours import neighbour_pairs

    r_max = 5.0
    pos = torch.tensor(atoms.positions)
    edges, _ = neighbour_pairs(pos, torch.tensor(atoms.cell.array)[None], torch.tensor(atoms.pbc)[None],
                               torch.zeros(len(atoms), dtype=torch.long), r_max)
    cfg = {"model": {"elements": ["H", "O"], "e0s": {"H": 0.0, "O": 0.0}, "r_max": r_max,
                     "avg_num_neighbors": edges.shape[1] / len(atoms), "num_interactions": 2,
                     **SIZES[size]},
           "long_range": {"variant": variant}}
    torch.manual_seed(0)
    return build_model(cfg).eval()


def thermalize(atoms: Any, temperature: float, seed: int = 0) -> None:
    from ase import units

    rng = np.random.default_rng(seed)
    m = atoms.get_masses()[:, None]
    p = rng.standard_normal((len(atoms), 3)) * np.sqrt(m * units.kB * temperature)
    atoms.set_momenta(p - m * p.sum(0) / m.sum())


class TimedModel:
    """Wraps calc.model to accumulate the wall time spent inside model calls."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        out = self.model(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def time_md(calc: Any, atoms0: Any, steps: int, dt_fs: float = 0.5, warmup: int = 3) -> Dict[str, float]:
    """Per-step wall time (median), and the model's share of the same steps' time."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = atoms0.copy()
    atoms.set_momenta(atoms0.get_momenta())
    atoms.calc = calc
    for _ in range(warmup):                             # first calls: neighbour list, and the
        atoms.calc.reset()                              # TorchScript profiling executor's passes
        atoms.get_forces()
    timed = TimedModel(calc.model)
    calc.model = timed
    builds0 = calc.neighbours.builds
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    walls = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            dyn.run(1)
            walls.append(time.perf_counter() - start)
    finally:
        calc.model = timed.model
    total = float(np.sum(walls))
    step = float(np.median(walls))
    return {"step_s": step, "steps_per_s": 1.0 / step, "ns_per_day": dt_fs * 1e-6 * 86400.0 / step,
            "model_s": timed.seconds / max(timed.calls, 1),
            "overhead_share": 1.0 - timed.seconds / total,
            "neighbour_builds": calc.neighbours.builds - builds0}


def drift(calc: Any, atoms0: Any, ps: float, dt_fs: float = 0.25) -> Dict[str, float]:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = atoms0.copy()
    atoms.set_momenta(atoms0.get_momenta())
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    steps = int(round(ps * 1000 / dt_fs))
    t, e = [], []

    def record() -> None:
        t.append(dyn.nsteps * dt_fs / 1000.0)
        e.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dyn.attach(record, interval=10)
    dyn.run(steps)
    slope = np.polyfit(t, e, 1)[0]
    return {"ps": ps, "dt_fs": dt_fs, "drift_eV_per_atom_per_ps": float(slope / len(atoms)),
            "max_deviation_eV_per_atom": float(np.ptp(e) / len(atoms))}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small", "default"], choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=["sr", "uQiqiu"])
    p.add_argument("--backends", nargs="+", default=["python", "torchscript"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--drift-ps", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from polarmace.calculator import PolarMACECalculator
    from polarmace.export import ExportError, export_model

    atoms = water_box()
    thermalize(atoms, 300.0)
    rows: List[Dict[str, Any]] = []
    for size in args.sizes:
        for variant in args.variants:
            model = build(size, variant, atoms)
            for backend in args.backends:
                row: Dict[str, Any] = {"size": size, "variant": variant, "backend": backend,
                                       "atoms": len(atoms), "threads": torch.get_num_threads()}
                if backend == "torchscript":
                    path = Path("/tmp") / f"md_throughput_{size}_{variant}.ts"
                    try:
                        export_model(model, path)
                    except ExportError as exc:
                        row["error"] = str(exc).splitlines()[0][:200]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        continue
                    calc = PolarMACECalculator(str(path), device=args.device)
                else:
                    calc = PolarMACECalculator(model, device=args.device)
                steps = args.steps if size == "small" else max(2, args.steps // 5)
                row.update(time_md(calc, atoms, steps))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.drift_ps > 0:
        model = build(args.sizes[0], args.variants[0], atoms)
        d = drift(PolarMACECalculator(model, device=args.device), atoms, args.drift_ps)
        d.update({"size": args.sizes[0], "variant": args.variants[0]})
        rows.append(d)
        print(json.dumps(d), flush=True)
    print(f"\n{'size':8s} {'variant':8s} {'backend':12s} {'steps/s':>8s} {'ns/day':>8s} "
          f"{'model s':>8s} {'overhead':>8s}")
    for r in rows:
        if "backend" not in r:
            continue
        if "error" in r:
            print(f"{r['size']:8s} {r['variant']:8s} {r['backend']:12s} n/a ({r['error'][:60]})")
            continue
        print(f"{r['size']:8s} {r['variant']:8s} {r['backend']:12s} {r['steps_per_s']:8.3f} "
              f"{r['ns_per_day']:8.4f} {r['model_s']:8.3f} {100 * r['overhead_share']:7.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

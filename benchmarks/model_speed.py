#!/usr/bin/env python
"""Full-model speed: PolarMACE energy + forces for the `sr` and `uQiqiu` variants at MACE
default trunk settings (128x0e+128x1o, max_ell 3, ν = 3, 2 layers, r_max 5) on liquid water
(192 atoms) and its 2×2×2 tiling (1,536 atoms). Prints the cost of the long-range machinery as
the ratio uQiqiu / sr measured in the same run (target ≤ 1.3). Each case runs in a fresh
subprocess so its peak memory (ru_maxrss) is its own.

    python benchmarks/model_speed.py
    python benchmarks/model_speed.py --sizes 1 --dtypes float32 --repeats 3
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

WATER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "water_structures" / "liquid-64.xyz"


def run_case(variant: str, tiling: int, dtype: str, repeats: int, xyz: str) -> dict:
    import ase.io
    import numpy as np
    import torch
    from polarmace.data.atoms import Configuration
    from polarmace.data.graph import collate
    from polarmace.model import build_model

    atoms = ase.io.read(xyz).repeat(tiling)
    conf = Configuration(atomic_numbers=atoms.numbers, positions=atoms.positions,
                         cell=np.asarray(atoms.cell), pbc=np.array([True] * 3))
    cfg = {"model": {"elements": ["H", "O"], "e0s": {"H": 0.0, "O": 0.0}, "avg_num_neighbors": 50.0,
                     "dtype": dtype, "r_max": 5.0},
           "long_range": {"variant": variant}}
    model = build_model(cfg).eval()   # inference: forces without a graph for second derivatives
    for p in model.parameters():
        p.requires_grad_(False)
    graph = collate([conf], 5.0, dtype=getattr(torch, dtype))
    walls, cpus = [], []
    for k in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(graph)
        assert torch.isfinite(out["forces"]).all()
        if k > 0:  # the first call is a warm-up
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    return {"variant": variant, "atoms": len(atoms), "dtype": dtype, "wall_s": walls[len(walls) // 2],
            "cpu_s": cpus[len(cpus) // 2],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--xyz", default=str(WATER))
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tilings (1 = 192 atoms, 2 = 1,536)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--variants", nargs="+", default=["sr", "uQiqiu"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        v, t, d = args.worker
        print(json.dumps(run_case(v, int(t), d, args.repeats, args.xyz)))
        return
    if not Path(args.xyz).exists():
        sys.exit(f"structure file {args.xyz} not found (pass --xyz)")
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    rows = []
    print(f"{'atoms':>6} {'dtype':<8} {'variant':<8} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} {'cpu/sr':>7} {'mem/sr':>7}")
    for t in args.sizes:
        for d in args.dtypes:
            base = None
            for v in args.variants:
                cmd = [sys.executable, __file__, "--worker", v, str(t), d, "--repeats", str(args.repeats),
                       "--xyz", args.xyz]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    print(f"{'?':>6} {d:<8} {v:<8} failed: {res.stderr.strip().splitlines()[-1][:70]}")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(r)
                base = base or r
                print(f"{r['atoms']:>6} {d:<8} {v:<8} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} {r['peak_mb']:>8.0f} "
                      f"{r['cpu_s'] / base['cpu_s']:>7.2f} {r['peak_mb'] / base['peak_mb']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

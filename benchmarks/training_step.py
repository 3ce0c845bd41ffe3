#!/usr/bin/env python
"""Cost of the electrostatics in training: one optimiser step (energy + forces with the graph for
second derivatives, energy + force loss, backward, Adam) for each variant, as a ratio to `sr`
measured in the same process with the steps interleaved (sr, les, …, sr, les, …), so that a
drifting machine speed cancels in the ratios.

Cases (equal work for every variant: same trunk, same structures, same labels, same loss):
  nacl64   4 periodic 64-ion NaCl cells (rock salt, seeded thermal displacements), the
           quickstart-sized trunk (16x0e+16x1o, ℓ ≤ 2, ν = 2, one layer, r_max 5 Å);
           targets les/sr ≤ 1.3, uQiqiu/sr ≤ 1.6.
  water192 one 192-atom liquid water box (../shared/datasets/water_structures/liquid-64.xyz),
           the default trunk (128x0e+128x1o, ℓ ≤ 3, ν = 3, two layers);
           targets les/sr ≤ 1.1, uQiqiu/sr ≤ 1.3.

    python benchmarks/training_step.py                      # both cases, one thread
    python benchmarks/training_step.py --cases nacl64 --steps 30 --json out.json
    python benchmarks/training_step.py --memory             # + peak RSS per variant (subprocesses)
    python benchmarks/training_step.py --train-accuracy model  # the electrostatics at long_range.accuracy

The steps sum the electrostatics at training.electrostatics_accuracy's default, as polarmace-train
does (validation and the saved model keep long_range.accuracy, 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT.parent / "shared" / "datasets" / "water_structures" / "liquid-64.xyz"
VARIANTS = ["sr", "les", "uiq", "uiu", "uQiqiu"]
TARGETS = {"nacl64": {"les": 1.3, "uQiqiu": 1.6}, "water192": {"les": 1.1, "uQiqiu": 1.3}}


def nacl_cells(n_cells: int = 4, seed: int = 0):
    """Periodic 64-ion rock-salt cells (a = 5.64 Å) with 0.15 Å Gaussian displacements."""
    from ase.build import bulk
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2)
        atoms.positions += rng.normal(0.0, 0.15, atoms.positions.shape)
        cells.append(atoms)
    return cells


def water_box():
    import ase.io
    return [ase.io.read(WATER)]


def case_setup(case: str):
    """(structures, model section) of a case."""
    if case == "nacl64":
        trunk = {"hidden_irreps": "16x0e+16x1o", "max_ell": 2, "correlation": 2, "num_interactions": 1,
                 "radial_mlp": [32, 32], "r_max": 5.0}
        return nacl_cells(), trunk, ["Na", "Cl"]
    if case == "water192":
        if not WATER.exists():
            raise SystemExit(f"{WATER} not found: the water192 case needs ../shared/datasets")
        return water_box(), {"r_max": 5.0}, ["H", "O"]
    raise SystemExit(f"unknown case {case!r}; choose nacl64 or water192")


def build(case: str, variant: str, dtype: str, seed: int = 0):
    """(model, optimizer, graph, loss) for a case and variant, with fixed seeded labels."""
    import torch
    from polarmace.data.atoms import Configuration
    from polarmace.data.graph import collate
    from polarmace.model import build_model
    from polarmace.training.loss import WeightedLoss

    structures, trunk, elements = case_setup(case)
    rng = np.random.default_rng(seed)
    confs = []
    for atoms in structures:
        confs.append(Configuration(atomic_numbers=atoms.numbers, positions=atoms.positions,
                                   cell=np.asarray(atoms.cell), pbc=np.array([True] * 3),
                                   energy=float(rng.normal()), forces=rng.normal(0, 0.5, (len(atoms), 3)),
                                   total_charge=0.0))
    cfg = {"model": dict(trunk, elements=elements, e0s={e: 0.0 for e in elements},
                         avg_num_neighbors=30.0, dtype=dtype),
           "long_range": {"variant": variant}}
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    graph = collate(confs, float(trunk["r_max"]), dtype=getattr(torch, dtype))
    loss = WeightedLoss({"energy": 1.0, "forces": 100.0})
    loss.resolve(["energy", "forces"], log_active=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, graph, loss


#: The electrostatics accuracy of the optimiser steps (as polarmace-train: the looser of this and
#: long_range.accuracy); set by --train-accuracy.
TRAIN_ACCURACY: Optional[float] = None


def step(model, opt, graph, loss_fn) -> float:
    from polarmace.electrostatics.engine import looser_accuracy

    opt.zero_grad(set_to_none=True)
    with looser_accuracy(model, TRAIN_ACCURACY):
        pred = model(dict(graph), compute_forces=True)
        loss, _ = loss_fn(pred, graph)
        loss.backward()
    opt.step()
    return float(loss.detach())


def time_case(case: str, variants: List[str], steps: int, dtype: str) -> Dict[str, Dict[str, float]]:
    """Median wall and CPU seconds per step for each variant, steps interleaved."""
    runs = {v: build(case, v, dtype) for v in variants}
    for v in variants:  # warm-up: caches, allocator, first-call overheads
        for _ in range(2):
            step(*runs[v])
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            step(*runs[v])
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {v: {"wall_s": float(np.median(wall[v])), "cpu_s": float(np.median(cpu[v])),
                "wall_min_s": float(np.min(wall[v]))} for v in variants}


def peak_memory(case: str, variant: str, dtype: str, plain: bool = False) -> float:
    """Peak RSS (MB) of a fresh process that runs three training steps of one variant."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import training_step as t, resource;"
            + ("" if plain else "from polarmace.runtime import tune_allocator; tune_allocator();")
            + f"t.TRAIN_ACCURACY = {TRAIN_ACCURACY!r}; r = t.build({case!r}, {variant!r}, {dtype!r});"
            "[t.step(*r) for _ in range(3)];"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1])
    return float(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["nacl64", "water192"])
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (interleaved)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per variant")
    p.add_argument("--plain-allocator", action="store_true",
                   help="leave glibc's malloc as it is (default: polarmace.runtime.tune_allocator, "
                        "as polarmace-train does)")
    p.add_argument("--train-accuracy", default="default",
                   help="electrostatics accuracy of the steps: 'default' (training.electrostatics_accuracy's "
                        "default, as polarmace-train), a number, or 'model' (long_range.accuracy, 1e-6)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch
    from polarmace.config import TrainingConfig

    global TRAIN_ACCURACY
    TRAIN_ACCURACY = (TrainingConfig().electrostatics_accuracy if args.train_accuracy == "default" else
                      None if args.train_accuracy == "model" else float(args.train_accuracy))
    from polarmace.runtime import tune_allocator
    if not args.plain_allocator:
        tune_allocator()
    torch.set_num_threads(args.threads)
    variants = ["sr"] + [v for v in args.variants if v != "sr"]
    rows = []
    for case in args.cases:
        t = time_case(case, variants, args.steps, args.dtype)
        mem = {v: peak_memory(case, v, args.dtype, args.plain_allocator) for v in variants} if args.memory else {}
        alloc = "plain malloc" if args.plain_allocator else "tuned malloc"
        acc = f"electrostatics accuracy {TRAIN_ACCURACY:g} in the steps" if TRAIN_ACCURACY else "model accuracy"
        print(f"\n{case} ({args.dtype}, {args.threads} thread(s), {alloc}, {acc}, median of {args.steps} "
              "interleaved steps)")
        print(f"{'variant':<8} {'wall ms':>8} {'cpu ms':>8} {'cpu/sr':>7} {'target':>7}"
              + (f" {'peak MB':>8} {'mem/sr':>7}" if mem else ""))
        for v in variants:
            r = t[v]
            ratio = r["cpu_s"] / t["sr"]["cpu_s"]
            target = TARGETS.get(case, {}).get(v)
            line = (f"{v:<8} {1e3 * r['wall_s']:>8.1f} {1e3 * r['cpu_s']:>8.1f} {ratio:>7.2f} "
                    f"{'≤ %.1f' % target if target else '':>7}")
            if mem:
                line += f" {mem[v]:>8.0f} {mem[v] / mem['sr']:>7.2f}"
            print(line)
            rows.append(dict(case=case, variant=v, dtype=args.dtype, threads=args.threads, train_accuracy=TRAIN_ACCURACY,
                             ratio_cpu=ratio, target=target, peak_mb=mem.get(v), **r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

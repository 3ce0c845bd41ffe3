#!/usr/bin/env python
"""Small periodic cell: cost and error of the default engine at several accuracies against the
reciprocal-only `les` sum (σ = 1, dl = 2 Å), energy + forces with random q, μ, Θ, κ, α.

Errors are measured against a converged Ewald k-sum (accuracy 1e-10); all engines are timed
interleaved in one process (best of --repeats), so the ratios are comparable on a noisy machine.

    python benchmarks/electrostatics_small_cell.py                 # 192 atoms
    python benchmarks/electrostatics_small_cell.py --atoms 384 --repeats 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from electrostatics_scaling import random_system  # noqa: E402

from polarmace.electrostatics import Electrostatics, pme  # noqa: E402


def energy_and_forces(engine, pos, cell, pbc, q, mu, theta, kappa, alpha):
    p = pos.clone().requires_grad_(True)
    out = engine(p, cell, pbc, q, dipoles=mu, quadrupoles=theta, kappa=kappa, alpha=alpha)
    energy = out.energy.sum()
    (grad,) = torch.autograd.grad(energy, p)
    return energy.detach(), -grad


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--accuracies", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3])
    args = parser.parse_args(argv)
    pos, cell, q, mu, theta, kappa, alpha = random_system(args.atoms)
    pbc = torch.tensor([[True] * 3])
    system = (pos, cell, pbc, q, mu, theta, kappa, alpha)
    engines = {"les (dl=2)": Electrostatics(sigma=1.0, kspace="les", dl=2.0)}
    for acc in args.accuracies:
        engines[f"default {acc:g}"] = Electrostatics(sigma=1.0, accuracy=acc)
    e_ref, f_ref = energy_and_forces(Electrostatics(sigma=1.0, accuracy=1e-10, method="ewald"), *system)
    times = {name: [] for name in engines}
    for engine in engines.values():
        for _ in range(3):
            energy_and_forces(engine, *system)
    for _ in range(args.repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            energy_and_forces(engine, *system)
            times[name].append(time.perf_counter() - t0)
    anchor = min(times["les (dl=2)"])
    print(f"{args.atoms} atoms, cell {float(cell[0, 0, 0]):.2f} Å, {torch.get_num_threads()} threads")
    print(f"{'engine':<16} {'mesh':<14} {'best ms':>8} {'/anchor':>8} {'|dE|/|E|':>10} {'F rel RMS':>10}")
    for name, engine in engines.items():
        energy, forces = energy_and_forces(engine, *system)
        mesh = ""
        if engine.kspace == "converged":
            beta, _, _ = engine._split(2)
            mesh = "x".join(str(k) for k in pme.choose_mesh(cell, beta, engine.accuracy, 8, 2))
        de = abs(float(energy - e_ref)) / abs(float(e_ref))
        df = float(((forces - f_ref) ** 2).mean().sqrt() / (f_ref ** 2).mean().sqrt())
        best = min(times[name])
        print(f"{name:<16} {mesh:<14} {1e3 * best:>8.2f} {best / anchor:>8.2f} {de:>10.1e} {df:>10.1e}")


if __name__ == "__main__":
    main()

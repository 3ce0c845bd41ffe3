#!/usr/bin/env python
"""PME B-spline order 10 against order 8 for quadrupolar sources, at the same 1e-6 accuracy
target (each order gets the mesh its error model asks for: at σ = 1 Å order 8 needs h ≈ 0.26 Å,
order 10 h ≈ 0.37 Å, so order 10 does 2× the stencil work on a 2.9× coarser mesh).

Sources: random charges, dipoles, traceless quadrupoles, induced charges and dipoles (the
`uQiqiu` engine inputs) in cubic cells, seeded. Two kinds of work, timed with the orders
interleaved in one process (ratios, one thread):
  train  energy, forces with the graph kept, and the backward of E + |F|² (a force-trained step)
  md     energy and forces
and, for cells up to 2,000 atoms, each order's force and energy error against the k-sum (Ewald).

    python benchmarks/pme_order.py                          # the default cases
    python benchmarks/pme_order.py --cases 4:64:0.0446 1:192:0.1 --json out.json

A case is B:N:ρ, B cells of N atoms at ρ atoms/Å³ (0.0446: 64-ion NaCl; 0.1: liquid water).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from polarmace.electrostatics.engine import Electrostatics

ORDERS = (8, 10)
DEFAULT_CASES = ["4:64:0.0446", "4:64:0.06", "4:64:0.08", "4:64:0.1", "1:192:0.1", "4:192:0.1", "1:1536:0.1",
                 "1:12288:0.1"]


def sources(num_cells: int, atoms: int, density: float, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random multipoles (e, e·Å, e·Å²) and response parameters in cubic cells."""
    g = torch.Generator().manual_seed(seed)
    n = num_cells * atoms
    length = (atoms / density) ** (1.0 / 3.0)
    f64 = torch.float64
    theta = 0.05 * torch.randn(n, 3, 3, generator=g, dtype=f64)
    theta = 0.5 * (theta + theta.transpose(1, 2))
    theta = theta - theta.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(3, dtype=f64)
    return {
        "positions": torch.rand(n, 3, generator=g, dtype=f64) * length,
        "cell": torch.eye(3, dtype=f64).repeat(num_cells, 1, 1) * length,
        "pbc": torch.ones(num_cells, 3, dtype=torch.bool),
        "batch": torch.arange(num_cells).repeat_interleave(atoms),
        "charges": 0.5 * torch.randn(n, generator=g, dtype=f64),
        "dipoles": 0.1 * torch.randn(n, 3, generator=g, dtype=f64),
        "quadrupoles": theta,
        "kappa": 0.01 * torch.rand(n, generator=g, dtype=f64),
        "alpha": 0.01 * torch.rand(n, generator=g, dtype=f64),
    }


def energy_forces(engine: Electrostatics, s: Dict[str, torch.Tensor], train: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Energies [B] eV and forces [N,3] eV/Å; with train, also the double backward."""
    pos = s["positions"].clone().requires_grad_()
    grads = {k: s[k].clone().requires_grad_(train) for k in ("charges", "dipoles", "quadrupoles")}
    res = engine(pos, s["cell"], s["pbc"], grads["charges"], grads["dipoles"], grads["quadrupoles"],
                 kappa=s["kappa"], alpha=s["alpha"], batch=s["batch"])
    total = res.energy.sum()
    (grad,) = torch.autograd.grad(total, pos, create_graph=train)
    if train:
        (total + (grad * grad).sum()).backward()
    return res.energy.detach(), -grad.detach()


def time_case(spec: str, repeats: int) -> Dict[str, float]:
    num_cells, atoms, density = spec.split(":")
    s = sources(int(num_cells), int(atoms), float(density))
    engines = {o: Electrostatics(sigma=1.0, method="pme", pme_order=o) for o in ORDERS}
    row: Dict[str, float] = {}
    n = s["positions"].shape[0]
    reps = max(2, repeats // 2) if n > 5000 else repeats
    for work in ("train", "md"):
        train = work == "train"
        for o in ORDERS:  # warm-up: influence tables, allocator
            energy_forces(engines[o], s, train)
        cpu: Dict[int, List[float]] = {o: [] for o in ORDERS}
        for _ in range(reps):
            for o in ORDERS:
                c0 = time.process_time()
                energy_forces(engines[o], s, train)
                cpu[o].append(time.process_time() - c0)
        for o in ORDERS:
            row[f"{work}_o{o}_ms"] = 1e3 * float(np.median(cpu[o]))
        row[f"{work}_o10/o8"] = row[f"{work}_o10_ms"] / row[f"{work}_o8_ms"]
    if n <= 2000:
        e_ref, f_ref = energy_forces(Electrostatics(sigma=1.0, method="ewald"), s, False)
        for o in ORDERS:
            e, f = energy_forces(engines[o], s, False)
            row[f"o{o}_force_rel_err"] = float((f - f_ref).norm() / f_ref.norm())
            row[f"o{o}_energy_rel_err"] = float((e - e_ref).abs().max() / e_ref.abs().max())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--repeats", type=int, default=6, help="timed calls per order (interleaved)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'case':<14} {'train o8 ms':>11} {'o10 ms':>8} {'o10/o8':>7} {'md o8 ms':>9} {'o10 ms':>8} "
          f"{'o10/o8':>7} {'F err o8':>9} {'o10':>8}")
    for spec in args.cases:
        r = time_case(spec, args.repeats)
        err8 = f"{r['o8_force_rel_err']:.1e}" if "o8_force_rel_err" in r else "-"
        err10 = f"{r['o10_force_rel_err']:.1e}" if "o10_force_rel_err" in r else "-"
        print(f"{spec:<14} {r['train_o8_ms']:>11.1f} {r['train_o10_ms']:>8.1f} {r['train_o10/o8']:>7.2f} "
              f"{r['md_o8_ms']:>9.1f} {r['md_o10_ms']:>8.1f} {r['md_o10/o8']:>7.2f} {err8:>9} {err10:>8}",
              flush=True)
        rows.append(dict(case=spec, threads=1, **r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

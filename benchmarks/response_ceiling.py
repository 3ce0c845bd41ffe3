#!/usr/bin/env python
"""The ceiling of the one-step response layer on the Drude exact-truth set.

The Drude NaCl frames (`scripts/make_reference_data.py drude`) carry the truth: charges ±1 e
and polarizabilities α(Cl) = 3 Å³, α(Na) = 0.3 Å³, with the Drude oscillators relaxed at every
frame (self-consistent induction). This script removes the rigid-ion part of the truth (the same
geometry evaluated with OpenMM's rigid-ion Hamiltonian: Born–Mayer–Huggins + point charges),
which leaves the polarization energy and forces, and compares them with what polarmace's
one-step response gives when it is handed the exact q and α:

    μ_i = α_i E_i(permanent charges),   E_pol = −½ Σ_i α_i |E_i|²   (no mutual induction)

for several Gaussian widths σ. Nothing is trained: this is the best a `uiu` model could do with
perfect latent charges and polarizabilities at that σ, so it tells which σ a response model
needs and how much the missing mutual induction costs. The anchor is "no response" (the
polarization forces left entirely to the short-range part), whose error is the rms of F_pol.

    python benchmarks/response_ceiling.py --data data/reference/nacl_melt_drude_test.extxyz \
        --frames 30 --json benchmarks/results/response_ceiling_drude.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def polarization_labels(frames: Sequence) -> List[Dict[str, np.ndarray]]:
    """Per frame: E_pol (eV) and F_pol [N,3] (eV/Å) = Drude truth − rigid-ion truth."""
    from polarmace.reference.openmm_ions import RIGID, IonEngine

    engine = IonEngine(frames[0].get_chemical_symbols(), np.array(frames[0].cell), RIGID)
    out = []
    for atoms in frames:
        engine.set_cell(np.array(atoms.cell))
        e_rigid, f_rigid = engine.evaluate(atoms.positions, np.zeros((0, 3)))
        out.append({"energy": atoms.get_potential_energy() - e_rigid,
                    "forces": atoms.get_forces() - f_rigid})
    return out


def one_step_response(frames: Sequence, sigma: float) -> List[Dict[str, np.ndarray]]:
    """Response energy (eV) and forces [N,3] (eV/Å) of polarmace's one-step layer with the true
    q and α of every frame, Gaussian width σ (Å), converged Ewald sums."""
    import torch

    from polarmace.electrostatics.engine import Electrostatics
    from polarmace.units import COULOMB

    engine = Electrostatics(sigma=sigma, method="ewald")
    out = []
    for atoms in frames:
        pos = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
        cell = torch.tensor(np.array(atoms.cell), dtype=torch.float64)[None]
        pbc = torch.ones(1, 3, dtype=torch.bool)
        q = torch.tensor(atoms.arrays["true_charges"], dtype=torch.float64)
        alpha = torch.tensor(atoms.arrays["true_polarizability"], dtype=torch.float64) / COULOMB
        result = engine(pos, cell, pbc, q, alpha=alpha)
        energy = result.response_energy.sum()
        (grad,) = torch.autograd.grad(energy, pos)
        out.append({"energy": float(energy.detach()), "forces": -grad.numpy()})
    return out


def compare(truth: Sequence[Dict], model: Sequence[Dict], n_atoms: int) -> Dict[str, float]:
    """Force error rms and R², energy-variation rmse per atom, and the least-squares force scale."""
    ft = np.concatenate([t["forces"] for t in truth])
    fm = np.concatenate([m["forces"] for m in model])
    et = np.array([t["energy"] for t in truth])
    em = np.array([m["energy"] for m in model])
    de = (em - em.mean()) - (et - et.mean())  # a constant offset is absorbed by the E0s
    return {"F_error_rms": 1e3 * float(np.sqrt(np.mean((fm - ft) ** 2))),
            "F_r2": 1.0 - float(np.sum((fm - ft) ** 2) / np.sum((ft - ft.mean()) ** 2)),
            "F_scale": float(np.sum(fm * ft) / np.sum(fm * fm)),
            "E_variation_rmse": 1e3 * float(np.sqrt(np.mean(de ** 2))) / n_atoms,
            "E_mean": float(em.mean())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/reference/nacl_melt_drude_test.extxyz",
                        help="Drude frames written by scripts/make_reference_data.py drude")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.7, 1.0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    path = Path(args.data)
    if not path.exists():
        print(f"--data: no such file {path} (make it with: python scripts/make_reference_data.py drude)",
              file=sys.stderr)
        return 2
    import ase.io

    frames = ase.io.read(str(path), index=f":{args.frames}")
    if "true_polarizability" not in frames[0].arrays:
        print(f"--data: {path} has no 'true_polarizability' (not a Drude reference set)", file=sys.stderr)
        return 2
    n_atoms = len(frames[0])
    truth = polarization_labels(frames)
    ft = np.concatenate([t["forces"] for t in truth])
    et = np.array([t["energy"] for t in truth])
    anchor = 1e3 * float(np.sqrt(np.mean(ft ** 2)))
    rows = {}
    print(f"{len(frames)} Drude frames of {n_atoms} ions; truth E_pol {et.mean():.3f} ± {et.std():.3f} eV "
          f"per cell, F_pol rms {anchor:.1f} meV/Å (= the error with no response: the anchor)")
    print(f"{'sigma Å':>8} {'F err meV/Å':>12} {'vs anchor':>10} {'F R²':>7} {'F scale':>8} "
          f"{'dE meV/atom':>12} {'E_pol eV':>9}")
    for sigma in args.sigmas:
        m = compare(truth, one_step_response(frames, sigma), n_atoms)
        m["F_error_vs_anchor"] = m["F_error_rms"] / anchor
        rows[str(sigma)] = m
        print(f"{sigma:8.2f} {m['F_error_rms']:12.1f} {m['F_error_vs_anchor']:10.3f} {m['F_r2']:7.3f} "
              f"{m['F_scale']:8.3f} {m['E_variation_rmse']:12.2f} {m['E_mean']:9.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": [sys.executable] + list(sys.argv), "data": str(path), "frames": len(frames),
            "truth": {"E_pol_mean": float(et.mean()), "E_pol_std": float(et.std()), "F_pol_rms": anchor},
            "units": "F meV/Å, E meV/atom (variation about the mean), E_mean eV per cell",
            "sigma": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

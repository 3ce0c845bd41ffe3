#!/usr/bin/env python
"""Does a cheaper numerical setting change a trained model's predictions? The same model is
evaluated as saved (float64, its long_range.accuracy) and with the cheaper setting on the same
structures, with the model's own error against the labels as the scale.

Settings: float32 (default), or ``--accuracy A``: float64 with the electrostatic sums at relative
accuracy A, which is what ``training.electrostatics_accuracy`` does in the optimiser steps.

    python benchmarks/numerics_check.py --model runs/water/uiu.model \
        --data data/reference/water_amoeba_periodic.extxyz --max-structures 50 \
        --bec-data data/reference/water_amoeba_clusters.extxyz
    python benchmarks/numerics_check.py --model benchmarks/results/accuracy_nacl_melt_rigid/les.model \
        --data data/reference/nacl_melt_rigid.extxyz --accuracy 1e-5 1e-4 1e-3

Prints, per setting and quantity, the RMS and largest (cheap − reference) difference next to
the reference model's RMS error against the labels (energy meV/atom, forces meV/Å; with
--bec-data the Born effective charges in e), and the cheap/reference wall-time ratio of the
evaluations (one thread; the calculator's whole evaluation, not the electrostatics alone).
Writes them as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np


def _evaluate(model: str, frames, dtype: str, bec: bool, accuracy: Optional[float] = None):
    """(energies [S] eV, forces list of [N,3] eV/Å, BEC list of [N,3,3] e or None, seconds);
    `accuracy` replaces the model's electrostatics accuracy (None: as saved)."""
    from polarmace.calculator import PolarMACECalculator
    from polarmace.electrostatics.engine import Electrostatics

    calc = PolarMACECalculator(model, dtype=dtype, compute_bec=bec)
    if accuracy is not None:
        for module in calc.model.modules():
            if isinstance(module, Electrostatics):
                module.accuracy = float(accuracy)
    energies, forces, becs = [], [], []
    t0 = time.perf_counter()
    for atoms in frames:
        a = atoms.copy()
        a.calc = calc
        energies.append(a.get_potential_energy())
        forces.append(a.get_forces())
        if bec:
            becs.append(calc.get_property("bec", a))
    return np.array(energies), forces, (becs if bec else None), time.perf_counter() - t0


def compare(model: str, frames, bec: bool, accuracy: Optional[float] = None) -> dict:
    """Differences of the cheap setting (float32, or float64 at electrostatics `accuracy`)
    from the model as saved, and the saved model's own error."""
    e64, f64, b64, t64 = _evaluate(model, frames, "float64", bec)
    dtype = "float32" if accuracy is None else "float64"
    e32, f32, b32, t32 = _evaluate(model, frames, dtype, bec, accuracy)
    n_atoms = np.array([len(a) for a in frames])
    de = (e32 - e64) / n_atoms * 1e3
    df = np.concatenate([(a - b).ravel() for a, b in zip(f32, f64)]) * 1e3
    ref_e = np.array([a.calc.results["energy"] if a.calc is not None else a.info["energy"] for a in frames])
    ref_f = np.concatenate([(a.calc.results["forces"] if a.calc is not None else a.arrays["forces"]).ravel()
                            for a in frames])
    out = {"setting": "float32" if accuracy is None else f"accuracy {accuracy:g}",
           "structures": len(frames), "time_ratio": t32 / t64,
           "dE_rms_meV_atom": float(np.sqrt(np.mean(de ** 2))), "dE_max_meV_atom": float(np.abs(de).max()),
           "dE_rms_after_mean_meV_atom": float(np.std(de)),
           "dF_rms_meV_A": float(np.sqrt(np.mean(df ** 2))), "dF_max_meV_A": float(np.abs(df).max())}
    # the float64 model's own error, as the scale (energy after the per-set mean offset)
    err_e = (e64 - ref_e) / n_atoms * 1e3
    out["model_E_rmse_meV_atom"] = float(np.sqrt(np.mean((err_e - err_e.mean()) ** 2)))
    out["model_F_rmse_meV_A"] = float(np.sqrt(np.mean((np.concatenate([f.ravel() for f in f64]) - ref_f) ** 2)) * 1e3)
    if bec:
        db = np.concatenate([(a - b).ravel() for a, b in zip(b32, b64)])
        out["dBEC_rms_e"] = float(np.sqrt(np.mean(db ** 2)))
        out["dBEC_max_e"] = float(np.abs(db).max())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path, help="labelled extxyz (energy, forces)")
    p.add_argument("--bec-data", type=Path, default=None, help="extxyz whose BEC differences are also reported")
    p.add_argument("--accuracy", type=float, nargs="+", default=None,
                   help="compare float64 at these electrostatics accuracies instead of float32")
    p.add_argument("--max-structures", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    for path in [args.data] + ([args.bec_data] if args.bec_data else []):
        if not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    settings = args.accuracy if args.accuracy else [None]
    periodic = ase.io.read(args.data, index=f":{args.max_structures}")
    clusters = ase.io.read(args.bec_data, index=f":{args.max_structures}") if args.bec_data else None
    results: dict = {"model": args.model, "runs": []}
    for accuracy in settings:
        run = {"periodic": compare(args.model, periodic, False, accuracy)}
        if clusters is not None:
            from ase.calculators.calculator import PropertyNotImplementedError

            try:
                run["bec"] = compare(args.model, clusters, True, accuracy)
            except PropertyNotImplementedError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        results["runs"].append(run)
        for name, row in run.items():
            print(f"[{name}] " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

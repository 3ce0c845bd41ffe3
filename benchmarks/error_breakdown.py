#!/usr/bin/env python
"""Where a trained model's test error comes from: energy and force RMSE per group of frames
(an info key of the extended-XYZ file, e.g. `cluster` or `kind` of the xTB NaCl set), and how
much of the squared force error the worst atoms carry.

    python benchmarks/error_breakdown.py --data data/reference/nacl_xtb_test.extxyz \
        --group cluster kind --models runs/xtb/sr.model runs/xtb/les.model --json out.json

Energies in meV/atom, forces in meV/Å (per Cartesian component, as the training metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np


def breakdown(model_path: Path, data: Path, groups: List[str], batch_size: int) -> Dict:
    from ase.io import read
    from polarmace.cli.eval import evaluate_file, load_model

    model = load_model(str(model_path))
    _, records, _ = evaluate_file(model, str(data), batch_size=batch_size)
    frames = read(str(data), ":")
    if len(frames) != len(records):
        raise SystemExit(f"{data}: {len(frames)} frames but {len(records)} evaluated")
    de = np.array([(r["energy"] - r["ref"]["energy"]) / len(r["numbers"]) for r in records]) * 1e3
    df = [(r["atoms"]["forces"] - r["ref"]["forces"]) * 1e3 for r in records]
    out: Dict = {"model": str(model_path), "all": _stats(de, df)}
    atom_sq = np.concatenate([(d * d).sum(1) for d in df])
    order = np.sort(atom_sq)[::-1]
    worst = max(1, int(round(0.05 * len(order))))
    out["worst_5pct_atoms_share_of_F_sq_error"] = float(order[:worst].sum() / order.sum())
    for key in groups:
        values = [str(f.info.get(key, "?")) for f in frames]
        out[key] = {}
        for v in sorted(set(values)):
            idx = [i for i, x in enumerate(values) if x == v]
            out[key][v] = _stats(de[idx], [df[i] for i in idx])
    return out


def _stats(de: np.ndarray, df: List[np.ndarray]) -> Dict[str, float]:
    f = np.concatenate([d.reshape(-1) for d in df])
    return {"frames": int(len(de)), "E_rmse": float(np.sqrt(np.mean(de ** 2))),
            "F_rmse": float(np.sqrt(np.mean(f ** 2))), "F_mae": float(np.mean(np.abs(f)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--group", nargs="*", default=[], help="info keys to group frames by")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for path in [args.data, *args.models]:
        if not path.is_file():
            print(f"error_breakdown.py: {path} not found", file=sys.stderr)
            return 2
    rows = [breakdown(m, args.data, args.group, args.batch_size) for m in args.models]
    for r in rows:
        a = r["all"]
        print(f"\n{r['model']}: all {a['frames']} frames  E {a['E_rmse']:.2f} meV/atom  "
              f"F RMSE {a['F_rmse']:.1f} MAE {a['F_mae']:.1f} meV/Å  "
              f"(worst 5 % of atoms: {100 * r['worst_5pct_atoms_share_of_F_sq_error']:.0f} % of ΣΔF²)")
        for key in args.group:
            for v, s in r[key].items():
                print(f"  {key}={v:<12} {s['frames']:>5} frames  E {s['E_rmse']:7.2f}  "
                      f"F RMSE {s['F_rmse']:6.1f}  MAE {s['F_mae']:6.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

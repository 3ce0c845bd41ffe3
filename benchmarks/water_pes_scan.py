#!/usr/bin/env python
"""Scan one water molecule's bend and stretch inside the liquid box: trained model vs AMOEBA.

An MD run that ends with two atoms on top of each other means the model's potential energy
surface has a hole outside the sampled geometries. This script shows where: it takes the
periodic 64-molecule box, deforms the chosen molecules along

- the H–O–H angle (symmetric, about the bisector, O–H lengths fixed), and
- one O–H length (the other bond and the angle fixed),

and prints E(model) − E(model at the unperturbed molecule) beside the same for AMOEBA-2018
(OpenMM, PME) at every point, plus the range of each coordinate sampled in --data (structures
of the training distribution) when given. Each molecule's curve is its own row set.

    python benchmarks/water_pes_scan.py --model benchmarks/results/water_amoeba/uiu_f32_e70.model \
        --dtype float32 --molecules 0 40 --out benchmarks/results/water_amoeba/pes_scan_uiu_f32_e70

Writes scan.csv, scan.json and scan.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
ANGLES_DEG = np.array([20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150], dtype=float)
BONDS_A = np.array([0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trained model file")
    p.add_argument("--label", default=None, help="the model's name in the table and plot (default: file name)")
    p.add_argument("--also-model", action="append", default=[], metavar="LABEL=MODEL",
                   help="another model scanned on the same geometries (repeatable)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--structure", default=str(SHARED / "water_structures" / "liquid-64.xyz"))
    p.add_argument("--molecules", type=int, nargs="+", default=[0],
                   help="molecule indices (O, H, H order after sorting) to deform")
    p.add_argument("--data", type=Path, default=None,
                   help="structures (extxyz) of the training distribution: report and shade the range "
                        "of the angle and O–H length they sample")
    p.add_argument("--out", type=Path, default=Path("results/water_pes_scan"))
    return p.parse_args(argv)


def bent(pos: np.ndarray, mol: int, angle_deg: float) -> np.ndarray:
    """Positions with molecule `mol`'s H–O–H angle set to angle_deg (symmetric about the bisector)."""
    out = pos.copy()
    o, h1, h2 = pos[3 * mol], pos[3 * mol + 1], pos[3 * mol + 2]
    u1, u2 = h1 - o, h2 - o
    r1, r2 = np.linalg.norm(u1), np.linalg.norm(u2)
    bis = u1 / r1 + u2 / r2
    bis /= np.linalg.norm(bis)
    perp = u1 / r1 - u2 / r2
    perp -= perp.dot(bis) * bis
    perp /= np.linalg.norm(perp)
    half = np.radians(angle_deg) / 2
    out[3 * mol + 1] = o + r1 * (np.cos(half) * bis + np.sin(half) * perp)
    out[3 * mol + 2] = o + r2 * (np.cos(half) * bis - np.sin(half) * perp)
    return out


def stretched(pos: np.ndarray, mol: int, bond: float) -> np.ndarray:
    """Positions with molecule `mol`'s first O–H bond set to `bond` Å."""
    out = pos.copy()
    o, h1 = pos[3 * mol], pos[3 * mol + 1]
    u = (h1 - o) / np.linalg.norm(h1 - o)
    out[3 * mol + 1] = o + bond * u
    return out


def geometry(pos: np.ndarray, mol: int):
    """(H–O–H angle in degrees, first O–H length in Å) of molecule `mol`."""
    o, h1, h2 = pos[3 * mol], pos[3 * mol + 1], pos[3 * mol + 2]
    u1, u2 = h1 - o, h2 - o
    cos = u1.dot(u2) / np.linalg.norm(u1) / np.linalg.norm(u2)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1)))), float(np.linalg.norm(u1))


def sampled_ranges(path: Path):
    """(min, max) of every H–O–H angle (deg) and O–H length (Å) in an extxyz of water boxes."""
    import ase.io

    from polarmace.reference.amoeba_sampler import whole_molecules
    angles, bonds = [], []
    for atoms in ase.io.iread(str(path)):
        pos = whole_molecules(atoms.positions, atoms.cell.array).reshape(-1, 3, 3)
        u1, u2 = pos[:, 1] - pos[:, 0], pos[:, 2] - pos[:, 0]
        n1, n2 = np.linalg.norm(u1, axis=1), np.linalg.norm(u2, axis=1)
        angles.append(np.degrees(np.arccos(np.einsum("mi,mi->m", u1, u2) / n1 / n2)))
        bonds.append(np.r_[n1, n2])
    a, b = np.concatenate(angles), np.concatenate(bonds)
    return {"angle_deg": [float(a.min()), float(a.max())], "oh_A": [float(b.min()), float(b.max())]}


def main(argv=None) -> int:
    args = parse_args(argv)
    models = {args.label or Path(args.model).stem: args.model}
    for item in args.also_model:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(f"error: --also-model {item!r}: expected LABEL=path/to/model of an existing file",
                  file=sys.stderr)
            return 2
        models[label] = path
    for path in (args.model, args.structure):
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    import ase
    from tqdm import tqdm

    from polarmace.calculator import PolarMACECalculator
    from polarmace.reference.amoeba_sampler import water_box
    from polarmace.reference.amoeba_system import AmoebaWater

    positions, cell = water_box(64, start=args.structure)
    n_mol = len(positions) // 3
    bad = [m for m in args.molecules if not 0 <= m < n_mol]
    if bad:
        print(f"error: --molecules {bad}: the box has molecules 0..{n_mol - 1}", file=sys.stderr)
        return 2
    amoeba = AmoebaWater(n_mol, cell)
    calcs = {label: PolarMACECalculator(path, dtype=args.dtype) for label, path in models.items()}
    symbols = ["O", "H", "H"] * n_mol

    def energies(pos: np.ndarray) -> dict:
        out = {"AMOEBA": amoeba.energy_forces(pos)[0]}
        for label, calc in calcs.items():
            atoms = ase.Atoms(symbols, positions=pos, cell=cell, pbc=True)
            atoms.calc = calc
            out[label] = float(atoms.get_potential_energy())
        return out

    rows = []
    for mol in args.molecules:
        angle0, bond0 = geometry(positions, mol)
        ref = energies(positions)
        scans = [("angle_deg", a, bent(positions, mol, a)) for a in ANGLES_DEG] + \
                [("oh_A", b, stretched(positions, mol, b)) for b in BONDS_A]
        for coord, value, pos in tqdm(scans, desc=f"molecule {mol}"):
            e = energies(pos)
            rows.append({"molecule": mol, "coordinate": coord, "value": float(value),
                         "start_angle_deg": angle0, "start_oh_A": bond0,
                         **{f"dE_{k}_eV": e[k] - ref[k] for k in e}})
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(args.out / "scan.csv", "w") as fh:
        fh.write(",".join(keys) + "\n")
        for row in rows:
            fh.write(",".join(str(row[k]) for k in keys) + "\n")
    ranges = sampled_ranges(args.data) if args.data is not None else None
    (args.out / "scan.json").write_text(json.dumps({"models": models, "rows": rows,
                                                    "training_ranges": ranges}, indent=2))
    labels = ["AMOEBA", *models]
    print(f"{'mol':>3s} {'coordinate':>10s} {'value':>6s} " + " ".join(f"{'dE ' + k + ' eV':>14s}" for k in labels))
    for row in rows:
        print(f"{row['molecule']:3d} {row['coordinate']:>10s} {row['value']:6.2f} "
              + " ".join(f"{row[f'dE_{k}_eV']:14.3f}" for k in labels))
    if ranges is not None:
        print(f"sampled in {args.data.name}: angle {ranges['angle_deg'][0]:.1f}–{ranges['angle_deg'][1]:.1f}°, "
              f"O–H {ranges['oh_A'][0]:.3f}–{ranges['oh_A'][1]:.3f} Å")
    _plot(args.out / "scan.png", rows, labels, ranges)
    return 0


def _plot(path: Path, rows: list, labels: list, ranges) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, coord, xlabel in ((axes[0], "angle_deg", "H–O–H angle (°)"), (axes[1], "oh_A", "O–H length (Å)")):
        for mol in sorted({r["molecule"] for r in rows}):
            sel = [r for r in rows if r["coordinate"] == coord and r["molecule"] == mol]
            x = [r["value"] for r in sel]
            for k, label in enumerate(labels):
                ax.plot(x, [r[f"dE_{label}_eV"] for r in sel], ["k-", "C0o-", "C1s-", "C2^-"][k % 4],
                        label=f"{label}, molecule {mol}" if coord == "angle_deg" else None, ms=3)
        if ranges is not None:
            ax.axvspan(*ranges[coord], color="grey", alpha=0.15, lw=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("E − E(start) (eV)")
        ax.set_ylim(-3, 6)
    axes[0].legend(fontsize=7)
    fig.suptitle("one molecule deformed in the 64-molecule box" + ("" if ranges is None else
                 " (grey: the range sampled in --data)"))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Give a trained model a short-range wall (ZBL core repulsion, polarmace.nn.repulsion) without
retraining it.

A model trained on thermal configurations can have an energy that falls at distances it never
saw; MD then pulls atoms together. The wall is exactly zero above each pair's cutoff. With
--data, the shortest distance of every element pair in those files is measured first, and a
cutoff at or above it is refused (exit 2): the new model then gives the old one's energies and
forces on every structure of the data, bit for bit, and only adds the wall below.

    python scripts/add_core_repulsion.py benchmarks/results/water_amoeba/uiu_f32_e70.model \
        -o uiu_f32_e70_core.model --cutoff H-H=1.0 --cutoff H-O=0.75 --cutoff O-O=1.8 \
        --data data/reference/water_amoeba_periodic.extxyz

Pairs without --cutoff get the sum of their covalent radii (checked against --data the same way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="polarmace model file")
    p.add_argument("-o", "--out", type=Path, required=True, help="model file to write")
    p.add_argument("--cutoff", action="append", default=[], metavar="A-B=Å",
                   help="cutoff of one element pair, Å (repeatable)")
    p.add_argument("--data", type=Path, nargs="*", default=[],
                   help="structure files (any ASE format) whose shortest pair distances bound the cutoffs")
    return p.parse_args(argv)


def shortest_pair_distances(paths: List[Path], elements: List[str], r_max: float) -> Dict[str, float]:
    """{"A-B": shortest distance in Å (periodic images included), inf when never within r_max}."""
    import ase.io
    import torch
    from tqdm import tqdm

    from polarmace.neighbours import edge_vectors, neighbour_pairs
    from polarmace.nn.repulsion import pair_key

    out = {pair_key(a, b): np.inf for i, a in enumerate(elements) for b in elements[i:]}
    for path in paths:
        for atoms in tqdm(ase.io.iread(str(path)), desc=f"pair distances in {path.name}", unit="frame"):
            pos = torch.tensor(atoms.positions)
            cell = torch.tensor(atoms.cell.array)[None]
            batch = torch.zeros(len(atoms), dtype=torch.long)
            edges, shifts = neighbour_pairs(pos, cell, torch.tensor(atoms.pbc)[None], batch, r_max)
            lengths = torch.linalg.norm(edge_vectors(pos, cell, batch, edges, shifts), dim=-1).numpy()
            symbols = np.array(atoms.get_chemical_symbols())
            for a, b, r in zip(symbols[edges[0].numpy()], symbols[edges[1].numpy()], lengths):
                key = pair_key(a, b)
                if key in out and r < out[key]:
                    out[key] = float(r)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from polarmace.errors import InputError
    from polarmace.model import PolarMACE, with_core_repulsion
    from polarmace.nn.repulsion import pair_cutoffs, pair_key

    for path in [args.model, *args.data]:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    given: Dict[str, float] = {}
    for item in args.cutoff:
        pair, _, value = item.partition("=")
        a, dash, b = pair.partition("-")
        try:
            if not dash:
                raise ValueError(pair)
            given[pair_key(a, b)] = float(value)
        except ValueError:
            print(f"error: --cutoff {item!r}: expected A-B=Å, e.g. O-H=0.75", file=sys.stderr)
            return 2
    try:
        model = PolarMACE.load(str(args.model))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elements = list(model.config["model"]["elements"])
    unknown = [k for k in given if any(s not in elements for s in k.split("-"))]
    if unknown:
        print(f"error: --cutoff {unknown[0]}: the model's elements are {elements}", file=sys.stderr)
        return 2
    cutoffs = pair_cutoffs(elements, given)
    if args.data:
        shortest = shortest_pair_distances(args.data, elements, model.r_max)
        print(f"{'pair':6s} {'cutoff Å':>9s} {'shortest in data Å':>19s}")
        for key, rc in cutoffs.items():
            print(f"{key:6s} {rc:9.3f} {shortest[key]:19.3f}")
        too_long = [k for k, rc in cutoffs.items() if rc >= shortest[k]]
        if too_long:
            k = too_long[0]
            print(f"error: cutoff {cutoffs[k]} Å of {k} is not below its shortest distance in the data "
                  f"({shortest[k]:.3f} Å): the wall would change the fitted energies; lower it with "
                  f"--cutoff {k}=…", file=sys.stderr)
            return 2
    try:
        walled = with_core_repulsion(model, cutoffs)
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    walled.save(str(args.out))
    print(f"wrote {args.out} (core repulsion cutoffs: "
          + ", ".join(f"{k} {v:.3f} Å" for k, v in cutoffs.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""polarmace-prepare: convert extxyz / n2p2 input.data files into one HDF5 training set.

    polarmace-prepare input.xyz [more.xyz ...] -o train.h5 [--keys energy=REF_energy forces=REF_forces]
                      [--total-charge 1] [--r-max 5] [--elements H O] [--config config.yaml]

`--config` takes data.keys, data.default_total_charge, data.required_labels, model.r_max and
model.elements from a run configuration; options given on the command line win.

Total charge of each structure: info ``total_charge`` or ``charge`` (both with different values
is an error naming the frame), else --total-charge (polarmace.data.atoms.total_charge_of).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..config import Config, ConfigError, load_config
from ..data.atoms import read_configurations
from ..data.schema import LABEL_NAMES, MIN_DISTANCE, DataError, KeySpec
from ..data.hdf5 import write_dataset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polarmace-prepare",
        description="Convert extended XYZ / n2p2 input.data files into a polarmace HDF5 training set.")
    p.add_argument("inputs", nargs="+", help="input files (.xyz/.extxyz, n2p2 input.data, or anything ase.io reads)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (e.g. train.h5)")
    p.add_argument("--config", help="take keys, default total charge, r_max and elements from this YAML config")
    p.add_argument("--keys", nargs="+", default=[], metavar="LABEL=KEY",
                   help="where labels are stored, e.g. energy=REF_energy forces=REF_forces bec=BEC "
                        "(labels: energy forces stress virials dipole bec total_charge weight external_field)")
    p.add_argument("--total-charge", type=float, default=None,
                   help="total charge of structures whose file gives none (default 0; NaCl clusters: 1)")
    p.add_argument("--r-max", type=float, default=None,
                   help="cutoff (Å) of the stored statistics (avg_num_neighbors); default model.r_max of --config, "
                        "else 5")
    p.add_argument("--elements", nargs="+", default=None, help="element list (default: the elements in the data)")
    p.add_argument("--required", nargs="+", default=None, metavar="LABEL",
                   help="labels every structure must carry (e.g. energy forces)")
    p.add_argument("--index", default=":", help="ASE-style frame selection per file (default ':' = all)")
    p.add_argument("--format", default=None, help="input format (extxyz, n2p2, or an ase.io format); default from the name")
    p.add_argument("--n2p2-units", choices=("atomic", "metal"), default="atomic",
                   help="units of n2p2 files: atomic = Bohr/Hartree (converted), metal = Å/eV")
    p.add_argument("--min-distance", type=float, default=MIN_DISTANCE,
                   help=f"atoms closer than this (Å) are an error (default {MIN_DISTANCE}); 0 disables the check")
    p.add_argument("--compression", choices=("lzf", "gzip", "none"), default="lzf")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _keys_from_cli(pairs: Sequence[str], base: dict) -> dict:
    keys = dict(base)
    for item in pairs:
        if "=" not in item:
            raise ConfigError(f"--keys: {item!r} is not of the form label=key (e.g. energy=REF_energy)")
        label, key = (part.strip() for part in item.split("=", 1))
        if label not in keys:
            hint = difflib.get_close_matches(label, list(keys), n=1)
            raise ConfigError(f"--keys: unknown label {label!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                                    f"; labels are {', '.join(keys)}"))
        keys[label] = key
    return keys


def main(argv: Optional[List[str]] = None) -> int:
    from . import run_cli

    args = _parser().parse_args(argv)
    return run_cli("polarmace-prepare", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from ..errors import output_error

    config = load_config(args.config) if args.config else Config()
    resolved = config.to_dict()
    resolved["data"]["keys"] = _keys_from_cli(args.keys, resolved["data"]["keys"])
    if args.required is not None:
        resolved["data"]["required_labels"] = args.required
    config = Config.from_dict(resolved)
    spec = KeySpec.from_config(config.data)
    total_charge = config.data.default_total_charge if args.total_charge is None else args.total_charge
    r_max = config.model.r_max if args.r_max is None else args.r_max
    elements = args.elements if args.elements is not None else config.model.elements
    output = Path(args.output)
    for name in args.inputs:
        if Path(name).resolve() == output.resolve():
            raise DataError(f"{name}: the output file is also an input")
    configurations = []
    for name in args.inputs:
        configurations += read_configurations(
            name, spec, default_total_charge=total_charge, index=args.index, format=args.format,
            min_distance=args.min_distance if args.min_distance > 0 else None, n2p2_units=args.n2p2_units,
            progress=not args.no_progress)
    try:
        stats = write_dataset(output, configurations, elements=elements, r_max=r_max,
                              compression=None if args.compression == "none" else args.compression)
    except OSError as exc:
        raise output_error(output, exc) from exc
    labels = [label for label in LABEL_NAMES if any(getattr(c, label) is not None for c in configurations)]
    charges = sorted({c.total_charge for c in configurations})
    print(f"wrote {output}: {stats['num_structures']} structures, {stats['num_atoms']} atoms, "
          f"elements {' '.join(stats['elements'])}")
    print(f"  labels: {', '.join(labels) or 'none'}; total charges: {', '.join(f'{q:g}' for q in charges)}")
    if stats["e0s"] is not None:
        print("  E0s (least squares, eV): " + ", ".join(f"{s} {v:.4f}" for s, v in stats["e0s"].items()))
        print(f"  mean energy per atom {stats['mean_energy_per_atom']:.4f} eV; after E0s {stats['shift']:.4f} eV")
    if "forces" in stats["labels"]:
        print(f"  force RMS {stats['scale']:.4f} eV/Å")
    print(f"  avg_num_neighbors {stats['avg_num_neighbors']:.2f} within r_max {stats['r_max']:g} Å")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""polarmace-eval --model M --data F [--output DIR] [--batch-size B]

Evaluates a trained model on a labelled data file: prints a table of MAE/RMSE (energy per atom
and forces in meV, stress, and dipoles and Born effective charges when labelled, BEC after the
global sign fix of docs/method.md §5), writes ``metrics.json``, the predictions as extended XYZ
(``predictions.xyz``: energy, forces, stress, charges; the references as REF_*), and parity
plots (PNG).

Total charge of each structure: info ``total_charge`` or ``charge`` (the same rule as training,
the calculator and MD), else ``--total-charge`` (default 0, as in the calculator). The charges
used are printed and stored in ``metrics.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from polarmace.data.keys import (ATOMIC_NUMBERS, BATCH, BEC, CELL, DIPOLE, ENERGY, FORCES, NUM_ATOMS, PBC, POSITIONS,
                                 PTR, STRESS, VIRIALS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model file written by polarmace-train")
    p.add_argument("--data", required=True, help="labelled data: .xyz/.extxyz, input.data or .h5")
    p.add_argument("--output", default=None, help="output directory (default: <data stem>-eval next to the model)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--total-charge", type=float, default=0.0,
                   help="total charge (e) of structures whose file gives none (default 0)")
    p.add_argument("--key", action="append", default=[], metavar="LABEL=NAME",
                   help="label key in the data file, e.g. --key energy=REF_energy (default: the model's)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--model-class", default="polarmace.model:PolarMACE", help=argparse.SUPPRESS)
    return p


def load_model(path: str, model_class: str = "polarmace.model:PolarMACE", device: str = "cpu"):
    """The model of a file written by polarmace-train (ModelFileError naming the file if not)."""
    from polarmace.export import read_model_file

    read_model_file(path)  # a clear error for TorchScript, checkpoints, torn or foreign files
    module, _, attr = model_class.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    model = cls.load(path)
    return model.to(device)


def _split(t: torch.Tensor, ptr: np.ndarray) -> List[np.ndarray]:
    a = t.detach().cpu().numpy()
    return [a[ptr[b]:ptr[b + 1]] for b in range(len(ptr) - 1)]


def _check_elements(configs, first: int, known: List[str], data_path: str) -> None:
    """DataError naming the file, frame and atom of the first element the model does not know."""
    from ase.data import chemical_symbols

    from polarmace.errors import DataError

    allowed = {chemical_symbols.index(s) for s in known}
    for k, config in enumerate(configs):
        bad = np.flatnonzero(~np.isin(config.atomic_numbers, list(allowed)))
        if len(bad):
            z = int(config.atomic_numbers[bad[0]])
            raise DataError(f"{data_path}: frame {first + k}: element {chemical_symbols[z]} (atom {int(bad[0])}) "
                            f"is not one of the model's elements {', '.join(known)}")


def eval_data_config(model, keys: Optional[Dict[str, str]] = None, total_charge: float = 0.0) -> Dict:
    """The model's data section with the user's key overrides, no required labels, and the
    total charge of structures whose file gives none."""
    cfg = dict(getattr(model, "config", {}) or {})
    dcfg = dict(cfg.get("data") or {})
    dcfg["keys"] = {**(dcfg.get("keys") or {}), **(keys or {})}
    dcfg["required_labels"] = []
    dcfg["default_total_charge"] = float(total_charge)
    return dcfg


def evaluate_file(model, data_path: str, batch_size: int = 8, device: str = "cpu",
                  keys: Optional[Dict[str, str]] = None, total_charge: float = 0.0):
    """(metrics dict, list of per-structure records, parity arrays). `total_charge`: of the
    structures whose file gives none (see polarmace.data.atoms.total_charge_of)."""
    from polarmace.training.loss import bec_signs, fill_derived, structure_mask
    from polarmace.training.metrics import MetricsAccumulator
    from polarmace.data.batching import to_device
    from polarmace.data.graph import collate
    from polarmace.data.sources import open_source

    cfg = dict(getattr(model, "config", {}) or {})
    dcfg = eval_data_config(model, keys, total_charge)
    known = list((cfg.get("model") or {}).get("elements") or [])
    r_max = float((cfg.get("model") or {}).get("r_max", 5.0))
    dtype = next(model.parameters()).dtype
    dataset = open_source(data_path, dcfg)
    acc = MetricsAccumulator()
    records = []
    parity: Dict[str, List[np.ndarray]] = {}
    model.eval()
    for start in range(0, len(dataset), batch_size):
        configs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        if known:
            _check_elements(configs, start, known, data_path)
        graph = collate(configs, r_max)
        graph = to_device(graph, torch.device(device), dtype)
        pred = model(dict(graph), compute_forces=True,
                     compute_stress=bool(graph[PBC].any()) or STRESS in graph or VIRIALS in graph,
                     compute_bec="bec" in graph)
        pred = fill_derived({k: v.detach() for k, v in pred.items() if isinstance(v, torch.Tensor)}, graph)
        acc.update(pred, graph)
        ptr = graph[PTR].cpu().numpy()
        n_struct = len(ptr) - 1
        nat = graph[NUM_ATOMS].cpu().numpy().astype(float)

        def add(name, ref, prd, mask):
            m = mask.detach().cpu().numpy() > 0
            parity.setdefault(name, [[], []])
            parity[name][0].append(ref[m].reshape(-1))
            parity[name][1].append(prd[m].reshape(-1))

        def mask_of(key, per_atom=False):
            return structure_mask(graph, key, graph[key].shape[0], per_atom=per_atom)

        if ENERGY in graph and "energy" in pred:
            add("energy", graph[ENERGY].cpu().numpy() / nat, pred["energy"].cpu().numpy() / nat, mask_of("energy"))
        if FORCES in graph and "forces" in pred:
            add("forces", graph[FORCES].cpu().numpy(), pred["forces"].cpu().numpy(), mask_of("forces", True))
        if STRESS in graph and "stress" in pred:
            add("stress", graph[STRESS].cpu().numpy(), pred["stress"].cpu().numpy(), mask_of("stress"))
        if DIPOLE in graph and "dipole" in pred:
            add("dipole", graph[DIPOLE].cpu().numpy(), pred["dipole"].cpu().numpy(), mask_of("dipole"))
        if BEC in graph and "bec" in pred:
            s = bec_signs(pred["bec"], graph[BEC], graph[BATCH], n_struct)
            fixed = s[graph[BATCH]][:, None, None] * pred["bec"]
            add("bec", graph[BEC].cpu().numpy(), fixed.cpu().numpy(), mask_of("bec", True))
        per_atom = {k: _split(pred[k], ptr) for k in ("forces", "charges", "bec") if k in pred}
        ref_atom = {k: _split(graph[k], ptr) for k in ("forces", "bec") if k in graph}
        for b in range(n_struct):
            rec = {
                "numbers": graph[ATOMIC_NUMBERS][ptr[b]:ptr[b + 1]].cpu().numpy(),
                "positions": graph[POSITIONS][ptr[b]:ptr[b + 1]].detach().cpu().numpy(),
                "cell": graph[CELL][b].cpu().numpy(), "pbc": graph[PBC][b].cpu().numpy(),
                "energy": float(pred["energy"][b]),
                "stress": pred["stress"][b].cpu().numpy() if "stress" in pred and bool(graph[PBC][b].all()) else None,
                "dipole": pred["dipole"][b].cpu().numpy() if "dipole" in pred else None,
                "atoms": {k: v[b] for k, v in per_atom.items()},
                "ref": {k: v[b] for k, v in ref_atom.items()},
                "total_charge": configs[b].total_charge,
                "total_charge_key": configs[b].total_charge_key,
            }
            if ENERGY in graph and float(mask_of("energy")[b]) > 0:
                rec["ref"]["energy"] = float(graph[ENERGY][b])
            records.append(rec)
    arrays = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in parity.items()}
    return acc.compute(), records, arrays


def write_predictions(records, path: Path) -> None:
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for rec in records:
        atoms = ase.Atoms(numbers=rec["numbers"], positions=rec["positions"], cell=rec["cell"], pbc=rec["pbc"])
        results = {"energy": rec["energy"], "free_energy": rec["energy"]}
        if "forces" in rec["atoms"]:
            results["forces"] = rec["atoms"]["forces"]
        if rec["stress"] is not None:
            s = rec["stress"]
            results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        if "charges" in rec["atoms"]:
            results["charges"] = rec["atoms"]["charges"]
        if rec["dipole"] is not None:
            results["dipole"] = rec["dipole"]
        if "bec" in rec["atoms"]:
            atoms.arrays["BEC"] = rec["atoms"]["bec"].reshape(len(atoms), 9)
        if "energy" in rec["ref"]:
            atoms.info["REF_energy"] = rec["ref"]["energy"]
        if "forces" in rec["ref"]:
            atoms.arrays["REF_forces"] = rec["ref"]["forces"]
        if "bec" in rec["ref"]:
            atoms.arrays["REF_BEC"] = rec["ref"]["bec"].reshape(len(atoms), 9)
        if "total_charge" in rec:
            atoms.info["total_charge"] = rec["total_charge"]  # the charge the prediction used
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")


_PARITY = {"energy": ("energy per atom", "eV/atom"), "forces": ("forces", "eV/Å"), "stress": ("stress", "eV/Å³"),
           "dipole": ("dipole", "e·Å"), "bec": ("BEC (sign-fixed)", "e")}


def charge_summary(records: List[Dict], default_note: str = "") -> Dict[str, Dict[str, float]]:
    """{"+1": {"structures": n, "from": "info total_charge" | "default"}, ...}: the total
    charges the evaluation used, by value and origin."""
    out: Dict[str, Dict] = {}
    for rec in records:
        origin = f"info {rec['total_charge_key']}" if rec.get("total_charge_key") else default_note or "default"
        entry = out.setdefault(f"{rec['total_charge']:+g} ({origin})", {"total_charge": rec["total_charge"],
                                                                        "from": origin, "structures": 0})
        entry["structures"] += 1
    return out


def _charge_line(summary: Dict[str, Dict], model_default: float, given: float) -> str:
    parts = [f"{e['total_charge']:+g} e for {e['structures']} ({e['from']})" for e in summary.values()]
    line = "total charge used: " + "; ".join(parts)
    if any(e["from"] == "default" for e in summary.values()) and model_default != given:
        line += (f"\n  note: the model's training data defaulted to {model_default:+g} e "
                 f"(data.default_total_charge); pass --total-charge {model_default:g} if these structures carry it")
    return line


def _parse_keys(items: List[str]) -> Dict[str, str]:
    from polarmace.config import ConfigError

    keys = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--key expects LABEL=NAME, got {item!r}")
        k, v = item.split("=", 1)
        keys[k.strip()] = v.strip()
    return keys


def main(argv: Optional[List[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-eval", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from polarmace.config import ConfigError
    from polarmace.errors import output_error, resolve_device
    from polarmace.training.electrical import format_electrical

    keys = _parse_keys(args.key)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    resolve_device(args.device, "--device")
    if not Path(args.data).is_file():
        from polarmace.errors import DataError

        raise DataError(f"{args.data}: no such data file")
    model = load_model(args.model, args.model_class, args.device)
    out = Path(args.output) if args.output else Path(args.model).parent / f"{Path(args.data).stem}-eval"
    with torch.enable_grad():
        metrics, records, arrays = evaluate_file(model, args.data, args.batch_size, args.device, keys,
                                                 total_charge=args.total_charge)
    charges = charge_summary(records, "stored in the HDF5 file" if Path(args.data).suffix.lower() in (".h5", ".hdf5")
                             else "")
    model_default = float(((getattr(model, "config", {}) or {}).get("data") or {}).get("default_total_charge", 0.0) or 0.0)
    print(_charge_line(charges, model_default, args.total_charge))
    electrical = _learned_electrostatics(model, args, keys)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(args, out, metrics, records, arrays, charges)
        if electrical is not None:
            (out / "electrical.json").write_text(json.dumps(electrical, indent=1))
            print(format_electrical(electrical, title=f"learned electrostatics on {Path(args.data).name}"))
    except OSError as exc:
        raise output_error(out, exc) from exc
    return 0


def _learned_electrostatics(model, args: argparse.Namespace, keys: Dict[str, str]) -> Optional[Dict]:
    """The model's mean charge per element and, where the file has BEC, BEC R² after one
    global sign (the first 200 structures); None for models without charges."""
    from polarmace.training.electrical import electrical_summary
    from polarmace.data.sources import open_source

    if not getattr(model, "use_charges", False):
        return None
    dataset = open_source(args.data, eval_data_config(model, keys, args.total_charge))
    return electrical_summary(model, dataset, batch_size=args.batch_size)


def _write_outputs(args: argparse.Namespace, out: Path, metrics: Dict, records: List[Dict], arrays: Dict,
                   charges: Dict) -> None:
    """The table on stdout; metrics.json, predictions.xyz and parity plots in `out`."""
    from polarmace.training import plots
    from polarmace.training.metrics import format_table

    print(format_table({Path(args.data).name: metrics}, title=f"{args.model} on {args.data}"))
    (out / "metrics.json").write_text(json.dumps({"model": str(args.model), "data": str(args.data),
                                                  "num_structures": len(records), "metrics": metrics,
                                                  "total_charge": list(charges.values())}, indent=1))
    write_predictions(records, out / "predictions.xyz")
    if not args.no_plots:
        for name, (ref, pred) in arrays.items():
            label, unit = _PARITY[name]
            plots.parity_plot(ref, pred, out / f"parity_{name}.png", label, unit)
    print(f"wrote {out / 'metrics.json'}, {out / 'predictions.xyz'}" + ("" if args.no_plots else ", parity plots"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What a trained model learned about the electrostatics: its mean charge per element and, where
the data carry reference Born effective charges, how well its BEC match them.

A model trained on energies and forces only sees the charges through the electrostatic energy,
which is even in the charges (q → −q leaves a charge-only energy unchanged). The overall sign
is therefore fixed once, for the whole set, by the sign of Σ pred·ref over all BEC components,
and the same sign is applied to the charges that are reported. Without reference BEC the sign
is left as learned.

Comparing charges: Gaussian charges of width σ interact as point charges beyond a few σ, and
the difference of the two kernels is short ranged (inside r_max), where the short-range part
of the model absorbs it. So a latent charge is compared with the true point charge directly;
for rigid ions the BEC equal the charges times the identity, and a model's BEC also carry the
∂q/∂r terms of charges that follow the geometry.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols

from polarmace.data.graph import collate
from polarmace.electrostatics.observables import isotropic_alpha
from polarmace.units import COULOMB


def _predict(model: torch.nn.Module, configurations: Sequence, batch_size: int,
             with_bec: bool) -> Dict[str, List[np.ndarray]]:
    dtype = next(model.parameters()).dtype
    r_max = float(model.r_max)
    out: Dict[str, List[np.ndarray]] = {"charges": [], "bec": [], "alpha": []}
    model.eval()
    for start in range(0, len(configurations), batch_size):
        chunk = list(configurations[start:start + batch_size])
        graph = collate(chunk, r_max, dtype=dtype)
        with torch.enable_grad():
            pred = model(graph, compute_forces=False, compute_bec=with_bec)
        out["charges"].append(pred["charges"].detach().cpu().numpy())
        if "alpha" in pred:
            out["alpha"].append((isotropic_alpha(pred["alpha"]) * COULOMB).detach().cpu().numpy())  # Å³
        if with_bec:
            out["bec"].append(pred["bec"].detach().cpu().numpy())
    return out


def r_squared(pred: np.ndarray, ref: np.ndarray) -> float:
    """1 − Σ(pred − ref)² / Σ(ref − mean ref)² over all entries."""
    ss_res = float(((pred - ref) ** 2).sum())
    ss_tot = float(((ref - ref.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def electrical_summary(model: torch.nn.Module, configurations: Sequence,
                       batch_size: int = 8, max_structures: int = 200) -> Optional[Dict[str, Any]]:
    """Learned charges per element and BEC agreement on (at most `max_structures` of) a set.

    Returns None for a model without charges. Keys: `elements` {symbol: {charge_mean,
    charge_std, alpha_iso_mean (Å³, models with induced dipoles), bec_iso_mean_ref (if BEC),
    bec_iso_mean_pred (if BEC)}} with charges in e after
    the global `sign`; `bec_r2`, `bec_mae` (e) and `bec_structures` when references exist.
    """
    if not getattr(model, "use_charges", False):
        return None
    confs = [configurations[k] for k in range(min(len(configurations), max_structures))]
    if not confs:
        return None
    with_ref = [c for c in confs if c.bec is not None]
    pred = _predict(model, confs, batch_size, with_bec=False)
    numbers = np.concatenate([c.atomic_numbers for c in confs])
    charges = np.concatenate(pred["charges"])
    alpha = np.concatenate(pred["alpha"]) if pred["alpha"] else None
    summary: Dict[str, Any] = {"structures": len(confs), "elements": {}}
    sign = 1.0
    if with_ref:
        bec_pred = np.concatenate(_predict(model, with_ref, batch_size, with_bec=True)["bec"])
        bec_ref = np.concatenate([c.bec for c in with_ref])
        sign = 1.0 if float((bec_pred * bec_ref).sum()) >= 0.0 else -1.0
        bec_pred = sign * bec_pred
        ref_numbers = np.concatenate([c.atomic_numbers for c in with_ref])
        summary.update(bec_r2=r_squared(bec_pred, bec_ref), bec_mae=float(np.abs(bec_pred - bec_ref).mean()),
                       bec_structures=len(with_ref))
        iso_pred = np.trace(bec_pred, axis1=1, axis2=2) / 3.0
        iso_ref = np.trace(bec_ref, axis1=1, axis2=2) / 3.0
    summary["sign"] = sign
    for z in sorted(set(numbers.tolist())):
        sel = numbers == z
        row: Dict[str, float] = {"charge_mean": float(sign * charges[sel].mean()),
                                 "charge_std": float(charges[sel].std())}
        if alpha is not None:
            row["alpha_iso_mean"] = float(alpha[sel].mean())
        if with_ref:
            rsel = ref_numbers == z
            if rsel.any():
                row["bec_iso_mean_ref"] = float(iso_ref[rsel].mean())
                row["bec_iso_mean_pred"] = float(iso_pred[rsel].mean())
        summary["elements"][chemical_symbols[z]] = row
    return summary


def format_electrical(summary: Mapping[str, Any], title: str = "learned electrostatics") -> str:
    """A few lines for the log: charges per element, reference BEC, R²."""
    lines = [f"{title} ({summary['structures']} structures; overall sign of the latent charges "
             f"{'+' if summary['sign'] > 0 else '−'}, fixed once for the set)"]
    head = f"  {'element':<8} {'mean q (e)':>11} {'std q':>7}"
    has_bec = "bec_r2" in summary
    has_alpha = any("alpha_iso_mean" in row for row in summary["elements"].values())
    if has_alpha:
        head += f" {'alpha (Å³)':>11}"
    if has_bec:
        head += f" {'iso BEC model':>14} {'iso BEC ref':>12}"
    lines.append(head)
    for sym, row in summary["elements"].items():
        line = f"  {sym:<8} {row['charge_mean']:>+11.3f} {row['charge_std']:>7.3f}"
        if has_alpha:
            line += f" {row['alpha_iso_mean']:>11.3f}"
        if "bec_iso_mean_ref" in row:
            line += f" {row['bec_iso_mean_pred']:>+14.3f} {row['bec_iso_mean_ref']:>+12.3f}"
        lines.append(line)
    if has_bec:
        lines.append(f"  BEC R² {summary['bec_r2']:.3f}, MAE {summary['bec_mae']:.3f} e "
                     f"({summary['bec_structures']} structures with reference BEC)")
    else:
        lines.append("  (no reference BEC in this set: the charges cannot be checked here)")
    return "\n".join(lines)

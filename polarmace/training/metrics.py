"""Error metrics: MAE / RMSE of energy per atom, forces, stress, virials, dipole, BEC; BEC R².

Units of the reported numbers (keys carry them):
  E_mae / E_rmse        meV/atom        F_mae / F_rmse     meV/Å
  S_mae / S_rmse        meV/Å³          V_mae / V_rmse     meV/atom (virials per atom)
  D_mae / D_rmse        me·Å/atom       (dipole per atom, as in the loss)
  BEC_mae / BEC_rmse    e               BEC_r2             (after the per-structure sign fix)

The accumulator holds only sums (count, Σ|e|, Σe², Σy, Σy²), so the ranks of a data-parallel
run combine exactly by an all-reduce of :meth:`MetricsAccumulator.sums`.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch

from polarmace.data.keys import BATCH, NUM_ATOMS

from .loss import bec_signs, config_weight, fill_derived, structure_mask  # noqa: F401

#: (term, short name, scale to the reported unit)
QUANTITIES = (
    ("energy", "E", 1000.0),
    ("forces", "F", 1000.0),
    ("stress", "S", 1000.0),
    ("virials", "V", 1000.0),
    ("dipole", "D", 1000.0),
    ("bec", "BEC", 1.0),
)
UNITS = {"E": "meV/atom", "F": "meV/Å", "S": "meV/Å³", "V": "meV/atom", "D": "me·Å/atom", "BEC": "e"}
_NSUM = 5  # count, sum|e|, sum e², sum y, sum y²


def errors(term: str, pred: Mapping[str, torch.Tensor], graph: Mapping[str, torch.Tensor]):
    """(per-component errors [rows, k], references [rows, k], row mask [rows]) for one term."""
    ref = graph[term].detach()
    p = pred[term].detach().to(ref.dtype)
    n_struct = graph[NUM_ATOMS].shape[0]
    num_atoms = graph[NUM_ATOMS].to(ref.dtype)
    if term == "energy":
        return ((p - ref) / num_atoms)[:, None], (ref / num_atoms)[:, None], structure_mask(graph, term, n_struct)
    if term == "forces":
        return p - ref, ref, structure_mask(graph, term, ref.shape[0], per_atom=True)
    if term == "stress":
        return (p - ref).flatten(1), ref.flatten(1), structure_mask(graph, term, n_struct)
    if term == "virials":
        return ((p - ref) / num_atoms[:, None, None]).flatten(1), (ref / num_atoms[:, None, None]).flatten(1), \
            structure_mask(graph, term, n_struct)
    if term == "dipole":
        return (p - ref) / num_atoms[:, None], ref / num_atoms[:, None], structure_mask(graph, term, n_struct)
    if term == "bec":
        s = bec_signs(p, ref, graph[BATCH], n_struct)
        return (s[graph[BATCH]][:, None, None] * p - ref).flatten(1), ref.flatten(1), \
            structure_mask(graph, term, ref.shape[0], per_atom=True)
    raise KeyError(term)


class MetricsAccumulator:
    """Accumulates errors over batches; :meth:`compute` gives the metric dict."""

    def __init__(self, terms=None):
        self.terms = tuple(t for t, _, _ in QUANTITIES if terms is None or t in terms)
        self._sums: Dict[str, torch.Tensor] = {t: torch.zeros(_NSUM, dtype=torch.float64) for t in self.terms}
        self.loss_sum = 0.0
        self.loss_count = 0.0

    def update(self, pred: Mapping[str, torch.Tensor], graph: Mapping[str, torch.Tensor],
               loss: Optional[float] = None, loss_weight: float = 1.0) -> None:
        pred = fill_derived(dict(pred), graph)
        for t in self.terms:
            if t not in graph or t not in pred or pred[t] is None:
                continue
            e, y, m = errors(t, pred, graph)
            m = m.to(torch.float64).cpu()
            e = e.to(torch.float64).cpu()
            y = y.to(torch.float64).cpu()
            k = e.shape[1]
            mm = m[:, None]
            self._sums[t] += torch.stack([
                (m.sum() * k), (e.abs() * mm).sum(), (e ** 2 * mm).sum(), (y * mm).sum(), (y ** 2 * mm).sum()])
        if loss is not None:
            self.loss_sum += float(loss) * loss_weight
            self.loss_count += loss_weight

    def sums(self) -> torch.Tensor:
        """All sums as one float64 vector (for all-reduce)."""
        parts = [self._sums[t] for t in self.terms] + [torch.tensor([self.loss_sum, self.loss_count], dtype=torch.float64)]
        return torch.cat(parts)

    def load_sums(self, vec: torch.Tensor) -> None:
        vec = vec.to(torch.float64).cpu()
        for k, t in enumerate(self.terms):
            self._sums[t] = vec[k * _NSUM:(k + 1) * _NSUM].clone()
        self.loss_sum, self.loss_count = float(vec[-2]), float(vec[-1])

    def compute(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self.loss_count > 0:
            out["loss"] = self.loss_sum / self.loss_count
        scale = {t: s for t, _, s in QUANTITIES}
        short = {t: n for t, n, _ in QUANTITIES}
        for t in self.terms:
            n, sabs, ssq, sy, syy = (float(x) for x in self._sums[t])
            if n <= 0:
                continue
            out[f"{short[t]}_mae"] = scale[t] * sabs / n
            out[f"{short[t]}_rmse"] = scale[t] * math.sqrt(ssq / n)
            if t == "bec":
                sst = syy - sy * sy / n
                out["BEC_r2"] = 1.0 - ssq / sst if sst > 0 else float("nan")
        return out


def compute_metrics(pairs) -> Dict[str, float]:
    """Metrics over an iterable of (pred, graph) pairs."""
    acc = MetricsAccumulator()
    for pred, graph in pairs:
        acc.update(pred, graph)
    return acc.compute()


def format_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A plain-text table: one row per data set name, one column per metric."""
    cols = []
    for metrics in rows.values():
        for k in metrics:
            if k not in cols:
                cols.append(k)
    header_names = []
    for c in cols:
        base = c.split("_")[0]
        header_names.append(f"{c} [{UNITS[base]}]" if base in UNITS and not c.endswith("r2") else c)
    widths = [max(len(h), 10) for h in header_names]
    name_w = max([len(n) for n in rows] + [5])
    lines = []
    if title:
        lines.append(title)
    lines.append(" ".join(["set".ljust(name_w)] + [h.rjust(w) for h, w in zip(header_names, widths)]))
    for name, metrics in rows.items():
        vals = [(f"{metrics[c]:.4g}" if c in metrics else "-").rjust(w) for c, w in zip(cols, widths)]
        lines.append(" ".join([name.ljust(name_w)] + vals))
    return "\n".join(lines)

"""Weighted, masked training loss (energy per atom, forces, stress, virials, dipole, BEC).

Every term is a weighted mean of squared errors over the structures (or atoms) that carry the
label, i.e. ``Σ w·m·err² / Σ m`` with m the label mask and w the per-configuration weight.
The numerator and the denominator are kept apart so that data-parallel training can sum the
denominators over all ranks first: ``loss(pred, batch, counts=global_counts)`` then gives
gradients whose sum over ranks equals the single-process gradient of the global batch.

A term the config asks for (weight > 0) whose label is absent from the data gets weight 0 with
one warning naming it; the active terms are logged once. Nothing is dropped silently.

BEC (Born effective charges) are compared after the global sign fix of docs/method.md §5: the sign of the
latent charges is arbitrary (E is even in q), so per structure the sign s ∈ {±1} minimising
|s·Z_pred − Z_ref|² is chosen (s = sign Σ Z_pred·Z_ref, detached).
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from polarmace.data.keys import BATCH, CELL, LABELS, NUM_ATOMS, POSITIONS, WEIGHT, mask_key

log = logging.getLogger("polarmace.training")

#: loss terms in a fixed order (the order of the per-term log columns)
TERMS: Tuple[str, ...] = ("energy", "forces", "stress", "virials", "dipole", "bec")

#: label key in the graph dict for each term (polarmace.data.keys); masks are mask_key(key)
LABEL_KEYS: Dict[str, str] = dict(zip(TERMS, LABELS))



def structure_mask(graph: Mapping[str, torch.Tensor], key: str, size: int,
                   per_atom: bool = False) -> torch.Tensor:
    """The float mask of label `key`: ones when the label has no mask, [B] → [N] when per_atom."""
    ref = graph[key]
    mask = graph.get(mask_key(key))
    if mask is None:
        mask = torch.ones(size, dtype=ref.dtype, device=ref.device)
    mask = mask.to(ref.dtype)
    if per_atom and mask.shape[0] != size:  # a per-structure mask of a per-atom label
        mask = mask[graph[BATCH]]
    return mask


def config_weight(graph: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-structure weight [B] (ones when the data has none)."""
    w = graph.get(WEIGHT)
    if w is None:
        return torch.ones(graph[NUM_ATOMS].shape[0], dtype=like.dtype, device=like.device)
    return w.to(like.dtype)


def cell_volume(graph: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.linalg.det(graph[CELL]).abs()


def fill_derived(pred: Dict[str, torch.Tensor], graph: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Virials from stress (virials = −V·stress) or stress from virials when only one is there."""
    out = dict(pred)
    if "virials" not in out and "stress" in out and out["stress"] is not None:
        out["virials"] = -cell_volume(graph)[:, None, None] * out["stress"]
    if "stress" not in out and "virials" in out and out["virials"] is not None:
        vol = cell_volume(graph)
        safe = torch.where(vol > 0, vol, torch.ones_like(vol))
        out["stress"] = -out["virials"] / safe[:, None, None] * (vol > 0)[:, None, None]
    return out


def bec_signs(pred_bec: torch.Tensor, ref_bec: torch.Tensor, batch: torch.Tensor,
              num_structures: int) -> torch.Tensor:
    """Per-structure sign s ∈ {±1} [B] minimising Σ_i |s·Z_pred,i − Z_ref,i|² (detached)."""
    dots = (pred_bec.detach() * ref_bec.detach()).flatten(1).sum(1)
    per_structure = torch.zeros(num_structures, dtype=dots.dtype, device=dots.device)
    per_structure.index_add_(0, batch, dots)
    return torch.where(per_structure < 0, -torch.ones_like(per_structure), torch.ones_like(per_structure))


def _errors(term: str, pred: Mapping[str, torch.Tensor], graph: Mapping[str, torch.Tensor]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weighted squared error summed per row [rows], mask [rows]) for one term.

    Rows are structures for energy/stress/virials/dipole and atoms for forces/BEC. The squared
    error is already averaged over the components (3 for vectors, 9 for tensors).
    """
    ref = graph[LABEL_KEYS[term]]
    num_atoms = graph[NUM_ATOMS].to(ref.dtype)
    n_struct = graph[NUM_ATOMS].shape[0]
    weight = config_weight(graph, ref)
    batch = graph[BATCH]
    p = pred[term]
    if term == "energy":
        err = ((p - ref) / num_atoms) ** 2
        mask = structure_mask(graph, "energy", n_struct)
        return weight * err, mask
    if term == "forces":
        err = ((p - ref) ** 2).mean(-1)
        mask = structure_mask(graph, "forces", ref.shape[0], per_atom=True)
        return weight[batch] * err, mask
    if term == "stress":
        err = ((p - ref) ** 2).flatten(1).mean(-1)
        return weight * err, structure_mask(graph, "stress", n_struct)
    if term == "virials":
        err = (((p - ref) / num_atoms[:, None, None]) ** 2).flatten(1).mean(-1)
        return weight * err, structure_mask(graph, "virials", n_struct)
    if term == "dipole":
        err = (((p - ref) / num_atoms[:, None]) ** 2).mean(-1)
        return weight * err, structure_mask(graph, "dipole", n_struct)
    if term == "bec":
        s = bec_signs(p, ref, batch, n_struct)
        err = ((s[batch][:, None, None] * p - ref) ** 2).flatten(1).mean(-1)
        mask = structure_mask(graph, "bec", ref.shape[0], per_atom=True)
        return weight[batch] * err, mask
    raise KeyError(term)


class WeightedLoss(torch.nn.Module):
    """Σ_t weight_t · (Σ w·m·err_t² / Σ m) over the active terms t.

    Args:
        weights: {term: weight} for the terms of :data:`TERMS` (missing terms: 0); a run takes
            them from ``training.loss_weights`` (`polarmace.config.LossWeights`, its defaults).
    """

    def __init__(self, weights: Mapping[str, float]):
        super().__init__()
        weights = dict(weights)
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)}; valid terms are {list(TERMS)}")
        self.requested = {t: float(weights.get(t, 0.0) or 0.0) for t in TERMS}
        self.weights = dict(self.requested)
        self._resolved = False

    # ----------------------------------------------------------------- label availability
    def resolve(self, available: Iterable[str], log_active: bool = True,
                explicit: Optional[Iterable[str]] = None) -> Dict[str, float]:
        """Zero the weight of every requested term whose label is absent from the data.

        `available` are the label names the data carries (any structure). `explicit` are the
        terms the user set in the config (None: all of them): an explicit term without label
        gives ONE warning naming every such term; a defaulted one is only logged. The active
        terms are logged. Returns the effective weights.
        """
        available = set(available)
        explicit = set(TERMS) if explicit is None else set(explicit)
        missing = [t for t, w in self.requested.items() if w > 0 and LABEL_KEYS[t] not in available]
        self.weights = {t: (0.0 if t in missing else w) for t, w in self.requested.items()}
        loud = [t for t in missing if t in explicit]
        quiet = [t for t in missing if t not in explicit]
        if loud:
            msg = ("loss term(s) " + ", ".join(f"'{t}' (weight {self.requested[t]:g})" for t in loud)
                   + " requested by the config but the label is absent from the training data: "
                   "weight set to 0")
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        if quiet and log_active:
            log.info("default loss term(s) %s off: no such label in the training data", ", ".join(quiet))
        if log_active:
            log.info("active loss terms: %s", self.describe())
        self._resolved = True
        return dict(self.weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Change requested weights (stage two); terms dropped for missing labels stay at 0."""
        for t, w in weights.items():
            if t not in TERMS:
                raise ValueError(f"unknown loss term '{t}'")
            if self.weights.get(t, 0.0) == 0.0 and self.requested.get(t, 0.0) > 0.0:
                continue  # dropped because the label is absent
            self.requested[t] = float(w)
            self.weights[t] = float(w)

    def active(self) -> Tuple[str, ...]:
        return tuple(t for t in TERMS if self.weights[t] > 0)

    def describe(self) -> str:
        act = [f"{t}={self.weights[t]:g}" for t in self.active()]
        return ", ".join(act) if act else "(none)"

    @property
    def needs_stress(self) -> bool:
        return self.weights["stress"] > 0 or self.weights["virials"] > 0

    @property
    def needs_bec(self) -> bool:
        return self.weights["bec"] > 0

    # ----------------------------------------------------------------------------- loss
    def counts(self, graph: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Denominators Σ m per term [len(TERMS)] (0 for inactive terms); all-reduce these in DDP."""
        ref = graph[POSITIONS]
        out = torch.zeros(len(TERMS), dtype=ref.dtype, device=ref.device)
        n_struct = graph[NUM_ATOMS].shape[0]
        for k, t in enumerate(TERMS):
            if self.weights[t] <= 0 or LABEL_KEYS[t] not in graph:
                continue
            per_atom = t in ("forces", "bec")
            size = graph[LABEL_KEYS[t]].shape[0] if per_atom else n_struct
            out[k] = structure_mask(graph, LABEL_KEYS[t], size, per_atom=per_atom).sum()
        return out

    def forward(self, pred: Mapping[str, torch.Tensor], graph: Mapping[str, torch.Tensor],
                counts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and the unweighted per-term mean squared errors (detached).

        `counts` overrides the denominators (global counts in data-parallel training).
        """
        pred = fill_derived(dict(pred), graph)
        if counts is None:
            counts = self.counts(graph)
        total = graph[POSITIONS].new_zeros(())
        terms: Dict[str, torch.Tensor] = {}
        for k, t in enumerate(TERMS):
            w = self.weights[t]
            if w <= 0 or LABEL_KEYS[t] not in graph:
                continue
            if t not in pred or pred[t] is None:
                raise KeyError(f"loss term '{t}' is active but the model did not return '{t}'")
            err, mask = _errors(t, pred, graph)
            denom = counts[k].clamp(min=1.0)
            mse = (err * mask).sum() / denom
            total = total + w * mse
            terms[t] = mse.detach()
        return total, terms

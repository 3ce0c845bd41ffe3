"""Neighbour lists for batches of periodic, open and slab structures (matscipy).

The list is an index computation and is not differentiated; edge vectors are recomputed from
positions, cell and integer shifts with torch so that forces and stress flow through them:

    vector_e = positions[j] - positions[i] + shifts_e @ cell[batch[i]]

`edge_index[0]` is the centre atom i and `edge_index[1]` the neighbour j. Both directions of
every pair are present; a periodic image of the atom itself (i == j, shift != 0) is included.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from matscipy.neighbours import neighbour_list


def _search_cell(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                 cutoff: float) -> Tuple[np.ndarray, np.ndarray]:
    """A cell matscipy can bin in: open directions get a box that holds every atom.

    Returns (shifted positions, cell). Only non-periodic lattice vectors are replaced; the
    replaced vector is orthogonal to the periodic ones, which is what an open direction means.
    """
    if pbc.all():
        return positions, cell
    cell = cell.copy()
    extent = positions.max(axis=0) - positions.min(axis=0) if len(positions) else np.zeros(3)
    if not pbc.any():
        lengths = extent + 2.0 * cutoff + 1.0
        return positions - positions.min(axis=0) + cutoff, np.diag(lengths)
    periodic = [a for a in range(3) if pbc[a]]
    for a in range(3):
        if pbc[a]:
            continue
        if len(periodic) == 2:
            normal = np.cross(cell[periodic[0]], cell[periodic[1]])
        else:  # one periodic direction: any vector orthogonal to it and to the other open one
            trial = np.eye(3)[a]
            normal = trial - cell[periodic[0]] * (trial @ cell[periodic[0]]) / (cell[periodic[0]] @ cell[periodic[0]])
        normal = normal / np.linalg.norm(normal)
        span = positions @ normal
        cell[a] = normal * (span.max() - span.min() + 2.0 * cutoff + 1.0)
        positions = positions - normal * (span.min() - cutoff)
    return positions, cell


def neighbour_pairs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    cutoff: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All pairs within `cutoff` (Å), per structure of a batch.

    Args:
        positions: [N, 3] Å.
        cell: [B, 3, 3], rows are lattice vectors (ignored along open directions).
        pbc: [B, 3] bool.
        batch: [N] structure index of every atom, sorted ascending.
        cutoff: radius in Å.

    Raises polarmace.errors.DataError (before any search) for a periodic direction whose
    lattice plane spacing is below polarmace.data.atoms.MIN_DISTANCE.

    Returns:
        edge_index [2, E] (int64, on positions.device) and shifts [E, 3] (integer-valued, in
        positions.dtype) such that vector = positions[j] - positions[i] + shifts @ cell[batch[i]].
    """
    from polarmace.data.schema import check_cell  # lazy: polarmace.data imports this module

    pos = positions.detach().cpu().double().numpy()
    cells = cell.detach().cpu().double().numpy()
    flags = pbc.detach().cpu().numpy().astype(bool)
    counts = torch.bincount(batch.detach().cpu(), minlength=cell.shape[0]).numpy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    senders, receivers, all_shifts = [], [], []
    for b, (start, n) in enumerate(zip(starts, counts)):
        if n == 0:
            continue
        # a near-zero lattice vector would make matscipy search ~cutoff/width images: no end
        check_cell(cells[b], flags[b], f"structure {b} of the batch")
        p, c = _search_cell(pos[start:start + n], cells[b], flags[b], cutoff)
        i, j, s = neighbour_list("ijS", positions=p, cell=c, pbc=flags[b], cutoff=float(cutoff))
        receivers.append(i + start)
        senders.append(j + start)
        all_shifts.append(s)
    if receivers:
        i = np.concatenate(receivers)
        j = np.concatenate(senders)
        s = np.concatenate(all_shifts)
    else:
        i = j = np.zeros(0, dtype=np.int64)
        s = np.zeros((0, 3))
    edge_index = torch.from_numpy(np.stack([i, j]).astype(np.int64)).to(positions.device)
    shifts = torch.from_numpy(s.astype(np.float64)).to(device=positions.device, dtype=positions.dtype)
    return edge_index, shifts


def edge_vectors(positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                 edge_index: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Differentiable edge vectors r_j - r_i + shift·cell, [E, 3] Å."""
    i, j = edge_index[0], edge_index[1]
    image = torch.einsum("ea,eab->eb", shifts, cell[batch[i]])
    return positions[j] - positions[i] + image

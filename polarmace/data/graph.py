"""Batches of structures as graph dicts (the model's input; keys and shapes in
:mod:`polarmace.data.keys`) and the batch sampler."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data

from ..neighbours import neighbour_pairs
from .keys import (ATOMIC_NUMBERS, BATCH, BEC, BEC_MASK, CELL, DIPOLE, DIPOLE_MASK, EDGE_INDEX, ENERGY,
                   ENERGY_MASK, EXTERNAL_FIELD, FORCES, FORCES_MASK, HOST_ATOMIC_NUMBER_COUNTS,
                   HOST_CELL, HOST_NUM_ATOMS, HOST_PBC, HOST_RECEIVER_DEGREE, LABELS, NUM_ATOMS, PBC, POSITIONS, PTR,
                   SHIFTS, STRESS, STRESS_MASK, TOTAL_CHARGE, VIRIALS, VIRIALS_MASK, WEIGHT, mask_key)
from .schema import LABEL_NAMES, PER_ATOM_LABELS, Configuration, stack_label

__all__ = [
    "POSITIONS", "ATOMIC_NUMBERS", "BATCH", "PTR", "CELL", "PBC", "EDGE_INDEX", "SHIFTS", "TOTAL_CHARGE",
    "EXTERNAL_FIELD", "NUM_ATOMS", "WEIGHT", "ENERGY", "FORCES", "STRESS", "VIRIALS", "DIPOLE", "BEC",
    "ENERGY_MASK", "FORCES_MASK", "STRESS_MASK", "VIRIALS_MASK", "DIPOLE_MASK", "BEC_MASK",
    "LABELS", "PER_ATOM_LABELS", "mask_key", "collate", "host_facts", "BatchSampler",
]

assert LABELS == LABEL_NAMES
# PER_ATOM_LABELS (forces, bec; from .schema): masks [N]; the other labels have masks [B].


def collate(configurations: Sequence[Configuration], cutoff: float, dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Batch structures into one graph dict with neighbour lists within `cutoff` (Å)."""
    if len(configurations) == 0:
        raise ValueError("cannot collate an empty list of structures")
    counts = np.array([c.num_atoms for c in configurations], dtype=np.int64)
    nb = len(configurations)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    positions = torch.from_numpy(np.concatenate([c.positions for c in configurations])).to(dtype)
    cell = torch.from_numpy(np.stack([c.cell for c in configurations])).to(dtype)
    pbc = torch.from_numpy(np.stack([c.pbc for c in configurations]).astype(bool))
    batch = torch.from_numpy(np.repeat(np.arange(nb, dtype=np.int64), counts))
    edge_index, shifts = neighbour_pairs(positions, cell, pbc, batch, cutoff)
    field, _ = stack_label(configurations, "external_field")
    graph: Dict[str, torch.Tensor] = {
        POSITIONS: positions,
        ATOMIC_NUMBERS: torch.from_numpy(np.concatenate([c.atomic_numbers for c in configurations]).astype(np.int64)),
        BATCH: batch,
        PTR: torch.from_numpy(ptr),
        CELL: cell,
        PBC: pbc,
        EDGE_INDEX: edge_index,
        SHIFTS: shifts,
        TOTAL_CHARGE: torch.tensor([c.total_charge for c in configurations], dtype=dtype),
        EXTERNAL_FIELD: torch.from_numpy(field).to(dtype),
        NUM_ATOMS: torch.from_numpy(counts),
        WEIGHT: torch.tensor([c.weight for c in configurations], dtype=dtype),
    }
    graph.update(host_facts(graph[ATOMIC_NUMBERS].numpy(), edge_index.numpy(), cell.numpy(), pbc.numpy(), counts))
    for label in LABELS:
        values, present = stack_label(configurations, label)
        if not present.any():
            continue
        mask = np.repeat(present, counts) if label in PER_ATOM_LABELS else present
        graph[label] = torch.from_numpy(values).to(dtype)
        graph[mask_key(label)] = torch.from_numpy(mask).to(dtype)
    return graph


def host_facts(atomic_numbers: np.ndarray, edge_index: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
               num_atoms: np.ndarray) -> Dict[str, torch.Tensor]:
    """The host-side facts of a batch (see polarmace.data.keys), CPU tensors, from its atomic
    numbers [N], edge_index [2, E], cell [B,3,3] Å, pbc [B,3] and atoms per structure [B]."""
    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    centres = np.asarray(edge_index, dtype=np.int64).reshape(2, -1)[0]
    if z.size and (z.min() < 1 or z.max() > 118):
        raise ValueError(f"invalid atomic number {int(z.min()) if z.min() < 1 else int(z.max())}")
    return {
        HOST_ATOMIC_NUMBER_COUNTS: torch.from_numpy(np.bincount(z, minlength=119)),
        HOST_RECEIVER_DEGREE: torch.from_numpy(np.bincount(centres, minlength=len(z))),
        HOST_CELL: torch.from_numpy(np.array(cell, dtype=np.float64).reshape(-1, 3, 3)),
        HOST_PBC: torch.from_numpy(np.array(pbc, dtype=bool).reshape(-1, 3)),
        HOST_NUM_ATOMS: torch.from_numpy(np.array(num_atoms, dtype=np.int64).reshape(-1)),
    }


class BatchSampler(torch.utils.data.Sampler):
    """Batches of structure indices, by count and/or by a cap on the summed size.

    Structures are taken in order (or in a seeded random order) and a batch is closed when
    adding the next one would exceed `batch_size` structures or `max_size` summed `sizes`
    (atoms per structure, or any other per-structure cost such as edges). A structure larger
    than `max_size` on its own is an error.

    Shuffling: epoch e uses the permutation of numpy's default_rng([seed, e]). The epoch
    counter starts at 0 and advances by one when a new iteration starts after one that yielded
    batches (torch's multi-worker loader calls iter() twice per epoch, so advancing on every
    iter() would skip epochs); `set_epoch(e)` pins the next iteration to epoch e. Two samplers
    with the same seed give the same sequence of batches.
    """

    def __init__(self, sizes: Sequence[int], batch_size: Optional[int] = None, max_size: Optional[int] = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if batch_size is None and max_size is None:
            raise ValueError("give batch_size and/or max_size")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"max_size must be >= 1, got {max_size}")
            too_big = np.flatnonzero(self.sizes > max_size)
            if len(too_big):
                b = int(too_big[0])
                raise ValueError(f"structure {b} has size {int(self.sizes[b])} (atoms), more than the maximum of "
                                 f"{max_size} per batch; raise max_atoms_per_batch to at least {int(self.sizes.max())}")
        self.batch_size = batch_size
        self.max_size = max_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self._started = False
        self._cache: Optional[tuple] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._started = False

    def batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """The batches of an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        key = (epoch if self.shuffle else 0,)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        n = len(self.sizes)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        out: List[List[int]] = []
        current: List[int] = []
        total = 0
        for index in order:
            size = int(self.sizes[index])
            full = (self.batch_size is not None and len(current) >= self.batch_size) or \
                   (self.max_size is not None and total + size > self.max_size)
            if current and full:
                out.append(current)
                current, total = [], 0
            current.append(int(index))
            total += size
        if current:
            complete = self.batch_size is None or len(current) == self.batch_size
            if complete or not self.drop_last:
                out.append(current)
        self._cache = (key, out)
        return out

    def __iter__(self) -> Iterator[List[int]]:
        if self._started:
            self.epoch += 1
            self._started = False
        return self._yield(self.batches())

    def _yield(self, batches: List[List[int]]) -> Iterator[List[int]]:
        for batch in batches:
            self._started = True
            yield batch

    def __len__(self) -> int:
        return len(self.batches())

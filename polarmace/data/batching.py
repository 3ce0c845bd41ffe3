"""Batches of a data set for training and evaluation.

The batches of an epoch are a pure function of (seed, epoch, sizes): `epoch_batches` cuts the
permutation ``numpy.random.default_rng([seed, epoch])`` of the indices into batches (by count,
or greedily by total atoms; see `polarmace.data.graph.BatchSampler`). A resumed run rebuilds
the same list and skips the batches it has done, which makes mid-epoch resumes bitwise exact.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .keys import HOST_KEYS
from .schema import Configuration
from .graph import BatchSampler, collate
from .sources import Subset

__all__ = ["epoch_batches", "iterate_graphs", "num_atoms_of", "to_device"]


def to_device(graph: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The graph dict on `device`, floating-point tensors cast to `dtype`; the host-side facts
    (`polarmace.data.keys.HOST_KEYS`) stay on the CPU."""
    out = {}
    for k, v in graph.items():
        if isinstance(v, torch.Tensor) and k not in HOST_KEYS:
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def num_atoms_of(dataset: Sequence[Configuration]) -> np.ndarray:
    """Atoms per structure [len(dataset)] (for batching by atoms); cheap for HDF5 sets and their
    subsets, which carry the sizes."""
    if isinstance(dataset, Subset):
        sizes = getattr(dataset.source, "num_atoms", None)
        if sizes is not None and not callable(sizes):
            return np.asarray(sizes, dtype=np.int64)[dataset.indices]
    sizes = getattr(dataset, "num_atoms", None)
    if sizes is not None and not callable(sizes):
        return np.asarray(sizes, dtype=np.int64)
    return np.array([dataset[i].num_atoms for i in range(len(dataset))], dtype=np.int64)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  num_atoms: Optional[np.ndarray] = None, max_atoms: Optional[int] = None) -> List[List[int]]:
    """Index batches of epoch `epoch`: a pure function of (n, batch_size, seed, epoch, sizes).

    With `max_atoms` a batch closes when the next structure would take it past that many atoms.
    """
    sizes = num_atoms if (max_atoms and num_atoms is not None) else np.ones(n, dtype=np.int64)
    sampler = BatchSampler(sizes, batch_size=batch_size, max_size=int(max_atoms) if max_atoms else None,
                           shuffle=shuffle, seed=int(seed))
    return [list(b) for b in sampler.batches(int(epoch))]


def iterate_graphs(dataset: Sequence[Configuration], batches: Sequence[Sequence[int]], r_max: float,
                   num_workers: int = 0) -> Iterator[Optional[Dict[str, torch.Tensor]]]:
    """Collated graphs (float64, neighbours within `r_max` Å) of the index batches, in order;
    None for an empty batch (a data-parallel rank's empty shard)."""
    if num_workers and num_workers > 0:
        nonempty = [list(b) for b in batches if len(b)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=nonempty, num_workers=num_workers,
                                             collate_fn=partial(collate, cutoff=r_max))
        it = iter(loader)
        for b in batches:
            yield next(it) if len(b) else None
        return
    for b in batches:
        yield collate([dataset[i] for i in b], cutoff=r_max) if len(b) else None

"""Element handling: atomic numbers -> element index, and the node embedding (one-hot -> C×0e)."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from ase.data import chemical_symbols as _ASE_SYMBOLS

CHEMICAL_SYMBOLS: List[str] = [str(s) for s in _ASE_SYMBOLS]


class ElementMapping(nn.Module):
    """Maps atomic numbers to 0..num_elements-1 in the order of `elements`.

    Unknown atomic numbers raise ValueError naming the element (also under TorchScript).
    """

    def __init__(self, elements: List[int]):
        super().__init__()
        elements = [int(z) for z in elements]
        if len(set(elements)) != len(elements):
            raise ValueError(f"duplicate atomic numbers in elements: {elements}")
        for z in elements:
            if z < 1 or z >= len(CHEMICAL_SYMBOLS):
                raise ValueError(f"invalid atomic number {z}")
        table = torch.full((len(CHEMICAL_SYMBOLS),), -1, dtype=torch.long)
        for i, z in enumerate(elements):
            table[z] = i
        self.register_buffer("table", table)
        self.elements = elements
        self.symbols = CHEMICAL_SYMBOLS
        self.num_elements = len(elements)

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        z = atomic_numbers.long()
        if z.numel() == 0:
            return z
        zmin = int(z.min())
        zmax = int(z.max())
        if zmin < 0 or zmax >= self.table.shape[0]:
            bad = zmin if zmin < 0 else zmax
            raise ValueError("invalid atomic number " + str(bad))
        idx = self.table[z]
        if bool((idx < 0).any()):
            unknown: List[int] = torch.unique(z[idx < 0]).tolist()
            names: List[str] = []
            for u in unknown:
                names.append(self.symbols[u] + " (Z=" + str(u) + ")")
            known: List[str] = []
            for e in self.elements:
                known.append(self.symbols[e])
            raise ValueError("element(s) not in the model: " + ", ".join(names)
                             + "; the model knows " + ", ".join(known))
        return idx


class ElementEmbedding(nn.Module):
    """One-hot element -> linear to C×0e (e3nn normalisation: weight N(0,1) / sqrt(num_elements))."""

    def __init__(self, num_elements: int, num_channels: int):
        super().__init__()
        self.num_elements = int(num_elements)
        self.num_channels = int(num_channels)
        self.weight = nn.Parameter(torch.randn(num_elements, num_channels))
        self.scale = 1.0 / math.sqrt(num_elements)

    def table(self) -> torch.Tensor:
        """[num_elements, C]: the embedding of every element."""
        return self.weight * self.scale

    def forward(self, element_index: torch.Tensor) -> torch.Tensor:
        return self.table()[element_index]

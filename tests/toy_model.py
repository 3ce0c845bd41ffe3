"""A small but real differentiable potential obeying the trainer's model contract.

    E_b = Σ_{i∈b} E0[z_i] + ½ Σ_{edges (i,j)} Σ_k W[z_i, z_j, k] φ_k(r_ij) f_c(r_ij)

with Gaussian radial functions φ_k, a cosine cutoff f_c and symmetric per-element-pair weights W.
Forces are −∂E/∂r and virials −∂E/∂ε through a symmetric strain applied to positions AND cell;
stress = −virials / V (ASE sign). Used to test the trainer before PolarMACE exists.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
from ase.data import atomic_numbers


class ToyModel(torch.nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = copy.deepcopy(config)
        mcfg = self.config["model"]
        self.r_max = float(mcfg.get("r_max", 5.0))
        dtype = getattr(torch, mcfg.get("dtype", "float64"))
        elements = list(mcfg["elements"])
        z = torch.tensor([atomic_numbers[s] for s in elements], dtype=torch.long)
        table = torch.full((119,), -1, dtype=torch.long)
        table[z] = torch.arange(len(elements))
        self.register_buffer("z_to_index", table, persistent=False)
        e0s = mcfg.get("e0s")
        e0 = torch.zeros(len(elements), dtype=dtype)
        if isinstance(e0s, dict):
            e0 = torch.tensor([float(e0s.get(s, 0.0)) for s in elements], dtype=dtype)
        self.register_buffer("e0", e0)
        nb = int(mcfg.get("num_bessel", 8))
        self.register_buffer("centres", torch.linspace(0.8, self.r_max, nb, dtype=dtype))
        self.width = 0.5 * (self.r_max - 0.8) / max(nb - 1, 1) + 0.2
        gen = torch.Generator().manual_seed(int(mcfg.get("seed", 0)))
        self.pair_weights = torch.nn.Parameter(
            0.01 * torch.randn(len(elements), len(elements), nb, generator=gen, dtype=dtype))
        self.shift = torch.nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, graph: Dict[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool = False, compute_bec: bool = False) -> Dict[str, torch.Tensor]:
        positions = graph["positions"]
        cell = graph["cell"]
        batch = graph["batch"]
        n_struct = cell.shape[0]
        i, j = graph["edge_index"]
        strain = torch.zeros_like(cell)
        if compute_stress:
            strain.requires_grad_(True)
        if compute_forces:
            positions = positions.detach().requires_grad_(True)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        pos = positions + torch.einsum("na,nab->nb", positions, sym[batch])
        cel = cell + torch.bmm(cell, sym)
        vec = pos[j] - pos[i] + torch.einsum("ea,eab->eb", graph["shifts"], cel[batch[i]])
        r = vec.norm(dim=-1)
        species = self.z_to_index[graph["atomic_numbers"]]
        w = 0.5 * (self.pair_weights + self.pair_weights.transpose(0, 1))
        phi = torch.exp(-((r[:, None] - self.centres) / self.width) ** 2)
        fc = 0.5 * (torch.cos(math.pi * r / self.r_max) + 1.0) * (r < self.r_max)
        edge_e = 0.5 * (w[species[i], species[j]] * phi).sum(-1) * fc
        node_e = self.e0[species] + self.shift
        node_e = node_e.index_add(0, i, edge_e)
        energy = torch.zeros(n_struct, dtype=node_e.dtype, device=node_e.device).index_add(0, batch, node_e)
        out = {"energy": energy, "node_energy": node_e}
        inputs = ([positions] if compute_forces else []) + ([strain] if compute_stress else [])
        if inputs:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=self.training, allow_unused=True)
            k = 0
            if compute_forces:
                out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
                k = 1
            if compute_stress:
                virials = -grads[k] if grads[k] is not None else torch.zeros_like(cell)
                vol = torch.linalg.det(cell).abs()
                safe = torch.where(vol > 0, vol, torch.ones_like(vol))
                out["virials"] = virials
                out["stress"] = -virials / safe[:, None, None] * (vol > 0)[:, None, None]
        return out

    def save(self, path) -> None:
        torch.save({"model_class": "toy_model:ToyModel", "config": self.config,
                    "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "ToyModel":
        blob = torch.load(path, map_location=map_location, weights_only=False)
        model = cls(blob["config"])
        model.load_state_dict(blob["state_dict"])
        return model


def build_toy_model(config: dict, statistics: Optional[dict] = None) -> ToyModel:
    """Model factory with the signature the trainer expects."""
    return ToyModel(config)

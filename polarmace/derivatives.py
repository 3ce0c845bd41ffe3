"""The one derivative engine: forces, virials and stress from one total energy and one symmetric
strain applied to positions AND cell (so the electrostatics see the strained cell).

    r' = r (I + ε_sym),  cell' = cell (I + ε_sym),  ε_sym = ½(ε + εᵀ)
    forces = −∂E/∂r,  virials = −∂E/∂ε,  stress = (1/V) ∂E/∂ε  (ASE sign convention)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def apply_strain(positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                 displacement: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Strained positions [N,3] and cell [B,3,3] for a displacement gradient ε [B,3,3]."""
    sym = 0.5 * (displacement + displacement.transpose(1, 2))
    positions = positions + torch.einsum("na,nab->nb", positions, sym[batch])
    cell = cell + torch.bmm(cell, sym)
    return positions, cell


def energy_derivatives(energy: torch.Tensor, positions: torch.Tensor,
                       displacement: Optional[torch.Tensor], cell: torch.Tensor,
                       compute_forces: bool, compute_stress: bool, create_graph: bool
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(forces [N,3] eV/Å, virials [B,3,3] eV, stress [B,3,3] eV/Å³) from one autograd call.

    `positions` and `displacement` are the leaves the energy was computed from; `cell` is the
    unstrained cell (for the volume). Open structures (zero volume) get zero stress.
    """
    inputs: List[torch.Tensor] = [positions]
    if compute_stress and displacement is not None:
        inputs.append(displacement)
    grads = torch.autograd.grad([energy.sum()], inputs, create_graph=create_graph,
                                retain_graph=True, allow_unused=True)
    forces: Optional[torch.Tensor] = None
    virials: Optional[torch.Tensor] = None
    stress: Optional[torch.Tensor] = None
    if compute_forces:
        g = grads[0]
        forces = -g if g is not None else torch.zeros_like(positions)
    if compute_stress and displacement is not None:
        g = grads[1]
        if g is None:
            g = torch.zeros_like(displacement)
        virials = -g
        volume = torch.linalg.det(cell).abs()
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        stress = torch.where((volume > 0)[:, None, None], g / safe[:, None, None], torch.zeros_like(g))
    return forces, virials, stress

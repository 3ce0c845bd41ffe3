"""One-step (non-self-consistent) linear response: induced charges and dipoles (docs/method.md §3).

From the potential φ_i and field E_i of the permanent multipoles (plus an external field):

    Δq_i = −κ_i (φ_i − μ̄_b)          energy −½ Σ κ_i (φ_i − μ̄_b)²
    Δμ_i = α_i F_i,  F_i = E_i + E_ext  energy −½ Σ F_i·α_i·F_i

μ̄_b = 0 reproduces the original method; μ̄_b = Σκφ/Σκ per structure conserves the total charge
(the Lagrange multiplier of Σ Δq = 0). Both energies are the minima of the quadratic response
functionals Σ Δq²/(2κ) + Σ Δq φ and Σ μ α⁻¹ μ/2 − μ·F, so −∂E/∂E_ext is the induced dipole.
Units: κ in e/V, α in e·Å²/V (multiply by k_e for Å³).
"""

from __future__ import annotations

from typing import Tuple

import torch


def segment_sum(values: torch.Tensor, batch: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of `values` [N, ...] per structure -> [B, ...]."""
    out = torch.zeros((num_segments,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch, values)


def induced_charges(potential: torch.Tensor, kappa: torch.Tensor, batch: torch.Tensor,
                    num_structures: int, conserve: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Induced charges [N] (e) and response energy per structure [B] (eV).

    Args:
        potential: [N] V, potential at each site (permanent multipoles + external).
        kappa: [N] e/V, charge softness, ≥ 0.
        conserve: [B] bool, whether Σ Δq = 0 is imposed in that structure.
    """
    kphi = segment_sum(kappa * potential, batch, num_structures)
    ksum = segment_sum(kappa, batch, num_structures)
    safe = torch.where(ksum > 0, ksum, torch.ones_like(ksum))
    mean_potential = torch.where(conserve & (ksum > 0), kphi / safe, torch.zeros_like(kphi))
    shifted = potential - mean_potential[batch]
    dq = -kappa * shifted
    energy = -0.5 * segment_sum(kappa * shifted * shifted, batch, num_structures)
    return dq, energy


def induced_dipoles(field: torch.Tensor, alpha: torch.Tensor, batch: torch.Tensor,
                    num_structures: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Induced dipoles [N,3] (e·Å) and energy per structure [B] (eV).

    Args:
        field: [N,3] V/Å, total field F_i (permanent multipoles + external).
        alpha: [N] isotropic or [N,3,3] symmetric polarizability, e·Å²/V.
    """
    if alpha.dim() == 1:
        dmu = alpha.unsqueeze(-1) * field
    else:
        dmu = torch.einsum("nab,nb->na", alpha, field)
    energy = -0.5 * segment_sum((field * dmu).sum(-1), batch, num_structures)
    return dmu, energy

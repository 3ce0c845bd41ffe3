"""Electrical observables from (latent) multipoles: polarization, Born effective charges and
polarizability (docs/method.md §5).

Polarization. Open structures: P = Σ q_i r_i + Σ μ_i (e·Å). Periodic directions use the phase
form: along lattice direction a, P̃_a = (1/2πi) Σ_j q_j exp(2πi s_ja) with fractional
coordinates s = r·cell⁻¹; the reported Cartesian polarization is Σ_a a_a Re(P̃_a) + Σ μ
(for small displacements Re(P̃_a) ≈ Σ q s_a). Slabs: phase form in-plane, plain along the normal.

Born effective charges Z*_i,cb = ∂P_c/∂r_ib by autograd, with the charges and dipoles being
functions of the positions (the model's graph). For periodic directions
    Z*_i = Σ_a a_a ⊗ Re[exp(−2πi s_ia) ∂P̃_a/∂r_i]
which gives q_i·I for fixed charges in any triclinic cell, and for charges that depend on
neighbours the minimum-image-like weight sin(2π Δs)/2π. Physical units: multiply by √ε_e,
ε_e = ε∞/(1 + χ), χ = Σ tr(α_i)/3 / (ε0 V) (water ε∞ = 1.78, MAPbI3 4.7).
"""

import math
from typing import List, Optional

import torch

from polarmace.units import COULOMB, EPSILON0
from polarmace.electrostatics.response import segment_sum


def _fractional(positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                periodic: torch.Tensor) -> torch.Tensor:
    """Fractional coordinates [N,3] (zeros for atoms of open structures)."""
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    safe_cell = torch.where(periodic[:, None, None], cell, eye)
    inv = torch.linalg.inv(safe_cell)
    return torch.einsum("na,nab->nb", positions, inv[batch])


def polarization(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                 batch: torch.Tensor, charges: torch.Tensor,
                 dipoles: Optional[torch.Tensor] = None,
                 host_pbc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total dipole / polarization per structure [B,3] in e·Å (see module docstring).
    host_pbc: a CPU copy of pbc, to route without a device sync."""
    b = cell.shape[0]
    periodic = pbc.any(dim=1)
    open_atoms = (~periodic[batch]).to(positions.dtype).unsqueeze(-1)
    p = segment_sum(charges.unsqueeze(-1) * positions * open_atoms, batch, b)
    if bool((pbc if host_pbc is None else host_pbc).any()):
        s = _fractional(positions, cell, batch, periodic)
        phase = torch.sin(2.0 * math.pi * s) / (2.0 * math.pi)
        per_dir = torch.where(pbc[batch], phase, s) * (1.0 - open_atoms)   # [N,3]
        frac = segment_sum(charges.unsqueeze(-1) * per_dir, batch, b)      # [B,3]
        p = p + torch.einsum("ba,bac->bc", frac, cell)
    if dipoles is not None:
        p = p + segment_sum(dipoles, batch, b)
    return p


def _grad(output: torch.Tensor, positions: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not output.requires_grad:  # e.g. zero dipoles: no dependence on the positions
        return torch.zeros_like(positions)
    g = torch.autograd.grad([output], [positions], retain_graph=True, create_graph=create_graph,
                            allow_unused=True)[0]
    return torch.zeros_like(positions) if g is None else g


def born_effective_charges(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                           batch: torch.Tensor, charges: torch.Tensor,
                           dipoles: Optional[torch.Tensor] = None,
                           create_graph: bool = False,
                           host_pbc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Z*[i, c, b] = ∂P_c/∂r_ib in e (latent units), [N,3,3].

    `charges` and `dipoles` must be differentiable functions of `positions` (or constants).
    host_pbc: a CPU copy of pbc, to route without a device sync.
    """
    if not positions.requires_grad:
        raise ValueError("born_effective_charges: 'positions' must require grad "
                         "(compute the charges from positions with autograd enabled)")
    n = positions.shape[0]
    periodic = pbc.any(dim=1)
    open_atoms = (~periodic[batch]).to(positions.dtype)
    z = positions.new_zeros(n, 3, 3)
    host_periodic = (pbc if host_pbc is None else host_pbc).any(dim=1)
    if bool((~host_periodic).any()):
        for c in range(3):
            total = (charges * positions[:, c] * open_atoms).sum()
            z[:, c, :] = z[:, c, :] + _grad(total, positions, create_graph) * open_atoms.unsqueeze(-1)
    if bool(host_periodic.any()):
        s = _fractional(positions, cell, batch, periodic)
        theta = 2.0 * math.pi * s
        weight = 1.0 - open_atoms
        cos_t = torch.cos(theta).detach()
        sin_t = torch.sin(theta).detach()
        cell_atoms = cell[batch]                                           # [N,3,3]
        for a in range(3):
            re = (charges * torch.sin(theta[:, a]) * weight).sum() / (2.0 * math.pi)
            im = -(charges * torch.cos(theta[:, a]) * weight).sum() / (2.0 * math.pi)
            g_re = _grad(re, positions, create_graph)
            g_im = _grad(im, positions, create_graph)
            lin = (charges * s[:, a] * weight).sum()
            g_lin = _grad(lin, positions, create_graph)
            phase_part = cos_t[:, a:a + 1] * g_re + sin_t[:, a:a + 1] * g_im   # [N,3]
            along = torch.where(pbc[batch][:, a:a + 1], phase_part, g_lin)
            # Z[i, c, b] += cell[a, c] * along[i, b]
            z = z + cell_atoms[:, a, :, None] * along[:, None, :] * weight[:, None, None]
    if dipoles is not None:
        for c in range(3):
            z[:, c, :] = z[:, c, :] + _grad(dipoles[:, c].sum(), positions, create_graph)
    return z


def isotropic_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """tr(α)/3 per atom [N] from α [N] (isotropic) or [N,3,3], in the units of α."""
    return alpha if alpha.dim() == 1 else torch.diagonal(alpha, dim1=1, dim2=2).sum(-1) / 3.0


def electronic_screening(eps_infty: float, alpha: Optional[torch.Tensor], cell: torch.Tensor,
                         pbc: torch.Tensor, batch: torch.Tensor,
                         epsilon0: float = EPSILON0) -> torch.Tensor:
    """ε_e = ε∞/(1 + χ) per structure [B]; χ = Σ tr(α)/3/(ε0 V), 0 for open structures."""
    b = cell.shape[0]
    eps = torch.full((b,), float(eps_infty), dtype=cell.dtype, device=cell.device)
    if alpha is None:
        return eps
    trace = isotropic_alpha(alpha)
    periodic = pbc.any(dim=1)
    volume = torch.where(periodic, torch.linalg.det(cell).abs(), torch.ones_like(eps))
    chi = torch.where(periodic, segment_sum(trace, batch, b) / (epsilon0 * volume),
                      torch.zeros_like(eps))
    return eps / (1.0 + chi)


def cell_polarizability(alpha: torch.Tensor, batch: torch.Tensor, num_structures: int,
                        screening: Optional[torch.Tensor] = None,
                        coulomb: float = COULOMB) -> torch.Tensor:
    """Σ_i α_i per structure as [B,3,3] in Å³ (α in e·Å²/V times k_e, times ε_e if given)."""
    if alpha.dim() == 1:
        alpha = alpha[:, None, None] * torch.eye(3, dtype=alpha.dtype, device=alpha.device)
    total = segment_sum(alpha, batch, num_structures) * coulomb
    if screening is not None:
        total = total * screening[:, None, None]
    return total


def field_response(dipole: torch.Tensor, external_field: torch.Tensor,
                   create_graph: bool = False) -> torch.Tensor:
    """∂P_a/∂E_ext,b per structure [B,3,3] (e·Å²/V) by autograd; external_field must require grad."""
    rows: List[torch.Tensor] = []
    for a in range(3):
        g = torch.autograd.grad([dipole[:, a].sum()], [external_field], retain_graph=True,
                                create_graph=create_graph, allow_unused=True)[0]
        rows.append(torch.zeros_like(external_field) if g is None else g)
    return torch.stack(rows, dim=1)

"""Reciprocal energy of Gaussian charges with hand-written first and second derivatives.

The training fast path of the latent-charge (`les`) model in small periodic cells. A force-
trained loss differentiates the energy twice; autograd's double backward of the structure
factor walks about 45 elementwise passes over the [B, N, K] phase table per step. Written out,
the energy, its gradient and the gradient's vector–Jacobian product need about 25, because they
share cos(k·r), sin(k·r) and the structure factor. Per structure, with C = cos(R Kᵀ),
S = sin(R Kᵀ) [N, K], A = qᵀC, B = qᵀS and the half-space weights w (see ewald.py):

    E      = ½ Σ_k w (A² + B²)
    φ_j    = ∂E/∂q_j = [C (wA) + S (wB)]_j
    ∂E/∂r_j = q_j H_j,           H = C (wB∘k) − S (wA∘k)          [N, 3]

and for upstream gradients h_r [N,3] (of ∂E/∂r) and h_q [N] (of φ), with U = q∘(h_r Kᵀ),
Ã = h_qᵀC − Σ_j U∘S and B̃ = h_qᵀS + Σ_j U∘C (the derivative of the structure factor along
h), the second-order terms are

    ∂/∂q_j = [C (wÃ) + S (wB̃)]_j + h_r,j·H_j
    ∂/∂r_j = q_j [C (wB̃∘k) − S (wÃ∘k)]_j − [(U∘P) K]_j + h_q,j H_j,   P = C∘wA + S∘wB.

Scope: charges only, a cell that needs no gradient (no stress: the k-vectors and weights are
constants), eager mode. The engine uses it only then and otherwise takes the autograd path of
`ewald.reciprocal_energy`. Derivatives beyond the second raise (once_differentiable).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from polarmace.electrostatics import ewald

__all__ = ["charge_reciprocal_energy"]


def _potential_and_h(cos: torch.Tensor, sin: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor,
                     k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """φ [B,N] = C wA + S wB and H [B,N,3] = C (wB∘k) − S (wA∘k), in two GEMMs."""
    left = torch.cat([wa.unsqueeze(-1), wb.unsqueeze(-1) * k], dim=-1)      # [B,K,4]
    right = torch.cat([wb.unsqueeze(-1), -wa.unsqueeze(-1) * k], dim=-1)
    out = ewald.contract_k(cos, left) + ewald.contract_k(sin, right)  # [B,N,4]
    return out[..., 0], out[..., 1:]


class _FirstDerivatives(torch.autograd.Function):
    """(g_E ∂E/∂r [B,N,3], g_E ∂E/∂q [B,N]) with the hand-written second-order backward.
    cos and sin of the phases come from the energy's forward pass: `pos` is an input only so
    that the position gradient has a place to go (the phases are not recomputed)."""

    @staticmethod
    def forward(ctx, pos, q, grad_energy, cos, sin, k, w):
        a = torch.bmm(q.unsqueeze(1), cos).squeeze(1)                       # [B,K]
        b = torch.bmm(q.unsqueeze(1), sin).squeeze(1)
        wa, wb = w * a, w * b
        phi, h = _potential_and_h(cos, sin, wa, wb, k)
        ctx.save_for_backward(q, grad_energy, k, w, cos, sin, wa, wb, phi, h)
        g = grad_energy.view(-1, 1)
        return g.unsqueeze(-1) * q.unsqueeze(-1) * h, g * phi

    @staticmethod
    @once_differentiable
    def backward(ctx, h_r, h_q):
        q, grad_energy, k, w, cos, sin, wa, wb, phi, h = ctx.saved_tensors
        g = grad_energy.view(-1, 1)
        d_r = q.unsqueeze(-1) * h                                          # ∂E/∂r unscaled
        u = q.unsqueeze(-1) * ewald.phases(h_r, k)  # [B,N,K]
        u_cos = u * cos
        u_sin = u * sin
        a_t = torch.bmm(h_q.unsqueeze(1), cos).squeeze(1) - u_sin.sum(1)  # [B,K]
        b_t = torch.bmm(h_q.unsqueeze(1), sin).squeeze(1) + u_cos.sum(1)
        phi_t, h_t = _potential_and_h(cos, sin, w * a_t, w * b_t, k)
        grad_q = phi_t + (h_r * h).sum(-1)
        up = u_cos * wa.unsqueeze(1) + u_sin * wb.unsqueeze(1)             # U∘P
        grad_r = q.unsqueeze(-1) * h_t - ewald.contract_k(up, k) + h_q.unsqueeze(-1) * h
        grad_g = (h_r * d_r).sum((1, 2)) + (h_q * phi).sum(1)
        return g.unsqueeze(-1) * grad_r, g * grad_q, grad_g, None, None, None, None


class _Energy(torch.autograd.Function):
    """E [B] = ½ Σ_k w |S(k)|² of padded charges; its backward is a differentiable Function."""

    @staticmethod
    def forward(ctx, pos, q, k, w):
        phase = ewald.phases(pos, k)
        cos, sin = torch.cos(phase), torch.sin(phase)
        a = torch.bmm(q.unsqueeze(1), cos).squeeze(1)
        b = torch.bmm(q.unsqueeze(1), sin).squeeze(1)
        ctx.save_for_backward(pos, q, k, w, cos, sin)
        return 0.5 * (w * (a * a + b * b)).sum(1)

    @staticmethod
    def backward(ctx, grad_energy):
        pos, q, k, w, cos, sin = ctx.saved_tensors
        grad_r, grad_q = _FirstDerivatives.apply(pos, q, grad_energy, cos, sin, k, w)
        return grad_r, grad_q, None, None


def charge_reciprocal_energy(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor,
                             q: torch.Tensor, beta: float, kvecs: torch.Tensor,
                             kmask: torch.Tensor, taper_start: float = 0.0,
                             taper_end: float = 0.0,
                             host_num_atoms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reciprocal energy [B] (eV) of charges q [N] (e) at positions [N,3] (Å); the same value
    and derivatives as ``ewald.reciprocal_energy(..., mu=None, theta=None)``.

    The cell must not require grad (use the autograd path for stress)."""
    if cell.requires_grad or kvecs.requires_grad:
        raise ValueError("charge_reciprocal_energy: the cell must not require grad (stress); "
                         "use ewald.reciprocal_energy")
    num_structures = cell.shape[0]
    flat, nmax = ewald._padded_layout(batch, num_structures, host_num_atoms)
    pos_pad = ewald._to_padded(positions, flat, num_structures, nmax)
    q_pad = ewald._to_padded(q.unsqueeze(1), flat, num_structures, nmax).squeeze(-1)
    w = ewald._kspace_weights(cell, kvecs, kmask, beta, taper_start=taper_start,
                              taper_end=taper_end)
    return _Energy.apply(pos_pad, q_pad, kvecs, w)

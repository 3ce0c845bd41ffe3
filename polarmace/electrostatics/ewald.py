"""Reciprocal-space (k-sum) part of the Ewald sum for Gaussian-smeared multipoles, batched.

Conventions are those of docs/method.md §2. Rows of ``cell`` are lattice
vectors; reciprocal vectors are ``k = 2π n·(cell⁻¹)ᵀ`` (so ``k·a_b = 2π n_b``), the volume is
``V = |det cell|`` and either handedness works. The structure factor of the sources is

    S(k) = Σ_j (q_j + i k·μ_j − ½ kᵀΘ_j k) e^{ik·r_j}

and with the reciprocal kernel ``g(k) = exp(−k²/(4β²))/k²`` (the Fourier transform of
``k_e·erf(βr)/r`` is ``4π k_e g(k)`` and ``4π k_e = 1/ε0``):

    φ_i = (1/(ε0 V)) Σ_{k≠0} g(k) Re[S(k) e^{−ik·r_i}]
    E_i = −∇φ_i = −(1/(ε0 V)) Σ_{k≠0} g(k) k Im[S(k) e^{−ik·r_i}]
    G_i = ∇E_i  =  (1/(ε0 V)) Σ_{k≠0} g(k) k kᵀ Re[S(k) e^{−ik·r_i}]
    E_rec = (1/(2 ε0 V)) Σ_{k≠0} g(k) |S(k)|²  =  ½ Σ_i (q_i φ_i − μ_i·E_i − ½ Θ_i:G_i)

All summands are even under k → −k (S(−k) = S(k)* for real sources), so only one k of each ±k
pair is stored ("half space": the first non-zero integer index is positive) and the sums carry a
factor 2. The fields INCLUDE each site's interaction with its own smeared image at distance 0
and with its periodic images; the caller subtracts the r → 0 self term. β = a = 1/(√2 σ) turns
the reciprocal kernel into the full smeared kernel exp(−σ²k²/2): the reciprocal-only sum of the
original latent-Ewald method.

Batching: atoms of all structures are flat ([N], with ``batch`` [N] giving the structure), the
k-sets are padded to the largest one ([B, K, 3] with a bool mask [B, K], padding k = 0 with
weight 0). Inside, atoms are laid out padded per structure ([B, N_max], empty slots carry zero
moments), so that per chunk of k-vectors the work is batched GEMMs and one cos and one sin of
[B, N_max, K_chunk] (no per-element gathers or scatters):

    phase = r·kᵀ;  S_re, S_im from Mᵀcos, Mᵀsin (M = moment columns [q | μ | Θ]);
    [φ | E | G] = cos·Y_cos + sin·Y_sin  with Y built from w(k)·S(k) and k, k kᵀ.

Memory: the forward pass holds [B, N_max, K_chunk] intermediates; under autograd three such
tensors per chunk (phase, cos, sin) are kept for the backward pass, i.e. 3·B·N_max·K numbers
(≈ 0.7 GB in float64 for 1,536 atoms with the σ = 1, 1e-6 converged set): use PME for larger
systems.

Two k-sets:
- :func:`converged_kvectors`: every k with 0 < |k| ≤ kmax (a sphere; ``kmax_for_accuracy`` gives
  kmax for a relative accuracy of the Gaussian factor). The sphere is a property of the
  reciprocal lattice, so the result does not depend on the choice of cell (lattice reduction) and
  changes smoothly with strain up to the stated accuracy.
- :func:`les_kvectors`: the truncated set of the original method (compatibility mode).

Everything is TorchScript-compatible, works in float32 and float64 (the dtype of the inputs) and
is twice differentiable w.r.t. positions, multipoles and cell (the integer k-indices are chosen
without autograd; k itself is recomputed from the integers and the cell with torch ops, so stress
flows through k and V).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from polarmace.units import EPSILON0

__all__ = [
    "kmax_for_accuracy",
    "converged_kvectors",
    "les_kvectors",
    "reciprocal_site_fields",
    "reciprocal_energy",
]


def kmax_for_accuracy(beta: float, accuracy: float) -> float:
    """kmax (1/Å) at which the reciprocal Gaussian exp(−k²/(4β²)) has fallen to ``accuracy``."""
    if not (0.0 < accuracy < 1.0):
        raise ValueError(f"accuracy must lie in (0, 1), got {accuracy}")
    if not beta > 0.0:
        raise ValueError(f"beta must be positive, got {beta}")
    return 2.0 * beta * math.sqrt(math.log(1.0 / accuracy))


def _kvectors_from_bounds(cell: torch.Tensor, bounds: torch.Tensor, kmax2: torch.Tensor,
                          select_cell: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half-space k-vectors with |n_a| ≤ bounds[b, a] and 0 < |k|² ≤ kmax2[b], padded per structure.

    cell [B,3,3]; bounds [B,3] int64; kmax2 [B] (float64). Returns (k [B,K,3], mask [B,K]).
    The selection runs in float64 on a detached cell (`select_cell`, e.g. a host copy, with
    bounds and kmax2 on its device); k is recomputed from `cell` with autograd.
    """
    target = cell.device
    if select_cell is None:
        select_cell = cell.detach()
    device = select_cell.device
    nstruct = cell.shape[0]
    if nstruct == 0:
        return (torch.zeros((0, 0, 3), dtype=cell.dtype, device=device),
                torch.zeros((0, 0), dtype=torch.bool, device=device))
    mmax = bounds.max(dim=0).values  # [3] one integer grid for the whole batch
    m0 = int(mmax[0])
    m1 = int(mmax[1])
    m2 = int(mmax[2])
    r0 = torch.arange(0, m0 + 1, dtype=torch.int64, device=device)  # half space: n_0 ≥ 0
    r1 = torch.arange(-m1, m1 + 1, dtype=torch.int64, device=device)
    r2 = torch.arange(-m2, m2 + 1, dtype=torch.int64, device=device)
    g0, g1, g2 = torch.meshgrid([r0, r1, r2], indexing="ij")
    grid = torch.stack([g0.reshape(-1), g1.reshape(-1), g2.reshape(-1)], dim=1)  # [G,3]
    # first non-zero index positive: one of each ±n pair, n = 0 excluded
    half = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0)) | (
        (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
    grid = grid[half]
    recip = 2.0 * math.pi * torch.linalg.inv(select_cell.to(torch.float64)).transpose(1, 2)
    k_all = torch.einsum("ga,bac->bgc", grid.to(torch.float64), recip)  # [B,G,3]
    k2 = (k_all * k_all).sum(dim=-1)
    inside = (grid.abs().unsqueeze(0) <= bounds.unsqueeze(1)).all(dim=-1)  # [B,G]
    keep = inside & (k2 <= kmax2.unsqueeze(1)) & (k2 > 0.0)
    counts = keep.sum(dim=1)
    kpad = int(counts.max()) if counts.numel() > 0 else 0
    # stable sort puts the kept entries first in each row
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True)[1][:, :kpad]  # [B,K]
    keep_sorted = torch.gather(keep, 1, order)
    n_sel = (grid[order] * keep_sorted.unsqueeze(-1).to(torch.int64)).to(target)  # padding → n = 0, k = 0
    mask = keep_sorted.to(target)
    # differentiable w.r.t. the cell: k = 2π n (cell⁻¹)ᵀ
    recip_grad = 2.0 * math.pi * torch.linalg.inv(cell).transpose(1, 2)
    kvecs = torch.einsum("bka,bac->bkc", n_sel.to(cell.dtype), recip_grad)
    return kvecs, mask


def converged_kvectors(cell: torch.Tensor, kmax: Union[float, torch.Tensor],
                       host_cell: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """All reciprocal vectors with 0 < |k| ≤ kmax, one of each ±k pair, padded per structure.

    Args:
        cell: [B,3,3] rows = lattice vectors (triclinic, either handedness).
        kmax: cut-off in 1/Å, a float or a [B] tensor (per structure).

    Returns:
        kvecs [B,K,3] (padding entries are 0) and mask [B,K] bool. Differentiable w.r.t. cell.

    Since n_a = k·a_a/(2π), |k| ≤ kmax implies |n_a| ≤ kmax·|a_a|/(2π): the integer ranges are
    exact for any cell shape. `host_cell` (a CPU copy of cell) moves the selection to the host,
    so that an accelerator is not synchronised to size the set.
    """
    select = cell.detach() if host_cell is None else host_cell.detach()
    if isinstance(kmax, torch.Tensor):
        kmax_t = kmax.detach().to(device=select.device, dtype=torch.float64).expand(cell.shape[0])
    else:
        kmax_t = torch.full((cell.shape[0],), float(kmax), dtype=torch.float64,
                            device=select.device)
    lengths = torch.linalg.norm(select.to(torch.float64), dim=-1)  # [B,3] |a_a|
    bounds = torch.floor(kmax_t.unsqueeze(1) * lengths / (2.0 * math.pi) + 1e-6).to(torch.int64)
    return _kvectors_from_bounds(cell, bounds, kmax_t * kmax_t, select)


def les_kvectors(cell: torch.Tensor, dl: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compatibility mode: the truncated k-set of the original latent-Ewald method.

    For each lattice direction n_a ∈ [−m_a, m_a] with m_a = max(1, ⌊|a_a|/dl⌋); of those, keep
    0 < |k|² ≤ (2π/dl)² (one of each ±k pair, as in :func:`converged_kvectors`).

    Use it only to reproduce published models. With the default dl = 2 Å the cut-off
    |k| ≤ π/Å is NOT converged for σ = 1 Å (the Gaussian exp(−σ²k²/2) is still ≈ 7e-3 there),
    and because the sphere |k| ≤ 2π/dl is fixed while the reciprocal lattice scales with the
    cell, k-vectors carrying that non-negligible weight enter and leave the set under strain:
    the energy jumps along a strain path (stress and the equation of state are not smooth).
    The box never cuts into the sphere (|n_a| ≤ |k||a_a|/(2π) ≤ |a_a|/dl), so the set equals
    ``converged_kvectors(cell, 2π/dl)``: the truncation, not the box, is the difference.

    Returns kvecs [B,K,3], mask [B,K] (padding 0 / False), differentiable w.r.t. cell.
    """
    lengths = torch.linalg.norm(cell.detach().to(torch.float64), dim=-1)  # [B,3]
    bounds = torch.clamp(torch.floor(lengths / dl), min=1.0).to(torch.int64)
    kmax2 = torch.full((cell.shape[0],), (2.0 * math.pi / dl) ** 2, dtype=torch.float64,
                       device=cell.device)
    return _kvectors_from_bounds(cell, bounds, kmax2)


def _auto_chunk(rows: int, chunk_size: int) -> int:
    if chunk_size > 0:
        return chunk_size
    # about 2^20 elements per [B, N_max, K_chunk] intermediate
    return max(64, (1 << 20) // max(rows, 1))


def _kspace_weights(cell: torch.Tensor, kvecs: torch.Tensor, kmask: torch.Tensor,
                    beta: float, epsilon0: float = EPSILON0, taper_start: float = 0.0,
                    taper_end: float = 0.0) -> torch.Tensor:
    """w[b,k] = 2 exp(−k²/(4β²)) / (ε0 V k²) on the half set (2: the −k partner); 0 on padding.

    (ε0 is a default argument because TorchScript cannot read module-level floats.)
    """
    k2 = (kvecs * kvecs).sum(dim=-1)
    k2 = torch.where(kmask, k2, torch.ones_like(k2))
    volume = torch.abs(torch.linalg.det(cell))  # [B]
    w = 2.0 * torch.exp(-k2 / (4.0 * beta * beta)) / (epsilon0 * volume.unsqueeze(1) * k2)
    if taper_start > 0.0:
        w = w * smooth_taper(torch.sqrt(k2), taper_start, taper_end)
    return torch.where(kmask, w, torch.zeros_like(w))


def smooth_taper(k: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """1 below `start`, 0 above `end`, C² quintic switch in between (1/Å).

    With the k-set cut at `end`, every k-vector enters or leaves the sum with zero weight and
    zero first and second derivatives, so E(strain) has no jumps even though the set changes.
    """
    x = torch.clamp((k - start) / (end - start), 0.0, 1.0)
    return 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)


def _padded_layout(batch: torch.Tensor, num_structures: int,
                   host_num_atoms: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """Flat index b·N_max + (position of the atom within its structure) [N], and N_max.

    Works for any order of `batch` (a stable sort gives each atom its slot). `host_num_atoms`
    [B] (a CPU copy of the atoms per structure) sizes the layout without a device sync.
    """
    if host_num_atoms is not None:
        nmax = int(host_num_atoms.max()) if host_num_atoms.numel() > 0 else 0
        counts = host_num_atoms.to(batch.device)
    else:
        counts = torch.bincount(batch, minlength=num_structures)
        nmax = int(counts.max()) if counts.numel() > 0 else 0
    start = torch.cumsum(counts, 0) - counts
    order = torch.sort(batch, stable=True)[1]
    slot = torch.empty_like(batch)
    slot[order] = torch.arange(batch.shape[0], dtype=batch.dtype, device=batch.device) \
        - start[batch[order]]
    return batch * nmax + slot, nmax


def _to_padded(x: torch.Tensor, flat: torch.Tensor, num_structures: int, nmax: int) -> torch.Tensor:
    """[N, P] → [B, N_max, P] with zeros in the empty slots (differentiable)."""
    out = torch.zeros((num_structures * nmax, x.shape[1]), dtype=x.dtype, device=x.device)
    return out.index_copy(0, flat, x).reshape(num_structures, nmax, x.shape[1])


def _source_moments(q: torch.Tensor, mu: Optional[torch.Tensor],
                    theta: Optional[torch.Tensor]) -> torch.Tensor:
    """Columns [q | μ (3) | Θ (9)] per atom, as many as are present: [N, 1 / 4 / 13]."""
    cols = [q.unsqueeze(1)]
    if mu is not None:
        cols.append(mu)
    if theta is not None:
        if mu is None:
            cols.append(torch.zeros((q.shape[0], 3), dtype=q.dtype, device=q.device))
        cols.append(theta.reshape(-1, 9))
    return torch.cat(cols, dim=1)


def phases(pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """k·r [B,N,K] from pos [B,N,3] and k [B,K,3]; einsum avoids bmm's slow path for an
    inner dimension of 3 (0.4 ms against 3 ms for [4, 64, 2348] on this CPU)."""
    return torch.einsum("bna,bka->bnk", pos, k)


def contract_k(table: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Σ_k table[b,n,k] coeffs[b,k,c] -> [B,N,C] for a few columns C.

    Written as (coeffsᵀ tableᵀ)ᵀ: BLAS then streams the rows of the [N, K] table, 2–3× faster
    than bmm(table, coeffs) when C is 3–13 (measured on this CPU)."""
    return torch.bmm(coeffs.transpose(1, 2).contiguous(), table.transpose(1, 2)).transpose(1, 2)


class _CosSin(torch.autograd.Function):
    """(cos x, sin x) that keeps its outputs for the backward pass.

    Autograd's own cos and sin save the input and evaluate sin and cos again in every backward
    (and twice more in a force-trained double backward): 13 transcendental passes over
    [B, N, K] per training step instead of 2. Here d cos = −sin dx and d sin = cos dx reuse the
    outputs, and because the backward is written with differentiable ops on those outputs it
    can be differentiated any number of times."""

    @staticmethod
    def forward(ctx, phase: torch.Tensor):
        cos = torch.cos(phase)
        sin = torch.sin(phase)
        ctx.save_for_backward(cos, sin)
        return cos, sin

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return grad_sin * cos - grad_cos * sin


@torch.jit.unused
def _cos_sin_saved(phase: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _CosSin.apply(phase)


def cos_sin(phase: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `phase`; under autograd (eager) through :class:`_CosSin`."""
    if torch.jit.is_scripting() or not phase.requires_grad:
        return torch.cos(phase), torch.sin(phase)
    return _cos_sin_saved(phase)


def _structure_factor(phase: torch.Tensor, moments: torch.Tensor, k: torch.Tensor,
                      kk: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin of the phases [B,Nmax,Kc] and Re, Im of S(k) [B,Kc].

    S(k) = Σ_j (q_j + i k·μ_j − ½ kᵀΘ_j k)(cos + i sin): the sums over atoms are the GEMMs
    Mᵀcos and Mᵀsin of the moment columns M [B,Nmax,P]; the k-dependent coefficients are
    applied afterwards on [B,P,Kc].
    """
    cos, sin = cos_sin(phase)
    moments_t = moments.transpose(1, 2)  # [B,P,Nmax]
    mc = torch.bmm(moments_t, cos)  # [B,P,Kc]
    ms = torch.bmm(moments_t, sin)
    s_re = mc[:, 0]
    s_im = ms[:, 0]
    num_p = moments.shape[2]
    if num_p > 1:  # dipoles: amplitude i k·μ
        s_re = s_re - (k * ms[:, 1:4].transpose(1, 2)).sum(-1)
        s_im = s_im + (k * mc[:, 1:4].transpose(1, 2)).sum(-1)
    if num_p > 4 and kk is not None:  # quadrupoles: amplitude −½ kᵀΘk
        s_re = s_re - 0.5 * (kk * mc[:, 4:13].transpose(1, 2)).sum(-1)
        s_im = s_im - 0.5 * (kk * ms[:, 4:13].transpose(1, 2)).sum(-1)
    return cos, sin, s_re, s_im


def reciprocal_site_fields(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor,
                           q: torch.Tensor, mu: Optional[torch.Tensor],
                           theta: Optional[torch.Tensor], beta: float, kvecs: torch.Tensor,
                           kmask: torch.Tensor, need_gradient: bool = False,
                           chunk_size: int = 0, taper_start: float = 0.0, taper_end: float = 0.0,
                           host_num_atoms: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Reciprocal-space potential, field and (optionally) field gradient at every site.

    Args:
        positions [N,3] Å; batch [N] int64 structure index; cell [B,3,3];
        q [N] e; mu [N,3] e·Å or None; theta [N,3,3] e·Å² (traceless second moment) or None;
        beta: Ewald splitting parameter (1/Å), kernel k_e·erf(βr)/r;
        kvecs [B,K,3], kmask [B,K] from :func:`converged_kvectors` or :func:`les_kvectors`
        (computed from the same ``cell`` if stress is needed);
        need_gradient: also return G [N,3,3];
        chunk_size: k-vectors per chunk (≤ 0: automatic, about 2^20 elements per
        [B, N_max, K_chunk] intermediate);
        host_num_atoms [B]: CPU copy of the atoms per structure (no device sync), or None.

    Returns:
        phi [N] V, field [N,3] V/Å, G [N,3,3] V/Å² or None — from all sources of the atom's
        structure INCLUDING the atom itself (its smeared image at r = 0 and periodic images).

    Atoms are laid out padded per structure ([B, N_max]); per chunk of k the work is one phase
    GEMM, cos and sin of [B, N_max, K_chunk], and GEMMs with the moments and the k-weights.
    """
    num_atoms = positions.shape[0]
    num_structures = cell.shape[0]
    num_k = kvecs.shape[1]
    num_out = 13 if need_gradient else 4
    out = torch.zeros((num_atoms, num_out), dtype=positions.dtype, device=positions.device)
    if num_k > 0 and num_atoms > 0:
        flat, nmax = _padded_layout(batch, num_structures, host_num_atoms)
        pos_pad = _to_padded(positions, flat, num_structures, nmax)
        moments = _to_padded(_source_moments(q, mu, theta), flat, num_structures, nmax)
        weights = _kspace_weights(cell, kvecs, kmask, beta, taper_start=taper_start,
                                  taper_end=taper_end)  # [B,K]
        out_pad = torch.zeros((num_structures, nmax, num_out), dtype=positions.dtype,
                              device=positions.device)
        step = _auto_chunk(num_structures * nmax, chunk_size)
        for start in range(0, num_k, step):
            stop = min(start + step, num_k)
            k = kvecs[:, start:stop]  # [B,Kc,3]
            kk: Optional[torch.Tensor] = None
            if theta is not None or need_gradient:
                kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).reshape(k.shape[0], k.shape[1], 9)
            phase = phases(pos_pad, k)  # [B,Nmax,Kc]
            cos, sin, s_re, s_im = _structure_factor(phase, moments, k, kk)
            w = weights[:, start:stop]
            x_re = (w * s_re).unsqueeze(-1)  # [B,Kc,1]
            x_im = (w * s_im).unsqueeze(-1)
            # φ = Σ_k C x_re + S x_im ; E = Σ_k k (S x_re − C x_im) ; G = Σ_k kk (C x_re + S x_im)
            y_cos = [x_re, -x_im * k]
            y_sin = [x_im, x_re * k]
            if kk is not None and need_gradient:
                y_cos.append(x_re * kk)
                y_sin.append(x_im * kk)
            out_pad = out_pad + contract_k(cos, torch.cat(y_cos, dim=-1)) \
                + contract_k(sin, torch.cat(y_sin, dim=-1))
        out = out_pad.reshape(num_structures * nmax, num_out)[flat]
    grad: Optional[torch.Tensor] = None
    if need_gradient:
        grad = out[:, 4:13].reshape(num_atoms, 3, 3)
    return out[:, 0], out[:, 1:4], grad


def reciprocal_energy(positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor,
                      q: torch.Tensor, mu: Optional[torch.Tensor], theta: Optional[torch.Tensor],
                      beta: float, kvecs: torch.Tensor, kmask: torch.Tensor,
                      chunk_size: int = 0, taper_start: float = 0.0,
                      taper_end: float = 0.0, host_num_atoms: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """E_rec [B] = (1/(2 ε0 V)) Σ_{k≠0} exp(−k²/(4β²))/k² |S(k)|² (eV), self-image included.

    Same arguments as :func:`reciprocal_site_fields` (including the taper); equals
    ½ Σ_i (q_i φ_i − μ_i·E_i − ½ Θ_i:G_i) of its site fields at about half the cost, since
    only the structure factor is needed (the engine's route when no site fields are asked for).
    """
    num_structures = cell.shape[0]
    energy = torch.zeros((num_structures,), dtype=positions.dtype, device=positions.device)
    num_k = kvecs.shape[1]
    if num_k == 0 or positions.shape[0] == 0:
        return energy
    flat, nmax = _padded_layout(batch, num_structures, host_num_atoms)
    pos_pad = _to_padded(positions, flat, num_structures, nmax)
    moments = _to_padded(_source_moments(q, mu, theta), flat, num_structures, nmax)
    weights = _kspace_weights(cell, kvecs, kmask, beta, taper_start=taper_start,
                              taper_end=taper_end)
    step = _auto_chunk(num_structures * nmax, chunk_size)
    for start in range(0, num_k, step):
        stop = min(start + step, num_k)
        k = kvecs[:, start:stop]
        kk: Optional[torch.Tensor] = None
        if theta is not None:
            kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).reshape(k.shape[0], k.shape[1], 9)
        phase = phases(pos_pad, k)
        _, _, s_re, s_im = _structure_factor(phase, moments, k, kk)
        # half-set weights carry the factor 2 of the ±k pair; the energy has ½ in front
        energy = energy + 0.5 * (weights[:, start:stop] * (s_re * s_re + s_im * s_im)).sum(dim=1)
    return energy

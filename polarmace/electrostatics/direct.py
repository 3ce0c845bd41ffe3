"""Direct pair sums of smeared-multipole potentials, fields and field gradients.

* `open_site_fields`: open boundaries, all pairs i ≠ j within each structure (kernel
  k_e erf(a r)/r, no Ewald split). Structures of a batch are padded to the largest one and
  processed together (no Python loop over structures); receivers are processed in row blocks
  so that the temporary pair tensors stay bounded; each unordered pair is evaluated once.
  Cost (2,000 atoms, q + μ + Θ with field gradients, energy + forces by autograd, float64, one
  CPU thread): ~4 s CPU and ~1.2 GB peak RSS; float32 about half of both.
* `real_space_site_fields`: the short-range part [erf(a r) − erf(β r)]/r of a periodic Ewald /
  PME sum over a neighbour list from `polarmace.neighbours` (pairs with r > 0 only, images of
  the atom itself included).

Both return, per site i, the potential φ_i [N] (V), the field E_i [N,3] (V/Å) and, when
requested, the field gradient G_i,ab = ∂_a E_b [N,3,3] (V/Å²) from all other sources; see
`kernels.pair_site_fields` for the formulas and docs/method.md §2 for the conventions.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from polarmace.electrostatics.kernels import pair_site_fields, radial_derivatives, required_order

__all__ = ["open_site_fields", "real_space_site_fields", "DEFAULT_CHUNK_PAIRS"]

#: Default number of (receiver, source) pairs evaluated at once by `open_site_fields`.
DEFAULT_CHUNK_PAIRS = 1 << 20


def _pad(x: Tensor, flat: Tensor, num: int) -> Tensor:
    """Scatter per-site rows into a zero-padded [num, ...] tensor (differentiable)."""
    shape = [num] + list(x.shape[1:])
    return torch.zeros(shape, dtype=x.dtype, device=x.device).index_copy(0, flat, x)


def _receive(
    Bl: List[Tensor],
    R: Tensor,
    q_e: Tensor,
    mu_e: Optional[Tensor],
    mu_g: Optional[Tensor],
    theta_e: Optional[Tensor],
    theta_g: Optional[Tensor],
    half_tr_e: Optional[Tensor],
    need_gradient: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fields at the receivers (rows) of a [B, c, m] block of pairs, summed over the sources
    (columns).

    Same formulas as `kernels.pair_site_fields`, in a component-first layout so that every
    elementwise operation runs over contiguous [B, c, m] planes and every sum over sources is
    a reduction over the contiguous last dimension or a batched matrix product.

    Args:
        Bl: radial derivatives B_n, each [B, c, m] (zero for excluded pairs).
        R: [B, 3, c, m] receiver minus source.
        q_e [B, 1, m], mu_e [B, 3, 1, m], theta_e [B, 3, 3, 1, m], half_tr_e [B, 1, m]: the
            sources' charges, dipoles, quadrupoles and ½ tr Θ, shaped to broadcast.
        mu_g [B, m, 3], theta_g [B, m, 9]: the same sources as matrices for the sums
            Σ_j B_n μ_j and Σ_j B_n Θ_j.

    Returns:
        phi [B, c], field [B, c, 3], gradient [B, c, 3, 3] or None.
    """
    b0 = Bl[0]
    b1 = Bl[1]
    s0 = q_e * b0
    s1 = q_e * b1
    s2 = s1
    if need_gradient:
        s2 = q_e * Bl[2]
    tR: Optional[Tensor] = None
    w: Optional[Tensor] = None
    field_extra: Optional[Tensor] = None
    grad_extra: Optional[Tensor] = None
    if mu_e is not None and mu_g is not None:
        mr = mu_e[:, 0] * R[:, 0] + mu_e[:, 1] * R[:, 1] + mu_e[:, 2] * R[:, 2]
        s0 = s0 + mr * b1
        s1 = s1 + mr * Bl[2]
        field_extra = -torch.bmm(b1, mu_g)
        if need_gradient:
            s2 = s2 + mr * Bl[3]
            w = Bl[2].unsqueeze(1) * mu_e
    if theta_e is not None and theta_g is not None and half_tr_e is not None:
        t = theta_e[:, :, 0] * R[:, 0:1]
        t = t + theta_e[:, :, 1] * R[:, 1:2]
        t = t + theta_e[:, :, 2] * R[:, 2:3]  # ΘR, [B, 3, c, m]
        tR = t
        h = 0.5 * (t[:, 0] * R[:, 0] + t[:, 1] * R[:, 1] + t[:, 2] * R[:, 2])
        s0 = s0 + h * Bl[2] - half_tr_e * b1
        s1 = s1 + h * Bl[3] - half_tr_e * Bl[2]
        if need_gradient:
            s2 = s2 + h * Bl[4] - half_tr_e * Bl[3]
            wt = Bl[3].unsqueeze(1) * t
            w = wt if w is None else w + wt
            g9 = torch.bmm(Bl[2], theta_g)
            grad_extra = -g9.view(g9.shape[0], g9.shape[1], 3, 3)
    vec = s1.unsqueeze(1) * R
    if tR is not None:
        vec = vec - Bl[2].unsqueeze(1) * tR
    field = vec.sum(dim=3).transpose(1, 2)
    if field_extra is not None:
        field = field + field_extra
    phi = s0.sum(dim=2)
    grad: Optional[Tensor] = None
    if need_gradient:
        half = (0.5 * s2).unsqueeze(1) * R
        w2 = -half if w is None else w - half
        m = torch.einsum("bxij,byij->bixy", R, w2)
        s1_sum = s1.sum(dim=2)
        g = m + m.transpose(-1, -2) + torch.diag_embed(s1_sum.unsqueeze(-1).expand(-1, -1, 3))
        if grad_extra is not None:
            g = g + grad_extra
        grad = g
    return phi, field, grad


def open_site_fields(
    positions: Tensor,
    batch: Tensor,
    q: Tensor,
    mu: Optional[Tensor],
    theta: Optional[Tensor],
    sigma: float,
    need_gradient: bool,
    chunk_size: int = DEFAULT_CHUNK_PAIRS,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Potential, field (and field gradient) at every site from all other sites of its structure.

    Each unordered pair is evaluated once (radial derivatives shared by both directions; the
    reverse direction uses −R). Structures are padded to the largest one ([B, n_max] slots,
    masks for padding and j ≤ i); receivers are processed in row blocks [i0, i1) against the
    columns [i0, n_max), each block of at most ~chunk_size pairs; radial derivatives are
    evaluated only for the real pairs of a block.

    Args:
        positions: [N, 3] Å.
        batch: [N] int64 structure index, sorted ascending.
        q: [N] charges (e); mu: [N, 3] dipoles (e Å) or None; theta: [N, 3, 3] symmetric
           (traceless) quadrupoles, second-moment convention (e Å²), or None.
        sigma: Gaussian width (Å); 0 for point multipoles.
        need_gradient: also compute the field gradient.
        chunk_size: number of (receiver, source) pairs evaluated at once (bounds the
            temporaries; with autograd the saved tensors of all pairs are kept regardless).

    Returns:
        phi [N] (V), field [N, 3] (V/Å), field gradient [N, 3, 3] (V/Å²) or None.

    Raises:
        ValueError: two different sites of one structure at the same position.
    """
    n_sites = positions.shape[0]
    dtype = positions.dtype
    device = positions.device
    if n_sites == 0:
        empty_g: Optional[Tensor] = None
        if need_gradient:
            empty_g = positions.new_zeros(0, 3, 3)
        return positions.new_zeros(0), positions.new_zeros(0, 3), empty_g
    order = required_order(mu is not None, theta is not None, need_gradient)

    # Padded [B, n_max] layout (structure b, slot l); vectors component-first, [B, 3, n_max].
    n_struct = int(batch[-1].item()) + 1
    counts = torch.bincount(batch, minlength=n_struct)
    n_max = int(counts.max().item())
    offsets = torch.cumsum(counts, dim=0) - counts
    local = torch.arange(n_sites, device=device) - offsets[batch]
    flat = batch * n_max + local
    num = n_struct * n_max
    pos_t = _pad(positions, flat, num).view(n_struct, n_max, 3).transpose(1, 2).contiguous()
    q_p = _pad(q, flat, num).view(n_struct, n_max)
    valid = torch.zeros(num, dtype=torch.bool, device=device).index_fill(0, flat, True)
    valid = valid.view(n_struct, n_max)
    mu_g: Optional[Tensor] = None
    mu_t: Optional[Tensor] = None
    if mu is not None:
        mu_g = _pad(mu, flat, num).view(n_struct, n_max, 3)
        mu_t = mu_g.transpose(1, 2).contiguous()
    th_g: Optional[Tensor] = None
    th_t: Optional[Tensor] = None
    half_tr: Optional[Tensor] = None
    if theta is not None:
        th = _pad(theta, flat, num).view(n_struct, n_max, 3, 3)
        th_g = th.reshape(n_struct, n_max, 9)
        th_t = th.permute(0, 2, 3, 1).contiguous()  # [B, 3, 3, n_max]
        half_tr = 0.5 * (th[:, :, 0, 0] + th[:, :, 1, 1] + th[:, :, 2, 2])

    slots = torch.arange(n_max, device=device)
    n_out = 4 + (9 if need_gradient else 0)  # phi, field, grad packed per site
    row_parts: List[Tensor] = []
    col_total = torch.zeros(n_struct, n_max, n_out, dtype=dtype, device=device)
    i0 = 0
    while i0 < n_max:
        m = n_max - i0
        # rows per block: ~chunk_size pairs, and at most max(32, m/8) rows so that the wasted
        # lower triangle of the block (j ≤ i, masked) stays small
        c = min(m, max(1, chunk_size // max(1, n_struct * m)), max(32, m // 8))
        i1 = i0 + c
        R = pos_t[:, :, i0:i1, None] - pos_t[:, :, None, i0:]  # [B, 3, c, m], r_i − r_j
        mask = valid[:, i0:i1, None] & valid[:, None, i0:]
        mask = mask & (slots[i0:i1, None] < slots[None, i0:]).unsqueeze(0)  # j > i
        r2 = (R * R).sum(dim=1)
        overlap = (r2 == 0.0) & mask
        if bool(overlap.any()):
            bad = torch.nonzero(overlap)[0]
            raise ValueError(
                "open_site_fields: two sites of structure {} (slots {} and {}) share the same "
                "position; check the positions (overlapping atoms)".format(
                    int(bad[0].item()), int(bad[1].item()) + i0, int(bad[2].item()) + i0))
        # radial derivatives only for the pairs that exist (j > i, both real sites)
        pair_idx = torch.nonzero(mask.reshape(-1)).flatten()
        r = torch.sqrt(r2.reshape(-1).index_select(0, pair_idx))
        Bv = radial_derivatives(r, sigma, 0.0, order).t()  # [k, P_valid], contiguous
        Bt = torch.zeros(order + 1, mask.numel(), dtype=dtype, device=device)
        Bl = Bt.index_copy(1, pair_idx, Bv).view(order + 1, n_struct, c, m).unbind(0)
        # rows receive from the columns
        mu_e: Optional[Tensor] = None
        mu_s: Optional[Tensor] = None
        th_e: Optional[Tensor] = None
        th_s: Optional[Tensor] = None
        ht_e: Optional[Tensor] = None
        if mu_t is not None and mu_g is not None:
            mu_e = mu_t[:, :, None, i0:]
            mu_s = mu_g[:, i0:]
        if th_t is not None and th_g is not None and half_tr is not None:
            th_e = th_t[:, :, :, None, i0:]
            th_s = th_g[:, i0:]
            ht_e = half_tr[:, None, i0:]
        phi_r, field_r, grad_r = _receive(Bl, R, q_p[:, None, i0:], mu_e, mu_s, th_e, th_s, ht_e,
                                          need_gradient)
        # columns receive from the rows: the same computation on the transposed block (made
        # contiguous, so that the sums over sources stay reductions over the last dimension)
        Bl_t = [b.transpose(1, 2).contiguous() for b in Bl]
        R_t = -R.transpose(2, 3).contiguous()  # [B, 3, m, c], column minus row
        if mu_t is not None and mu_g is not None:
            mu_e = mu_t[:, :, None, i0:i1]
            mu_s = mu_g[:, i0:i1]
        if th_t is not None and th_g is not None and half_tr is not None:
            th_e = th_t[:, :, :, None, i0:i1]
            th_s = th_g[:, i0:i1]
            ht_e = half_tr[:, None, i0:i1]
        phi_c, field_c, grad_c = _receive(Bl_t, R_t, q_p[:, None, i0:i1], mu_e, mu_s, th_e, th_s,
                                          ht_e, need_gradient)
        parts_r = [phi_r.unsqueeze(-1), field_r]
        parts_c = [phi_c.unsqueeze(-1), field_c]
        if grad_r is not None and grad_c is not None:
            parts_r.append(grad_r.reshape(n_struct, c, 9))
            parts_c.append(grad_c.reshape(n_struct, m, 9))
        row_parts.append(torch.cat(parts_r, dim=-1))
        block_c = torch.cat(parts_c, dim=-1)
        col_total = col_total + torch.nn.functional.pad(block_c, [0, 0, i0, 0])
        i0 = i1
    total = (torch.cat(row_parts, dim=1) + col_total).reshape(num, n_out).index_select(0, flat)
    phi = total[:, 0]
    field = total[:, 1:4]
    grad: Optional[Tensor] = None
    if need_gradient:
        grad = total[:, 4:].reshape(n_sites, 3, 3)
    return phi, field, grad


def real_space_site_fields(
    positions: Tensor,
    cell: Tensor,
    batch: Tensor,
    edge_index: Tensor,
    shifts: Tensor,
    q: Tensor,
    mu: Optional[Tensor],
    theta: Optional[Tensor],
    sigma: float,
    beta: float,
    need_gradient: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Short-range Ewald part over a neighbour list: kernel k_e [erf(a r) − erf(β r)]/r.

    Args:
        positions: [N, 3] Å; cell: [B, 3, 3] (rows are lattice vectors); batch: [N].
        edge_index: [2, E] (centre i = receiver, neighbour j = source) and shifts [E, 3] from
            `polarmace.neighbours.neighbour_pairs`; the edge vector r_j − r_i + shift·cell is
            −R with R = r_i − r_j − shift·cell the receiver-minus-source vector of the kernel.
        q, mu, theta: per-site multipoles (sources), as in `open_site_fields`.
        sigma: Gaussian width (Å), 0 for point multipoles; beta: Ewald parameter (1/Å), ≤ a.
        need_gradient: also compute the field gradient.

    Returns:
        phi [N], field [N, 3], field gradient [N, 3, 3] or None, summed over the edges at
        their centre atom.

    Raises:
        ValueError: an edge of zero length (two atoms, or an atom and an image, overlap).
    """
    n_sites = positions.shape[0]
    i = edge_index[0]
    j = edge_index[1]
    image = torch.einsum("ea,eab->eb", shifts, cell[batch[i]])
    R = positions[i] - positions[j] - image
    r2 = (R * R).sum(dim=1)
    zero_len = r2 == 0.0
    if bool(zero_len.any()):
        e = int(torch.nonzero(zero_len)[0, 0].item())
        raise ValueError(
            "real_space_site_fields: edge {} between atoms {} and {} has zero length; check "
            "the positions (overlapping atoms or an atom on its own periodic image)".format(
                e, int(i[e].item()), int(j[e].item())))
    r = torch.sqrt(r2)
    order = required_order(mu is not None, theta is not None, need_gradient)
    B = radial_derivatives(r, sigma, beta, order)
    mu_j: Optional[Tensor] = None
    if mu is not None:
        mu_j = mu[j]
    theta_j: Optional[Tensor] = None
    if theta is not None:
        theta_j = theta[j]
    phi_e, field_e, grad_e = pair_site_fields(R, B, q[j], mu_j, theta_j, need_gradient)
    phi = torch.zeros(n_sites, dtype=positions.dtype, device=positions.device).index_add(0, i, phi_e)
    field = torch.zeros(n_sites, 3, dtype=positions.dtype, device=positions.device).index_add(0, i, field_e)
    grad: Optional[Tensor] = None
    if grad_e is not None:
        grad = torch.zeros(n_sites, 3, 3, dtype=positions.dtype,
                           device=positions.device).index_add(0, i, grad_e)
    return phi, field, grad

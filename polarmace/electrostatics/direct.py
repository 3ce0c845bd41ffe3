"""Direct pair sums of smeared-multipole potentials, fields and field gradients.

* `open_site_fields`: open boundaries, all pairs i ≠ j within each structure (kernel
  k_e erf(a r)/r, no Ewald split). Structures of a batch are padded to the largest one and
  processed together (no Python loop over structures); receivers are processed in chunks so
  that the temporary pair tensors stay bounded.
* `real_space_site_fields`: the short-range part [erf(a r) − erf(β r)]/r of a periodic Ewald /
  PME sum over a neighbour list from `polarmace.neighbours` (pairs with r > 0 only, images of
  the atom itself included).

Both return, per site i, the potential φ_i [N] (V), the field E_i [N,3] (V/Å) and, when
requested, the field gradient G_i,ab = ∂_a E_b [N,3,3] (V/Å²) from all other sources; see
`kernels.pair_site_fields` for the formulas and SPEC §2 for the conventions.
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
    Bt: List[Tensor],
    R: Tensor,
    q_s: Tensor,
    mu_s: Optional[Tensor],
    theta_s: Optional[Tensor],
    half_tr_s: Optional[Tensor],
    need_gradient: bool,
    dim: int,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fields at the receivers of a [B, c, m] block of pairs, summed over the sources.

    Bt: k tensors [B, c, m], the radial derivatives B_n (zero for excluded pairs); R: [B, c, m, 3] receiver
    minus source. dim = 2: receivers are the rows (i), sources the columns (j) and q_s, mu_s,
    theta_s, half_tr_s are the column sites' [B, m, ...] values; dim = 1: the other way round
    (R must then already be the column-minus-row vector). Same formulas as
    `kernels.pair_site_fields`, with the sums over sources done by batched matrix products.
    """
    if dim == 2:
        q_b = q_s.unsqueeze(1)
        eq_vec = "bij,bjx->bix"
        eq_rot = "bjxy,bijy->bijx"
        eq_outer = "bijx,bijy->bixy"
    else:
        q_b = q_s.unsqueeze(2)
        eq_vec = "bij,bix->bjx"
        eq_rot = "bixy,bijy->bijx"
        eq_outer = "bijx,bijy->bjxy"
    b1 = Bt[1]
    s0 = q_b * Bt[0]
    s1 = q_b * b1
    s2 = s1
    if need_gradient:
        s2 = q_b * Bt[2]
    tR: Optional[Tensor] = None
    wvec: Optional[Tensor] = None  # w − ½ s2 R
    field_extra: Optional[Tensor] = None
    grad_extra: Optional[Tensor] = None
    if mu_s is not None:
        mu_b = mu_s.unsqueeze(1) if dim == 2 else mu_s.unsqueeze(2)
        mr = (mu_b * R).sum(dim=-1)
        s0 = s0 + mr * b1
        s1 = s1 + mr * Bt[2]
        field_extra = -torch.einsum(eq_vec, b1, mu_s)
        if need_gradient:
            s2 = s2 + mr * Bt[3]
            wvec = Bt[2].unsqueeze(-1) * mu_b
    if theta_s is not None and half_tr_s is not None:
        ht = half_tr_s.unsqueeze(1) if dim == 2 else half_tr_s.unsqueeze(2)
        tR = torch.einsum(eq_rot, theta_s, R)
        h = 0.5 * (tR * R).sum(dim=-1)
        s0 = s0 + h * Bt[2] - ht * b1
        s1 = s1 + h * Bt[3] - ht * Bt[2]
        if need_gradient:
            s2 = s2 + h * Bt[4] - ht * Bt[3]
            wt = Bt[3].unsqueeze(-1) * tR
            wvec = wt if wvec is None else wvec + wt
            k = theta_s.shape[1]
            g_theta = torch.einsum(eq_vec, Bt[2], theta_s.reshape(theta_s.shape[0], k, 9))
            grad_extra = -g_theta.reshape(g_theta.shape[0], g_theta.shape[1], 3, 3)
    vec = s1.unsqueeze(-1) * R
    if tR is not None:
        vec = vec - Bt[2].unsqueeze(-1) * tR
    phi = s0.sum(dim=dim)
    field = vec.sum(dim=dim)
    if field_extra is not None:
        field = field + field_extra
    grad: Optional[Tensor] = None
    if need_gradient:
        half_s2R = 0.5 * s2.unsqueeze(-1) * R
        w = -half_s2R if wvec is None else wvec - half_s2R
        m = torch.einsum(eq_outer, R, w)
        s1_sum = s1.sum(dim=dim)
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

    Each unordered pair is evaluated once (radial derivatives shared by both directions, with
    T_n(−R) = (−1)^n T_n(R) handled by passing −R). Structures are padded to the largest one
    ([B, n_max] slots, masks for padding and i = j); receivers are processed in row blocks
    [i0, i1) against columns [i0, n_max) of at most ~chunk_size pairs.

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

    # Padded [B, n_max] layout: structure b, slot l.
    n_struct = int(batch[-1].item()) + 1
    counts = torch.bincount(batch, minlength=n_struct)
    n_max = int(counts.max().item())
    offsets = torch.cumsum(counts, dim=0) - counts
    local = torch.arange(n_sites, device=device) - offsets[batch]
    flat = batch * n_max + local
    num = n_struct * n_max
    pos_p = _pad(positions, flat, num).view(n_struct, n_max, 3)
    q_p = _pad(q, flat, num).view(n_struct, n_max)
    valid = torch.zeros(num, dtype=torch.bool, device=device).index_fill(0, flat, True)
    valid = valid.view(n_struct, n_max)
    mu_p: Optional[Tensor] = None
    if mu is not None:
        mu_p = _pad(mu, flat, num).view(n_struct, n_max, 3)
    theta_p: Optional[Tensor] = None
    half_tr: Optional[Tensor] = None
    if theta is not None:
        th = _pad(theta, flat, num).view(n_struct, n_max, 3, 3)
        theta_p = th
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
        R = pos_p[:, i0:i1, None, :] - pos_p[:, None, i0:, :]  # [B, c, m, 3], r_i − r_j
        mask = valid[:, i0:i1, None] & valid[:, None, i0:]
        mask = mask & (slots[i0:i1, None] < slots[None, i0:]).unsqueeze(0)  # j > i
        r2 = (R * R).sum(dim=-1)
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
        Bt = Bt.index_copy(1, pair_idx, Bv)
        Bl = Bt.reshape(order + 1, n_struct, c, m).unbind(0)
        mu_c: Optional[Tensor] = None
        mu_r: Optional[Tensor] = None
        if mu_p is not None:
            mu_c = mu_p[:, i0:]
            mu_r = mu_p[:, i0:i1]
        th_c: Optional[Tensor] = None
        th_r: Optional[Tensor] = None
        ht_c: Optional[Tensor] = None
        ht_r: Optional[Tensor] = None
        if theta_p is not None and half_tr is not None:
            th_c = theta_p[:, i0:]
            th_r = theta_p[:, i0:i1]
            ht_c = half_tr[:, i0:]
            ht_r = half_tr[:, i0:i1]
        # rows receive from columns
        phi_r, field_r, grad_r = _receive(Bl, R, q_p[:, i0:], mu_c, th_c, ht_c, need_gradient, 2)
        # columns receive from rows, with the column-minus-row vector −R
        phi_c, field_c, grad_c = _receive(Bl, -R, q_p[:, i0:i1], mu_r, th_r, ht_r,
                                          need_gradient, 1)
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

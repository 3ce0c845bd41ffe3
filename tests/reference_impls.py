"""Brute-force references used only by the tests (moved out of the package, which never calls them).

* `scatter_sum`: rows of src summed into bins (index_add), the plain edge-list reference of the
  interaction tests.
* `symmetric_tensor`: the full symmetric tensors of a `SymmetricBasis` (the basis stores only
  polynomial coefficients on monomials).
* `full_coupling_basis`: the unreduced generalized Clebsch–Gordan basis (MACE's construction).
* `reference_contraction`: the symmetric contraction evaluated from the full tensors.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import torch
from e3nn import o3

from polarmace.nn.product import SymmetricBasis, SymmetricContraction, multiplicity, natural_irreps


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[b] = Σ_{e: index[e] = b} src[e] along dim 0: src [E, ...], index [E] → [dim_size, ...]."""
    shape = [dim_size] + list(src.shape[1:])
    return torch.zeros(shape, dtype=src.dtype, device=src.device).index_add(0, index, src)


def symmetric_tensor(basis: SymmetricBasis, nu: int, l: int, p: int) -> torch.Tensor:
    """Full symmetric tensors [K, d, …, d (ν times), 2l+1] (float64) of the basis for irrep (l, p)."""
    coeff = basis.get(nu, l, p)
    k = coeff.shape[0]
    full = torch.zeros((k,) + (basis.dim,) * nu + (2 * l + 1,), dtype=torch.float64)
    for s, mono in enumerate(basis.monos[nu]):
        val = coeff[:, s, :] / multiplicity(mono)
        for perm in set(itertools.permutations(mono)):
            full[(slice(None),) + perm] = val
    return full


def full_coupling_basis(max_ell: int, nu: int, l: int, p: int) -> torch.Tensor:
    """Unreduced generalized Clebsch–Gordan basis [K_full, d^ν…, 2l+1] (float64): iterative
    coupling over all intermediate irreps, not symmetrised (the construction used by MACE)."""
    irreps = natural_irreps(max_ell)
    dim = irreps.dim
    blocks = [(mi.ir.l, mi.ir.p, sl.start) for mi, sl in zip(irreps, irreps.slices())]
    level: Dict[Tuple[int, int], List[torch.Tensor]] = {}
    for l1, p1, off in blocks:
        t = torch.zeros(dim, 2 * l1 + 1, dtype=torch.float64)
        t[off:off + 2 * l1 + 1] = torch.eye(2 * l1 + 1, dtype=torch.float64)
        level.setdefault((l1, p1), []).append(t)
    for _ in range(2, nu + 1):
        new: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        for (l1, p1), ts in level.items():
            for t in ts:
                for l2, p2, off in blocks:
                    for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                        cg = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
                        e = torch.zeros(dim, 2 * l2 + 1, dtype=torch.float64)
                        e[off:off + 2 * l2 + 1] = torch.eye(2 * l2 + 1, dtype=torch.float64)
                        u = torch.einsum("...a,vb,abm->...vm", t, e, cg)
                        new.setdefault((l3, p1 * p2), []).append(u)
        level = new
    ts = level.get((l, p), [])
    if not ts:
        return torch.zeros((0,) + (dim,) * nu + (2 * l + 1,), dtype=torch.float64)
    return torch.stack(ts, 0)


def reference_contraction(a: torch.Tensor, element: torch.Tensor, sc: SymmetricContraction) -> torch.Tensor:
    """Brute-force evaluation of `sc` from the full symmetric tensors.

    a: [C, N, d] float64, element: [N] element index. Returns [C, N, out_dim].
    """
    basis = SymmetricBasis(sc.max_ell, sc.correlation, sc.irreps_out)
    outs = []
    kstart = 0
    for mul_ir in sc.irreps_out:
        l, p = mul_ir.ir.l, mul_ir.ir.p
        acc = a.new_zeros(a.shape[0], a.shape[1], 2 * l + 1)
        for nu in range(1, sc.correlation + 1):
            t = symmetric_tensor(basis, nu, l, p).to(a.dtype)  # [K, d.., M]
            k = t.shape[0]
            if k == 0:
                continue
            w = sc.weight[element][:, kstart:kstart + k, :]  # [N, K, C]
            kstart += k
            # contract the d-indices with a one by one: [K, d, ..., M] -> [C, N, K, ..., M]
            x = torch.einsum("cni,ki...->cnk...", a, t)
            for _ in range(nu - 1):
                x = torch.einsum("cni,cnki...->cnk...", a, x)
            acc = acc + torch.einsum("cnkm,nkc->cnm", x, w)
        outs.append(acc)
    return torch.cat(outs, dim=2)

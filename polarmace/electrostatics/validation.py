"""Input checks for the electrostatics engine: a clear ValueError naming the bad argument.

Written in TorchScript's subset so the checks stay in an exported model.
"""

from typing import List, Optional

import torch


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("electrostatics: '" + name + "' contains NaN or inf values")


def _check_shape(name: str, x: torch.Tensor, shape: List[int]) -> None:
    ok = x.dim() == len(shape)
    if ok:
        for d, s in enumerate(shape):
            if s >= 0 and x.shape[d] != s:
                ok = False
    if not ok:
        expected = "[" + ", ".join(["?" if s < 0 else str(s) for s in shape]) + "]"
        raise ValueError("electrostatics: '" + name + "' has shape " + str(list(x.shape))
                         + ", expected " + expected)


def validate_shapes(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    charges: torch.Tensor,
    dipoles: Optional[torch.Tensor],
    quadrupoles: Optional[torch.Tensor],
    kappa: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    batch: torch.Tensor,
    external_field: Optional[torch.Tensor],
    total_charge: Optional[torch.Tensor],
) -> None:
    """Raise ValueError naming the first argument of the wrong shape or dtype (reads no values,
    so it costs no device sync)."""
    n = positions.shape[0] if positions.dim() > 0 else -1
    _check_shape("positions", positions, [-1, 3])
    _check_shape("cell", cell, [-1, 3, 3])
    b = cell.shape[0]
    _check_shape("pbc", pbc, [b, 3])
    if pbc.dtype != torch.bool:
        raise ValueError("electrostatics: 'pbc' must be a bool tensor, got " + str(pbc.dtype))
    _check_shape("charges", charges, [n])
    _check_shape("batch", batch, [n])
    if dipoles is not None:
        _check_shape("dipoles", dipoles, [n, 3])
    if quadrupoles is not None:
        _check_shape("quadrupoles", quadrupoles, [n, 3, 3])
    if kappa is not None:
        _check_shape("kappa", kappa, [n])
    if alpha is not None:
        if alpha.dim() == 1:
            _check_shape("alpha", alpha, [n])
        else:
            _check_shape("alpha", alpha, [n, 3, 3])
    if external_field is not None:
        _check_shape("external_field", external_field, [b, 3])
    if total_charge is not None:
        _check_shape("total_charge", total_charge, [b])


def validate_inputs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    charges: torch.Tensor,
    dipoles: Optional[torch.Tensor],
    quadrupoles: Optional[torch.Tensor],
    kappa: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    batch: torch.Tensor,
    external_field: Optional[torch.Tensor],
    total_charge: Optional[torch.Tensor],
) -> None:
    """Raise ValueError naming the first argument that is malformed or unphysical."""
    validate_shapes(positions, cell, pbc, charges, dipoles, quadrupoles, kappa, alpha, batch,
                    external_field, total_charge)
    n = positions.shape[0]
    b = cell.shape[0]
    if dipoles is not None:
        _check_finite("dipoles", dipoles)
    if quadrupoles is not None:
        _check_finite("quadrupoles", quadrupoles)
        scale = quadrupoles.abs().amax(dim=(1, 2)) + 1e-12
        trace = torch.diagonal(quadrupoles, dim1=1, dim2=2).sum(-1).abs()
        tol = 1e-6 if quadrupoles.dtype == torch.float64 else 1e-4
        if bool((trace > tol * scale).any()):
            raise ValueError("electrostatics: 'quadrupoles' must be traceless (Θ is the traceless "
                             "second moment); max |tr Θ| = " + str(float(trace.max())))
        asym = (quadrupoles - quadrupoles.transpose(1, 2)).abs().amax(dim=(1, 2))
        if bool((asym > tol * scale).any()):
            raise ValueError("electrostatics: 'quadrupoles' must be symmetric")
    if kappa is not None:
        _check_finite("kappa", kappa)
        if bool((kappa < 0).any()):
            raise ValueError("electrostatics: 'kappa' (charge softness) must be >= 0; min = "
                             + str(float(kappa.min())))
    if alpha is not None:
        _check_finite("alpha", alpha)
        _check_polarizability(alpha)
    if external_field is not None:
        _check_finite("external_field", external_field)
    if total_charge is not None:
        _check_finite("total_charge", total_charge)
    _check_finite("positions", positions)
    _check_finite("charges", charges)
    _check_finite("cell", cell)
    if n > 0:
        if bool((batch < 0).any()) or bool((batch >= b).any()):
            raise ValueError("electrostatics: 'batch' indices must lie in [0, " + str(b) + ")")
        if bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("electrostatics: 'batch' must be sorted (atoms of a structure contiguous)")
    check_cell(cell, pbc)


def check_cell(cell: torch.Tensor, pbc: torch.Tensor) -> None:
    """Periodic directions need real lattice vectors; supported: 3D periodic, slab (T,T,F), open."""
    any_periodic = pbc.any(dim=1)
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    full = pbc.all(dim=1)
    if bool((any_periodic & ~slab & ~full).any()):
        raise ValueError("electrostatics: 'pbc' must be all True (3D periodic), [True, True, False] "
                         "(slab, vacuum along the third lattice vector) or all False (open)")
    lengths = torch.linalg.norm(cell, dim=2)
    if bool(((lengths < 1e-8) & pbc).any()):
        raise ValueError("electrostatics: 'pbc' is True along a direction whose lattice vector in "
                         "'cell' is zero")
    if bool(any_periodic.any()):
        det = torch.linalg.det(cell[any_periodic]).abs()
        vol_scale = lengths[any_periodic].prod(dim=1)
        if bool((det < 1e-8 * vol_scale).any()):
            raise ValueError("electrostatics: 'cell' is singular for a periodic or slab structure "
                             "(slabs need a padded 3D cell with vacuum along the third vector)")


def _check_polarizability(alpha: torch.Tensor) -> None:
    """α_i >= 0 (scalar) or symmetric positive semi-definite (3×3): a negative polarizability
    makes −½ F·α·F unbounded below and the induced dipoles point against the field."""
    a = alpha.detach()
    tol = 1e-6 if a.dtype == torch.float64 else 1e-4
    if a.dim() == 1:
        if bool((a < 0).any()):
            raise ValueError("electrostatics: 'alpha' (polarizability) must be >= 0; min = "
                             + str(float(a.min())) + " at atom " + str(int(torch.argmin(a))))
        return
    if a.shape[0] == 0:
        return
    scale = a.abs().amax(dim=(1, 2)) + 1e-30
    asym = (a - a.transpose(1, 2)).abs().amax(dim=(1, 2))
    if bool((asym > tol * scale).any()):
        raise ValueError("electrostatics: 'alpha' (polarizability) must be symmetric; max |α - αᵀ| = "
                         + str(float(asym.max())) + " at atom " + str(int(torch.argmax(asym / scale))))
    lowest = torch.linalg.eigvalsh(0.5 * (a + a.transpose(1, 2)))[:, 0]
    if bool((lowest < -tol * scale).any()):
        raise ValueError("electrostatics: 'alpha' (polarizability) must be positive semi-definite; lowest "
                         "eigenvalue = " + str(float(lowest.min())) + " at atom " + str(int(torch.argmin(lowest / scale))))

"""Radial derivatives of the Gaussian-smeared Coulomb kernel and pair multipole contractions.

Conventions (see docs/method.md §2): the pair kernel is

    f(r) = k_e · [erf(a r) − erf(β r)] / r,   a = 1/(√2 σ),

with σ = 0 meaning a = ∞ (erf(a r) = 1, point multipoles) and β = 0 meaning no Ewald
subtraction. Its radial derivatives

    B_n(r) = (−(1/r) d/dr)^n f(r)

give every Cartesian interaction tensor T_n = ∇^n f(R) (R = r_i − r_j), e.g.

    T0 = B0,  T1_a = −R_a B1,  T2_ab = R_a R_b B2 − δ_ab B1,
    T3_abc = −R_a R_b R_c B3 + (δ_ab R_c + δ_ac R_b + δ_bc R_a) B2, ...

Numerics. For one Gaussian width α the exact identity

    (−(1/r) d/dr)^n erf(α r)/r = (2n−1)!!/r^{2n+1} · P(n+½, α² r²)

(P, Q = 1 − P the regularised lower / upper incomplete gamma functions) is evaluated per pair
and per order in one of two forms, each free of cancellation where it is used:

* small x = α r < x_n: B_n = (2n−1)!! α^{2n+1} e^{−x²} S_n(x²), S_n(y) = Σ_k y^k / Γ(n+k+3/2),
  a series of positive terms (the highest order by Horner, the lower ones by the stable
  downward recursion S_{n−1} = y S_n + 1/Γ(n+½)). The naive upward recursion
  B_n = [(2n−1) B_{n−1} − 2^n α^{2n−1} e^{−x²}/√π]/r² cancels catastrophically here;
* large x ≥ x_n: B_n = (2n−1)!!/r^{2n+1} · (1 − Q_n) with
  Q_n = Q(n+½, x²) = erfc(x) + e^{−x²} Σ_{k<n} x^{2k+1}/Γ(k+3/2) (positive terms).

The switch x_n = √(n + 0.2) sits where P ≈ Q ≈ ½, so neither 1 − Q (one width) nor the
difference of two widths loses more than a factor ~2. Two widths are combined as

    B_n = point_n·[(L^a − L^β) + (Q^β − Q^a)] + S^a − S^β      (L = 1 on the large side),

so that when both widths are on the large side the point terms cancel analytically and the
exponentially small short-range tail point·(Q^β − Q^a) keeps its relative accuracy. With one
width only (open boundaries), pairs with Q < 1e-19 (x ≳ 7) take the bare point form.

Costs and safety: every pair gets the cheap form; the pairs that need another one are gathered
by index and overwritten (index_copy), and every branch is evaluated at a "safe" radius where
its result is not used, so no branch produces an infinity or a NaN gradient (double backward
included). Measured accuracy against mpmath over r ∈ [0.05, 30] Å, σ ∈ {0, 0.5, 1, 2},
β ∈ {0, 0.2, 0.5, a}: ≤ 6e-15 relative in float64 (the exponentially small β-subtracted tail
included); in float32 ≤ 7e-7 relative for β = 0, and for β > 0 ≤ 1.2e-6 relative where B_n is
above 1e-3 of the bare point kernel (≤ 3e-7 of the point kernel in absolute terms everywhere:
deeper in the tail float32 is limited by the conditioning 2(βr)² of e^{−β²r²}).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "coulomb_constant",
    "radial_derivatives",
    "required_order",
    "pair_site_fields",
    "site_energy",
    "switch_point",
]


def coulomb_constant() -> float:
    """k_e in eV·Å/e² (= polarmace.units.COULOMB; a literal because TorchScript cannot read
    module-level floats — the tests check that the two agree)."""
    return 14.399645478425668


def switch_point(order: int) -> float:
    """x = α r below which order n uses the series form for kernel width α.

    At x_n = √(n + 0.2) the regularised incomplete gamma P(n+½, x_n²) ≈ ½, so neither form loses
    more than a factor ~2 in relative precision: point − C loses 1/P on the large side, and in
    a difference of widths point − C^a − S^β loses 1/Q on the small side.
    """
    return math.sqrt(float(order) + 0.2)


def _series_terms(y_max: float, max_order: int, tol: float) -> int:
    """Number of Horner terms so that the tail of S_max_order(y ≤ y_max) is below tol·S."""
    s = max_order + 0.5
    term = 1.0
    total = 1.0
    k = 0
    while k < 200:
        k += 1
        term = term * y_max / (s + float(k))
        total += term
        if term < tol * total and y_max / (s + float(k) + 1.0) < 0.5:
            break
    return k + 1


def _small_x_form(x: Tensor, alpha: float, max_order: int, nterms: int) -> Tensor:
    """[(−(1/r) d/dr)^n erf(α r)/r]_{n=0..max_order} for x = α r (any x ≥ 0, used for small x).

    Returns [max_order+1, P] (without k_e).
    """
    y = x * x
    # inverse gammas 1/Γ(n + ½) for n = 0 .. max_order + 1, then 1/Γ(max_order + 3/2 + k).
    inv_gamma_half: List[float] = []
    g = 1.0 / math.sqrt(math.pi)  # 1/Γ(½)
    for n in range(max_order + 2):
        inv_gamma_half.append(g)
        g = g / (float(n) + 0.5)
    coeffs: List[float] = []
    c = inv_gamma_half[max_order + 1]  # 1/Γ(max_order + 3/2)
    for k in range(nterms):
        coeffs.append(c)
        c = c / (float(max_order) + 1.5 + float(k))
    # Horner for S_M(y) = Σ_k coeffs[k] y^k
    acc = y * coeffs[nterms - 1] + coeffs[nterms - 2]
    for k in range(nterms - 3, -1, -1):
        acc = acc * y + coeffs[k]
    series: List[Tensor] = [acc]
    for n in range(max_order, 0, -1):
        acc = y * acc + inv_gamma_half[n]
        series.append(acc)
    series.reverse()  # series[n] = S_n(y)
    damp = torch.exp(-y)
    out: List[Tensor] = []
    dfact = 1.0  # (2n−1)!!
    for n in range(max_order + 1):
        if n > 0:
            dfact = dfact * float(2 * n - 1)
        out.append(series[n] * damp * (dfact * alpha ** (2 * n + 1)))
    return torch.stack(out, dim=0)


def _upper_gamma_form(x: Tensor, max_order: int) -> Tensor:
    """[Q(n+½, x²)]_{n=0..max_order}, the regularised upper incomplete gamma, [M+1, P].

    Q(n+½, x²) = erfc(x) + e^{−x²} Σ_{k<n} x^{2k+1}/Γ(k+3/2): positive terms, finite for all x.
    The erfc-kernel derivatives are C_n = (2n−1)!!/r^{2n+1} · Q(n+½, (α r)²).
    """
    y = x * x
    damp = torch.exp(-y)
    q0 = torch.erfc(x)
    out: List[Tensor] = [q0]
    if max_order > 0:
        term = x * (2.0 / math.sqrt(math.pi))  # x / Γ(3/2)
        poly = term
        out.append(q0 + damp * poly)
        for n in range(2, max_order + 1):
            term = term * y * (1.0 / (float(n) - 0.5))
            poly = poly + term
            out.append(q0 + damp * poly)
    return torch.stack(out, dim=0)


def _point_form(r: Tensor, max_order: int, scale: float) -> Tensor:
    """scale·[(2n−1)!!/r^{2n+1}]_{n=0..max_order}, [M+1, P].

    float64: 1/r and repeated products (error ~ (2n+1) ulp, irrelevant at 1e-16); other dtypes:
    one pow per order (≤ 1 ulp), which keeps float32 within ~1e-6 after the subtractions.
    """
    if r.dtype == torch.float64:
        inv_r = 1.0 / r
        inv_r2 = inv_r * inv_r
        p = inv_r * scale
        out: List[Tensor] = [p]
        for n in range(1, max_order + 1):
            p = p * inv_r2 * float(2 * n - 1)
            out.append(p)
        return torch.stack(out, dim=0)
    exps: List[float] = []
    coefs: List[float] = []
    dfact = 1.0
    for n in range(max_order + 1):
        if n > 0:
            dfact = dfact * float(2 * n - 1)
        exps.append(-float(2 * n + 1))
        coefs.append(dfact * scale)
    e = torch.tensor(exps, dtype=r.dtype, device=r.device)
    c = torch.tensor(coefs, dtype=r.dtype, device=r.device)
    return torch.pow(r.unsqueeze(0), e.unsqueeze(1)) * c.unsqueeze(1)


def _far_switch(max_order: int, tol: float) -> float:
    """x beyond which Q(n+½, x²) < tol for all n ≤ max_order (erf(x) = 1 to working precision).

    Uses Q(s, y) ≤ y^{s−1} e^{−y} / (Γ(s) (1 − (s−1)/y)) for y > s − 1 (and erfc for s = ½).
    """
    s = float(max_order) + 0.5
    gamma_s = math.sqrt(math.pi)  # Γ(½)
    for n in range(max_order):
        gamma_s = gamma_s * (float(n) + 0.5)
    x = 1.0
    while x < 40.0:
        y = x * x
        if max_order == 0:
            bound = math.exp(-y) / (x * math.sqrt(math.pi))
        elif y > 2.0 * (s - 1.0):
            bound = math.exp((s - 1.0) * math.log(y) - y) / (gamma_s * (1.0 - (s - 1.0) / y))
        else:
            bound = 1.0
        if bound < tol:
            return x
        x += 0.25
    return x


def _mixed_form(r: Tensor, a: float, beta: float, max_order: int, nterms: int,
                scale: float) -> Tensor:
    """scale·B_n for widths a (0 = point) and β (0 = none), choosing per pair and order.

    For each width α and order n: the series form S where x = α r < x_n, otherwise
    point·(L − Q) with L = 1; combined as point·[(L^a − L^β) + (Q^β − Q^a)] + S^a − S^β.
    """
    thresholds = torch.tensor([switch_point(n) for n in range(max_order + 1)],
                              dtype=r.dtype, device=r.device).unsqueeze(1)
    x_hi = switch_point(max_order)
    zero = torch.zeros(max_order + 1, r.shape[0], dtype=r.dtype, device=r.device)
    large = zero
    upper = zero
    total = zero
    if a > 0.0:
        x = r * a
        small = x.unsqueeze(0) < thresholds
        large = large + (~small).to(r.dtype)
        upper = upper - torch.where(small, zero, _upper_gamma_form(x, max_order))
        xs = torch.where(x < x_hi, x, torch.zeros_like(x))  # series only where it converges
        total = total + torch.where(small, _small_x_form(xs, a, max_order, nterms), zero)
    else:
        large = large + 1.0
    if beta > 0.0:
        x = r * beta
        small = x.unsqueeze(0) < thresholds
        large = large - (~small).to(r.dtype)
        upper = upper + torch.where(small, zero, _upper_gamma_form(x, max_order))
        xs = torch.where(x < x_hi, x, torch.zeros_like(x))
        total = total - torch.where(small, _small_x_form(xs, beta, max_order, nterms), zero)
    coef = large + upper
    # The point form is evaluated only where some order needs it; elsewhere (r may be 0 there
    # when both widths are finite) at a harmless radius, so that no value or derivative of the
    # unused branch is infinite.
    used = (coef != 0.0).any(dim=0)
    r_point = torch.where(used, r, torch.ones_like(r))
    return _point_form(r_point, max_order, scale) * coef + total * scale


def _two_width_form(r: Tensor, a: float, beta: float, max_order: int, nterms: int,
                    scale: float) -> Tensor:
    """scale·B_n: large-x form point·(Q^β − Q^a) on every pair, with the pairs where some width
    is in its series range (x < x_max_order) recomputed by `_mixed_form`."""
    if a <= 0.0 and beta <= 0.0:
        return _point_form(r, max_order, scale)
    x_hi = switch_point(max_order)
    small_any = torch.zeros(r.shape, dtype=torch.bool, device=r.device)
    if a > 0.0:
        small_any = small_any | (r * a < x_hi)
    if beta > 0.0:
        small_any = small_any | (r * beta < x_hi)
    idx = torch.nonzero(small_any).flatten()
    r_m = r
    if idx.numel() > 0:
        r_m = torch.where(small_any, torch.ones_like(r), r)
    out = _point_form(r_m, max_order, scale)
    if beta > 0.0:
        coef = _upper_gamma_form(r_m * beta, max_order)
        if a > 0.0:
            coef = coef - _upper_gamma_form(r_m * a, max_order)
        out = out * coef
    elif a > 0.0:
        out = out * (1.0 - _upper_gamma_form(r_m * a, max_order))
    if idx.numel() > 0:
        sub = _mixed_form(r.index_select(0, idx), a, beta, max_order, nterms, scale)
        out = out.index_copy(1, idx, sub)
    return out


def radial_derivatives(r: Tensor, sigma: float, beta: float, max_order: int) -> Tensor:
    """B_n(r) = (−(1/r) d/dr)^n f(r), n = 0..max_order, for f = k_e [erf(a r) − erf(β r)]/r.

    Args:
        r: [P] distances (Å), > 0 (r = 0 is allowed only where both widths are finite).
        sigma: Gaussian width σ (Å); 0 gives point multipoles (a = ∞).
        beta: Ewald splitting parameter β (1/Å); 0 means no subtraction.
        max_order: highest n (4 is needed for quadrupole field gradients).

    Returns:
        [P, max_order+1] in eV/(e² Å^{2n+1}), dtype and device of r (a transposed view of a
        contiguous [max_order+1, P] tensor, so that each column B[:, n] is contiguous).
        Relative accuracy ~1e-14 in float64 and ~1e-6 in float32 (see the module docstring).
    """
    if max_order < 0:
        raise ValueError("radial_derivatives: max_order must be >= 0")
    if sigma < 0.0 or beta < 0.0:
        raise ValueError("radial_derivatives: sigma and beta must be >= 0")
    x_hi = switch_point(max_order)
    tol = 1e-18 if r.dtype == torch.float64 else 1e-9
    nterms = max(_series_terms(x_hi * x_hi, max_order, tol), 3)
    a = 0.0
    if sigma > 0.0:
        a = 1.0 / (math.sqrt(2.0) * sigma)
    k_e = coulomb_constant()
    # Internally [M+1, P] (each order contiguous); returned as a [P, M+1] view.
    if beta > 0.0 or a <= 0.0:
        return _two_width_form(r, a, beta, max_order, nterms, k_e).t()
    # One finite width, no subtraction (open boundaries): beyond x_far the kernel is the point
    # kernel to working precision; the rest is gathered and evaluated in full.
    near = r * a < _far_switch(max_order, 0.1 * tol)
    idx = torch.nonzero(near).flatten()
    if idx.numel() == r.shape[0]:
        return _two_width_form(r, a, 0.0, max_order, nterms, k_e).t()
    out = _point_form(torch.where(near, torch.ones_like(r), r), max_order, k_e)
    if idx.numel() > 0:
        sub = _two_width_form(r.index_select(0, idx), a, 0.0, max_order, nterms, k_e)
        out = out.index_copy(1, idx, sub)
    return out.t()


def required_order(has_mu: bool, has_theta: bool, need_gradient: bool) -> int:
    """Highest radial order B_n needed for fields (and gradients) of the given multipoles."""
    order = 1
    if has_theta:
        order += 2
    elif has_mu:
        order += 1
    if need_gradient:
        order += 1
    return order


def pair_site_fields(
    R: Tensor,
    B: Tensor,
    q: Tensor,
    mu: Optional[Tensor],
    theta: Optional[Tensor],
    need_gradient: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Potential, field and field gradient at a receiving site from one source, per pair.

    With s_n = q B_n + (μ·R) B_{n+1} + ½ (RᵀΘR) B_{n+2} − ½ tr(Θ) B_{n+1}:

        φ   = s_0
        E   = s_1 R − (B_1 μ + B_2 ΘR)
        G   = s_1 δ − s_2 R⊗R + R⊗w + w⊗R − B_2 Θ,     w = B_2 μ + B_3 ΘR

    (Θ symmetric; the trace terms vanish for a traceless Θ but are kept for generality.)

    Args:
        R: [P, 3] receiver minus source position (Å).
        B: [P, k] radial derivatives from `radial_derivatives` with
           k ≥ required_order(mu is not None, theta is not None, need_gradient) + 1.
        q: [P] source charges; mu: [P, 3] source dipoles or None; theta: [P, 3, 3] or None.
        need_gradient: also return G.

    Returns:
        phi [P], field [P, 3], field gradient [P, 3, 3] or None.
    """
    if B.shape[1] < required_order(mu is not None, theta is not None, need_gradient) + 1:
        raise ValueError("pair_site_fields: B has too few radial orders for the requested terms")
    b = B.unbind(1)
    s0 = q * b[0]
    s1 = q * b[1]
    s2 = q * b[2] if need_gradient else s1
    u = torch.zeros_like(R)
    w = torch.zeros_like(R)
    if mu is not None:
        mr = mu[:, 0] * R[:, 0] + mu[:, 1] * R[:, 1] + mu[:, 2] * R[:, 2]
        s0 = s0 + mr * b[1]
        s1 = s1 + mr * b[2]
        u = u + b[1].unsqueeze(1) * mu
        if need_gradient:
            s2 = s2 + mr * b[3]
            w = w + b[2].unsqueeze(1) * mu
    if theta is not None:
        tR = torch.bmm(theta, R.unsqueeze(2)).squeeze(2)  # ΘR [P, 3]
        rtr = tR[:, 0] * R[:, 0] + tR[:, 1] * R[:, 1] + tR[:, 2] * R[:, 2]  # RᵀΘR
        tr = theta[:, 0, 0] + theta[:, 1, 1] + theta[:, 2, 2]
        h = 0.5 * rtr
        ht = 0.5 * tr
        s0 = s0 + h * b[2] - ht * b[1]
        s1 = s1 + h * b[3] - ht * b[2]
        u = u + b[2].unsqueeze(1) * tR
        if need_gradient:
            s2 = s2 + h * b[4] - ht * b[3]
            w = w + b[3].unsqueeze(1) * tR
    phi = s0
    field = s1.unsqueeze(1) * R - u
    grad: Optional[Tensor] = None
    if need_gradient:
        rw = R.unsqueeze(2) * w.unsqueeze(1)
        g = rw + rw.transpose(1, 2) - (s2.unsqueeze(1) * R).unsqueeze(2) * R.unsqueeze(1)
        g = g + torch.diag_embed(s1.unsqueeze(1).expand(-1, 3))
        if theta is not None:
            g = g - b[2].view(-1, 1, 1) * theta
        grad = g
    return phi, field, grad


def site_energy(
    q: Tensor,
    mu: Optional[Tensor],
    theta: Optional[Tensor],
    phi: Tensor,
    field: Tensor,
    field_gradient: Optional[Tensor],
) -> Tensor:
    """Per-site energy ½[q φ − μ·E − ½ Θ:G] (eV), [N]; summing it gives the pair energy."""
    e = q * phi
    if mu is not None:
        e = e - (mu * field).sum(dim=1)
    if theta is not None:
        if field_gradient is None:
            raise ValueError("site_energy: quadrupoles need the field gradient")
        e = e - 0.5 * (theta * field_gradient).sum(dim=(1, 2))
    return 0.5 * e

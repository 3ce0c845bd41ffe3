"""Smeared-multipole kernels (kernels.py) and direct pair sums (direct.py).

Everything in float64 unless a test says otherwise. References are independent of the code
under test where possible: mpmath incomplete gamma functions for the radial derivatives,
hand-solved two-site energies, point-charge clusters for dipoles and quadrupoles, autograd
for field = −∇φ and G = ∇E, and naive Python double loops for the batched sums.
"""

import math
import resource
import time

import numpy as np
import pytest
import torch

from polarmace.electrostatics import direct, kernels
from polarmace.electrostatics.direct import open_site_fields, real_space_site_fields
from polarmace.electrostatics.kernels import (
    pair_site_fields,
    radial_derivatives,
    required_order,
    site_energy,
    switch_point,
)
from polarmace.neighbours import neighbour_pairs
from polarmace.units import COULOMB

DT = torch.float64
SQRT_PI = math.sqrt(math.pi)


def width(sigma):
    return 1.0 / (math.sqrt(2.0) * sigma)


def random_theta(n, gen, scale=1.0, dtype=DT):
    t = torch.randn(n, 3, 3, generator=gen, dtype=dtype) * scale
    t = t + t.transpose(1, 2)
    tr = t.diagonal(dim1=1, dim2=2).sum(-1)
    return t - tr[:, None, None] * torch.eye(3, dtype=dtype) / 3.0


def random_cluster(n, gen, spacing=2.0, jitter=0.4, dtype=DT):
    """n sites on a jittered cubic grid (no two closer than spacing − 2·jitter·√3)."""
    side = math.ceil(n ** (1.0 / 3.0))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1)
    grid = grid.reshape(-1, 3)[:n].to(dtype) * spacing
    return grid + jitter * (torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5) * 2


def multipoles(n, gen, dtype=DT):
    q = torch.randn(n, generator=gen, dtype=dtype)
    mu = 0.5 * torch.randn(n, 3, generator=gen, dtype=dtype)
    theta = random_theta(n, gen, 0.5, dtype)
    return q, mu, theta


def naive_open(positions, batch, q, mu, theta, sigma, need_gradient):
    """Python double loop over pairs i ≠ j of one structure, one pair at a time."""
    n = positions.shape[0]
    order = required_order(mu is not None, theta is not None, need_gradient)
    phi = torch.zeros(n, dtype=positions.dtype)
    field = torch.zeros(n, 3, dtype=positions.dtype)
    grad = torch.zeros(n, 3, 3, dtype=positions.dtype)
    for i in range(n):
        for j in range(n):
            if i == j or batch[i] != batch[j]:
                continue
            R = (positions[i] - positions[j]).unsqueeze(0)
            B = radial_derivatives(R.norm(dim=1), sigma, 0.0, order)
            p, e, g = pair_site_fields(R, B, q[j:j + 1], None if mu is None else mu[j:j + 1],
                                       None if theta is None else theta[j:j + 1], need_gradient)
            phi[i] += p[0]
            field[i] += e[0]
            if g is not None:
                grad[i] += g[0]
    return phi, field, (grad if need_gradient else None)


def probe_fields(probe, sources, q, mu, theta, sigma, beta=0.0):
    """φ, E, G at one probe point [3] from a set of sources (pair_site_fields summed)."""
    R = probe.unsqueeze(0) - sources
    B = radial_derivatives(R.norm(dim=1), sigma, beta, 4)
    p, e, g = pair_site_fields(R, B, q, mu, theta, True)
    return p.sum(), e.sum(0), g.sum(0)


# ----------------------------------------------------------------------------- radial kernel

def test_coulomb_constant_matches_units():
    assert kernels.coulomb_constant() == COULOMB


def mp_reference(r_values, sigma, beta, max_order):
    """k_e (2n−1)!!/r^{2n+1} [Q(n+½, β²r²) − Q(n+½, a²r²)] with mpmath (40 digits)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    a = None if sigma == 0 else mpmath.mpf(1) / (mpmath.sqrt(2) * mpmath.mpf(sigma))
    out = np.zeros((len(r_values), max_order + 1))
    for i, rv in enumerate(r_values):
        r = mpmath.mpf(rv)
        for n in range(max_order + 1):
            qa = mpmath.mpf(0) if a is None else mpmath.gammainc(n + 0.5, (a * r) ** 2, mpmath.inf, regularized=True)
            qb = mpmath.mpf(1) if beta == 0 else mpmath.gammainc(n + 0.5, (mpmath.mpf(beta) * r) ** 2, mpmath.inf, regularized=True)
            out[i, n] = float(COULOMB * mpmath.fac2(2 * n - 1) / r ** (2 * n + 1) * (qb - qa))
    return torch.tensor(out, dtype=DT)


def r_grid():
    # log-spaced points plus points straddling every series/large-form switch for σ = 1, β = 0.2
    r = list(np.geomspace(0.05, 30.0, 45))
    for n in range(5):
        for alpha in (width(1.0), 0.2, width(0.5), width(2.0)):
            x = switch_point(n) / alpha
            r += [x * (1 - 1e-9), x * (1 + 1e-9)]
    return torch.tensor(sorted(v for v in r if 0.05 <= v <= 30.0), dtype=DT)


CASES = [(s, b) for s in (0.0, 0.5, 1.0, 2.0) for b in (0.0, 0.2, 0.5, "a")
         if not (s == 0.0 and b in (0.0, "a")) and not (b == 0.5 and s == 2.0)]


@pytest.mark.parametrize("sigma,beta", CASES)
def test_radial_derivatives_match_mpmath(sigma, beta):
    if beta == "a":
        beta = width(sigma)
    r = r_grid()
    B = radial_derivatives(r, sigma, beta, 4)
    if sigma > 0 and beta == width(sigma):
        assert torch.all(B == 0)  # the real-space kernel vanishes identically at β = a
        return
    ref = mp_reference(r.tolist(), sigma, beta, 4)
    rel = ((B - ref).abs() / ref.abs())
    assert rel.max() < 1e-12, rel.max()


def test_radial_identities_without_mpmath():
    """dB_n/dr = −r B_{n+1}; B_0 = k_e[erf(ar) − erf(βr)]/r; the r → 0 limit; the Ewald split."""
    r = r_grid().clone().requires_grad_(True)
    for sigma, beta in [(1.0, 0.0), (0.5, 0.3), (0.0, 0.4), (2.0, 0.1), (0.0, 0.0)]:
        B = radial_derivatives(r, sigma, beta, 5)
        for n in range(5):
            (d,) = torch.autograd.grad(B[:, n].sum(), r, retain_graph=True)
            assert torch.allclose(d, -r * B[:, n + 1], rtol=1e-12, atol=0), (sigma, beta, n)
        a_r = torch.ones_like(r) if sigma == 0 else torch.erf(width(sigma) * r)
        diff = a_r - torch.erf(beta * r)
        b0 = COULOMB * diff / r
        ok = diff > 1e-2  # where the erf difference itself is well conditioned
        assert torch.allclose(B[ok, 0], b0[ok], rtol=1e-13, atol=0)
    # r → 0: B_n(0) = k_e (2/√π) 2^n (a^{2n+1} − β^{2n+1}) / (2n+1), finite with finite gradients
    r0 = torch.tensor([0.0, 1e-8, 1e-4], dtype=DT, requires_grad=True)
    a, beta = width(0.7), 0.3
    B = radial_derivatives(r0, 0.7, beta, 4)
    lim = torch.tensor([COULOMB * 2 / SQRT_PI * 2 ** n * (a ** (2 * n + 1) - beta ** (2 * n + 1)) / (2 * n + 1)
                        for n in range(5)], dtype=DT)
    assert torch.allclose(B[0], lim, rtol=1e-14)
    assert torch.allclose(B[1], lim, rtol=1e-10)
    (g,) = torch.autograd.grad(B.sum(), r0, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), r0)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
    # Ewald split: B(σ, β) + B(σ_β, 0) = B(σ, 0) with σ_β = 1/(√2 β)
    r = r_grid()
    beta = 0.35
    total = radial_derivatives(r, 0.8, 0.0, 4)
    split = radial_derivatives(r, 0.8, beta, 4) + radial_derivatives(r, 1.0 / (math.sqrt(2) * beta), 0.0, 4)
    assert torch.allclose(split, total, rtol=1e-13, atol=0)


def test_series_and_large_forms_agree_in_the_overlap():
    """Both evaluation forms of one width, at the same x around every switch point."""
    alpha = 0.8
    for n_max in range(5):
        x = torch.linspace(0.6 * switch_point(n_max), 1.6 * switch_point(n_max), 41, dtype=DT)
        r = x / alpha
        series = kernels._small_x_form(x, alpha, n_max, 60)
        large = kernels._point_form(r, n_max, 1.0) * (1.0 - kernels._upper_gamma_form(x, n_max))
        assert torch.allclose(series, large, rtol=1e-12, atol=0), n_max


@pytest.mark.parametrize("sigma,beta", [(1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (1.0, 0.2),
                                        (0.0, 0.2), (0.5, 0.5), (0.0, 0.0)])
def test_radial_float32_matches_float64(sigma, beta):
    r32 = torch.cat([torch.linspace(0.05, 5.0, 400), torch.linspace(5.0, 30.0, 200)])
    r64 = r32.double()
    B32 = radial_derivatives(r32, sigma, beta, 4).double()
    B64 = radial_derivatives(r64, sigma, beta, 5)
    ref = B64[:, :5]
    # conditioning of B_n in r: |d ln B_n / d ln r| = r² |B_{n+1}/B_n| (large only in the
    # exponentially small tail of the β-subtracted kernel)
    kappa = (r64[:, None] ** 2 * B64[:, 1:].abs() / ref.abs().clamp_min(1e-300))
    tol = 1e-6 + 4 * 6e-8 * kappa
    representable = ref.abs() > 1e-30
    err = (B32 - ref).abs() / ref.abs().clamp_min(1e-300)
    assert (err <= tol)[representable].all(), err[representable].max()
    assert (B32[~representable].abs() < 1e-28).all()
    if beta == 0.0:  # plain kernel: 1e-6 relative everywhere
        assert err.max() < 1e-6, err.max()


def test_radial_double_backward_is_finite_across_switches():
    r = r_grid().clone().requires_grad_(True)
    for sigma, beta in [(1.0, 0.0), (1.0, 0.3), (0.0, 0.3), (0.0, 0.0)]:
        for dtype in (torch.float64, torch.float32):
            rr = r.detach().to(dtype).requires_grad_(True)
            B = radial_derivatives(rr, sigma, beta, 4)
            (g,) = torch.autograd.grad((B * torch.arange(1, 6, dtype=dtype)).sum(), rr, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), rr)
            assert torch.isfinite(g).all() and torch.isfinite(gg).all(), (sigma, beta, dtype)


# ----------------------------------------------------------------------------- pair contractions

def two_site_energy(R, qs, mus, thetas, sigma, need_gradient=True):
    """Total energy of two sites at 0 and R via open_site_fields + site_energy."""
    pos = torch.stack([torch.zeros(3, dtype=DT), R])
    batch = torch.zeros(2, dtype=torch.long)
    phi, field, grad = open_site_fields(pos, batch, qs, mus, thetas, sigma, need_gradient)
    return site_energy(qs, mus, thetas, phi, field, grad)


def test_two_site_energies_by_hand():
    gen = torch.Generator().manual_seed(1)
    R = torch.tensor([0.7, -1.1, 1.9], dtype=DT)
    r = R.norm()
    q1, q2 = 0.8, -1.3
    qs = torch.tensor([q1, q2], dtype=DT)
    zero_mu = torch.zeros(2, 3, dtype=DT)
    # q–q, smeared and point
    for sigma in (0.0, 0.6, 1.0):
        e = two_site_energy(R, qs, None, None, sigma, False).sum()
        ref = COULOMB * q1 * q2 * (1.0 if sigma == 0 else math.erf(r / (math.sqrt(2) * sigma))) / r
        assert torch.allclose(e, ref, rtol=1e-14)
    # point q at 0, dipole μ at R: E = −μ·E_q(R) = −k_e q μ·R / r³ (both halves equal)
    mu = torch.randn(3, generator=gen, dtype=DT)
    e = two_site_energy(R, torch.tensor([q1, 0.0], dtype=DT), torch.stack([torch.zeros(3, dtype=DT), mu]),
                        None, 0.0)
    ref = -COULOMB * q1 * (mu @ R) / r ** 3
    assert torch.allclose(e, torch.full((2,), 0.5 * ref, dtype=DT), rtol=1e-13)
    # μ–μ: k_e [μ1·μ2 / r³ − 3 (μ1·R)(μ2·R) / r⁵]
    mus = torch.randn(2, 3, generator=gen, dtype=DT)
    e = two_site_energy(R, torch.zeros(2, dtype=DT), mus, None, 0.0).sum()
    ref = COULOMB * (mus[0] @ mus[1] / r ** 3 - 3 * (mus[0] @ R) * (mus[1] @ R) / r ** 5)
    assert torch.allclose(e, ref, rtol=1e-13)
    # q at 0, quadrupole Θ at R: k_e q (3/2) R̂ᵀΘR̂ / r³ (Θ traceless second moment)
    th = random_theta(1, gen)[0]
    e = two_site_energy(R, torch.tensor([q1, 0.0], dtype=DT), zero_mu,
                        torch.stack([torch.zeros(3, 3, dtype=DT), th]), 0.0)
    ref = COULOMB * q1 * 1.5 * (R @ th @ R) / r ** 5
    assert torch.allclose(e, torch.full((2,), 0.5 * ref, dtype=DT), rtol=1e-13)
    # linear quadrupole Θ = 2qd²(ẑẑ − δ/3) from charges +q, −2q, +q: potential on the axis
    # k_e q [1/(z−d) + 1/(z+d) − 2/z] → k_e · 2qd²/z³ (the (3/2)·(2/3)·2qd²/z³ of the formula)
    theta_lin = 2.0 * (torch.outer(torch.tensor([0, 0, 1.0], dtype=DT), torch.tensor([0, 0, 1.0], dtype=DT))
                       - torch.eye(3, dtype=DT) / 3)
    p, _, _ = probe_fields(torch.tensor([0, 0, 5.0], dtype=DT), torch.zeros(1, 3, dtype=DT),
                           torch.zeros(1, dtype=DT), None, theta_lin[None], 0.0)
    assert torch.allclose(p, torch.tensor(COULOMB * 2.0 / 125.0, dtype=DT), rtol=1e-14)


def cluster_moments(offsets, charges):
    """Total charge, dipole and traceless second moment of point charges at offsets."""
    q = charges.sum()
    mu = (charges[:, None] * offsets).sum(0)
    second = torch.einsum("k,ka,kb->ab", charges, offsets, offsets)
    theta = second - torch.eye(3, dtype=DT) * second.trace() / 3
    return q, mu, theta


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_point_charges_converge_to_multipoles(sigma):
    """Fields and energies of small charge clusters → their (q, μ, Θ) fields and energies.

    Scaling a cluster's offsets by d, the first neglected moment (octupole) gives errors O(d³),
    so the error drops ~8× per halving of d (and is small in absolute terms).
    """
    gen = torch.Generator().manual_seed(2)
    offs_a = torch.randn(5, 3, generator=gen, dtype=DT)
    chg_a = torch.randn(5, generator=gen, dtype=DT)
    offs_b = torch.randn(4, 3, generator=gen, dtype=DT)
    chg_b = torch.randn(4, generator=gen, dtype=DT)
    centre_a = torch.zeros(3, dtype=DT)
    centre_b = torch.tensor([2.1, -3.3, 4.2], dtype=DT)
    probe = torch.tensor([-3.0, 2.5, 1.7], dtype=DT)
    errors_field, errors_energy = [], []
    for d in (0.08, 0.04, 0.02):
        qa, mua, tha = cluster_moments(d * offs_a, chg_a)
        qb, mub, thb = cluster_moments(d * offs_b, chg_b)
        ref_p, ref_e, ref_g = probe_fields(probe, centre_a + d * offs_a, chg_a, None, None, sigma)
        p, e, g = probe_fields(probe, centre_a[None], qa[None], mua[None], tha[None], sigma)
        errors_field.append(max((p - ref_p).abs() / ref_p.abs(), (e - ref_e).norm() / ref_e.norm(),
                                (g - ref_g).norm() / ref_g.norm()).item())
        # interaction energy of the two clusters vs the multipole-multipole energy
        pos = torch.cat([centre_a + d * offs_a, centre_b + d * offs_b])
        qs = torch.cat([chg_a, chg_b])
        batch = torch.zeros(9, dtype=torch.long)
        phi, _, _ = open_site_fields(pos, batch, qs, None, None, sigma, False)
        phi_a, _, _ = open_site_fields(pos[:5], batch[:5], chg_a, None, None, sigma, False)
        phi_b, _, _ = open_site_fields(pos[5:], batch[5:], chg_b, None, None, sigma, False)
        inter_ref = 0.5 * (qs * phi).sum() - 0.5 * (chg_a * phi_a).sum() - 0.5 * (chg_b * phi_b).sum()
        mp_pos = torch.stack([centre_a, centre_b])
        mq, mmu, mth = torch.stack([qa, qb]), torch.stack([mua, mub]), torch.stack([tha, thb])
        ph, fe, gr = open_site_fields(mp_pos, batch[:2], mq, mmu, mth, sigma, True)
        inter = site_energy(mq, mmu, mth, ph, fe, gr).sum()
        errors_energy.append(((inter - inter_ref).abs() / inter_ref.abs()).item())
    for errs in (errors_field, errors_energy):
        assert errs[-1] < 2e-4, errs
        assert errs[0] / errs[1] > 6 and errs[1] / errs[2] > 6, errs


def test_trace_of_theta_acts_through_laplacian_of_smeared_kernel():
    """For a smeared kernel ∇²φ ≠ 0, so the full (not de-traced) second moment is what a charge
    cluster converges to at short range; the trace terms of the contractions must match it."""
    gen = torch.Generator().manual_seed(21)
    offs = torch.randn(4, 3, generator=gen, dtype=DT)
    chg = torch.randn(4, generator=gen, dtype=DT)
    probe = torch.tensor([0.9, -0.6, 0.7], dtype=DT)
    sigma = 0.8
    errs_full, errs_traceless = [], []
    for d in (0.04, 0.02, 0.01):
        q = chg.sum()
        mu = (chg[:, None] * d * offs).sum(0)
        full = torch.einsum("k,ka,kb->ab", chg, d * offs, d * offs)
        traceless = full - torch.eye(3, dtype=DT) * full.trace() / 3
        ref = probe_fields(probe, d * offs, chg, None, None, sigma)
        for theta, errs in ((full, errs_full), (traceless, errs_traceless)):
            got = probe_fields(probe, torch.zeros(1, 3, dtype=DT), q[None], mu[None], theta[None], sigma)
            errs.append(max(((x - y).norm() / y.norm()).item() for x, y in zip(got, ref)))
    assert errs_full[0] / errs_full[1] > 6 and errs_full[1] / errs_full[2] > 6, errs_full
    assert errs_traceless[1] / errs_traceless[2] < 5, errs_traceless  # O(d²): trace term missing
    # and the batched sums agree with the pair loop for a non-traceless Θ
    n = 7
    pos = random_cluster(n, gen, spacing=1.5)
    q, mu, _ = multipoles(n, gen)
    theta = torch.randn(n, 3, 3, generator=gen, dtype=DT)
    theta = theta + theta.transpose(1, 2)
    batch = torch.zeros(n, dtype=torch.long)
    got = open_site_fields(pos, batch, q, mu, theta, sigma, True)
    ref = naive_open(pos, batch, q, mu, theta, sigma, True)
    for x, y in zip(got, ref):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_dipole_as_limit_of_two_charges():
    """±q/d at ±d/2 along μ̂: potential, field, gradient → the point dipole's, error O(d²)."""
    mu = torch.tensor([0.3, -0.8, 0.5], dtype=DT)
    probe = torch.tensor([1.5, 2.0, -2.5], dtype=DT)
    p_mu, e_mu, g_mu = probe_fields(probe, torch.zeros(1, 3, dtype=DT), torch.zeros(1, dtype=DT),
                                    mu[None], None, 0.0)
    # hand formula for the point dipole potential: k_e μ·R / r³
    assert torch.allclose(p_mu, COULOMB * (mu @ probe) / probe.norm() ** 3, rtol=1e-14)
    errs = []
    for d in (0.1, 0.05, 0.025):
        n = mu / mu.norm()
        src = torch.stack([0.5 * d * n, -0.5 * d * n])
        qq = torch.tensor([mu.norm() / d, -mu.norm() / d], dtype=DT)
        p, e, g = probe_fields(probe, src, qq, None, None, 0.0)
        errs.append(max(abs(p - p_mu) / abs(p_mu), (e - e_mu).norm() / e_mu.norm(),
                        (g - g_mu).norm() / g_mu.norm()).item())
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5 and errs[2] < 1e-4, errs


@pytest.mark.parametrize("sigma,beta", [(0.0, 0.0), (1.0, 0.0), (0.7, 0.4), (0.0, 0.5)])
def test_field_is_minus_gradient_and_gradient_is_symmetric(sigma, beta):
    gen = torch.Generator().manual_seed(3)
    sources = 3.0 * torch.randn(6, 3, generator=gen, dtype=DT)
    q, mu, theta = multipoles(6, gen)
    probe = torch.tensor([0.4, -0.3, 0.9], dtype=DT, requires_grad=True)
    p, e, g = probe_fields(probe, sources, q, mu, theta, sigma, beta)
    (grad_p,) = torch.autograd.grad(p, probe, create_graph=True)
    assert torch.allclose(e, -grad_p, rtol=1e-12, atol=1e-12)
    jac = torch.stack([torch.autograd.grad(e[b], probe, retain_graph=True)[0] for b in range(3)], 1)
    assert torch.allclose(g, jac, rtol=1e-12, atol=1e-12)  # G_ab = ∂_a E_b
    assert torch.allclose(g, g.T, rtol=0, atol=1e-12)
    if sigma == 0.0 and beta == 0.0:  # point sources: the potential is harmonic at the probe
        assert abs(g.trace()) < 1e-12 * g.norm()


def test_field_gradient_trace_is_charge_density():
    """tr G = ∇·E = ρ/ε0: zero for point sources, −∇²φ of the Gaussian for smeared ones."""
    sigma = 0.8
    a = width(sigma)
    probe = torch.tensor([0.3, 0.2, -0.4], dtype=DT)
    _, _, g = probe_fields(probe, torch.zeros(1, 3, dtype=DT), torch.ones(1, dtype=DT), None, None, sigma)
    r = probe.norm()
    # ∇²[erf(ar)/r] = −(4a³/√π) e^{−a²r²}  ⇒  tr G = −∇²φ = k_e (4a³/√π) e^{−a²r²}
    ref = COULOMB * 4 * a ** 3 / SQRT_PI * torch.exp(-(a * r) ** 2)
    assert torch.allclose(g.trace(), ref, rtol=1e-12)


def random_rotation(gen):
    qm, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=DT))
    return qm * torch.sign(torch.linalg.det(qm))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_energy_rotation_translation_permutation_invariance(sigma):
    gen = torch.Generator().manual_seed(4)
    n = 9
    pos = random_cluster(n, gen)
    q, mu, theta = multipoles(n, gen)
    batch = torch.zeros(n, dtype=torch.long)
    phi, field, grad = open_site_fields(pos, batch, q, mu, theta, sigma, True)
    energy = site_energy(q, mu, theta, phi, field, grad)
    rot = random_rotation(gen)
    shift = torch.tensor([10.0, -3.0, 7.0], dtype=DT)
    pos2 = pos @ rot.T + shift
    mu2 = mu @ rot.T
    theta2 = rot @ theta @ rot.T
    phi2, field2, grad2 = open_site_fields(pos2, batch, q, mu2, theta2, sigma, True)
    assert torch.allclose(phi2, phi, rtol=1e-12, atol=1e-12)
    assert torch.allclose(field2, field @ rot.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad2, rot @ grad @ rot.T, rtol=1e-12, atol=1e-12)
    energy2 = site_energy(q, mu2, theta2, phi2, field2, grad2)
    assert torch.allclose(energy2, energy, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(n, generator=gen)
    phi3, field3, grad3 = open_site_fields(pos[perm], batch, q[perm], mu[perm], theta[perm], sigma, True)
    assert torch.allclose(phi3, phi[perm], rtol=1e-12, atol=1e-12)
    assert torch.allclose(field3, field[perm], rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad3, grad[perm], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- open sums

@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("use_mu,use_theta,need_gradient", [
    (False, False, False), (False, False, True), (True, False, False), (True, False, True),
    (False, True, True), (True, True, False), (True, True, True)])
def test_open_site_fields_equal_naive_loop(sigma, use_mu, use_theta, need_gradient):
    gen = torch.Generator().manual_seed(5)
    n = 8
    pos = random_cluster(n, gen, spacing=1.5)
    q, mu, theta = multipoles(n, gen)
    mu = mu if use_mu else None
    theta = theta if use_theta else None
    batch = torch.zeros(n, dtype=torch.long)
    got = open_site_fields(pos, batch, q, mu, theta, sigma, need_gradient)
    ref = naive_open(pos, batch, q, mu, theta, sigma, need_gradient)
    for x, y in zip(got, ref):
        if y is None:
            assert x is None
        else:
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_open_batched_equals_per_structure_and_chunking_is_invisible():
    gen = torch.Generator().manual_seed(6)
    sizes = [5, 1, 11, 3]
    pos = torch.cat([random_cluster(s, gen, spacing=1.7) + 30.0 * k for k, s in enumerate(sizes)])
    n = pos.shape[0]
    q, mu, theta = multipoles(n, gen)
    batch = torch.cat([torch.full((s,), k, dtype=torch.long) for k, s in enumerate(sizes)])
    full = open_site_fields(pos, batch, q, mu, theta, 1.0, True)
    start = 0
    for k, s in enumerate(sizes):
        sl = slice(start, start + s)
        one = open_site_fields(pos[sl], torch.zeros(s, dtype=torch.long), q[sl], mu[sl], theta[sl], 1.0, True)
        for x, y in zip(full, one):
            assert torch.allclose(x[sl], y, rtol=1e-13, atol=1e-13)
        start += s
    ref = naive_open(pos, batch, q, mu, theta, 1.0, True)
    for chunk in (1, 7, 40, 1 << 20):
        got = open_site_fields(pos, batch, q, mu, theta, 1.0, True, chunk)
        for x, y in zip(got, ref):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12), chunk
    # a lone atom feels nothing
    assert torch.all(full[0][5] == 0) and torch.all(full[1][5] == 0)


def test_open_field_is_minus_derivative_of_own_potential():
    """E_i = −∂φ_i/∂r_i and G_i = ∂E_i/∂r_i (the receiver's own coordinate only)."""
    gen = torch.Generator().manual_seed(7)
    n = 6
    pos = random_cluster(n, gen).requires_grad_(True)
    q, mu, theta = multipoles(n, gen)
    batch = torch.zeros(n, dtype=torch.long)
    phi, field, grad = open_site_fields(pos, batch, q, mu, theta, 0.9, True)
    for i in range(n):
        (d,) = torch.autograd.grad(phi[i], pos, retain_graph=True)
        assert torch.allclose(field[i], -d[i], rtol=1e-12, atol=1e-12)
        for b in range(3):
            (d,) = torch.autograd.grad(field[i, b], pos, retain_graph=True)
            assert torch.allclose(grad[i, :, b], d[i], rtol=1e-11, atol=1e-11)


def test_open_double_backward_matches_finite_differences():
    """∂/∂q_k of a force-based loss: autograd (double backward) vs central differences."""
    gen = torch.Generator().manual_seed(8)
    n = 7
    pos0 = random_cluster(n, gen, spacing=1.6)
    q0, mu, theta = multipoles(n, gen)
    batch = torch.zeros(n, dtype=torch.long)
    weights = torch.randn(n, 3, generator=gen, dtype=DT)

    def loss(q, create_graph):
        pos = pos0.clone().requires_grad_(True)
        phi, field, grad = open_site_fields(pos, batch, q, mu, theta, 1.0, True)
        energy = site_energy(q, mu, theta, phi, field, grad).sum()
        (forces,) = torch.autograd.grad(-energy, pos, create_graph=create_graph)
        return (forces * weights).sum()

    q = q0.clone().requires_grad_(True)
    (dq,) = torch.autograd.grad(loss(q, True), q)
    assert torch.isfinite(dq).all()
    k, h = 3, 1e-5
    qp, qm = q0.clone(), q0.clone()
    qp[k] += h
    qm[k] -= h
    fd = (loss(qp, False) - loss(qm, False)) / (2 * h)
    assert torch.allclose(dq[k], fd, rtol=1e-7, atol=1e-9)
    # second derivative in positions (Hessian-vector product) is finite too
    pos = pos0.clone().requires_grad_(True)
    phi, field, grad = open_site_fields(pos, batch, q0, mu, theta, 0.0, True)
    energy = site_energy(q0, mu, theta, phi, field, grad).sum()
    (f,) = torch.autograd.grad(energy, pos, create_graph=True)
    (hv,) = torch.autograd.grad((f * weights).sum(), pos)
    assert torch.isfinite(hv).all()


def test_open_float32_close_to_float64():
    gen = torch.Generator().manual_seed(9)
    n = 30
    pos = random_cluster(n, gen, spacing=1.4)
    q, mu, theta = multipoles(n, gen)
    batch = torch.zeros(n, dtype=torch.long)
    ref = open_site_fields(pos, batch, q, mu, theta, 1.0, True)
    got = open_site_fields(pos.float(), batch, q.float(), mu.float(), theta.float(), 1.0, True)
    for x, y in zip(got, ref):
        assert ((x.double() - y).norm() / y.norm()) < 1e-6


def test_open_overlapping_atoms_raise():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]], dtype=DT)
    with pytest.raises(ValueError, match="position"):
        open_site_fields(pos, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=DT), None, None, 1.0, False)
    # same coordinates in different structures are fine
    phi, _, _ = open_site_fields(pos, torch.tensor([0, 0, 1]), torch.ones(3, dtype=DT), None, None, 1.0, False)
    assert phi[2] == 0


# ----------------------------------------------------------------------------- real space

def test_real_space_with_beta_zero_equals_open_sum():
    gen = torch.Generator().manual_seed(10)
    sizes = [6, 9]
    pos = torch.cat([random_cluster(s, gen, spacing=1.6) for s in sizes])
    n = pos.shape[0]
    batch = torch.tensor([0] * 6 + [1] * 9)
    q, mu, theta = multipoles(n, gen)
    cell = torch.zeros(2, 3, 3, dtype=DT)
    pbc = torch.zeros(2, 3, dtype=torch.bool)
    edge_index, shifts = neighbour_pairs(pos, cell, pbc, batch, 50.0)
    for sigma in (0.0, 1.0):
        got = real_space_site_fields(pos, cell, batch, edge_index, shifts, q, mu, theta, sigma, 0.0, True)
        ref = open_site_fields(pos, batch, q, mu, theta, sigma, True)
        for x, y in zip(got, ref):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


def test_real_space_periodic_equals_image_loop():
    """Triclinic cell, self-images included: sum over lattice images within the cutoff."""
    gen = torch.Generator().manual_seed(11)
    cell = torch.tensor([[[5.0, 0.0, 0.0], [1.2, 4.5, 0.0], [-0.7, 0.9, 5.5]]], dtype=DT)
    n = 4
    frac = torch.rand(n, 3, generator=gen, dtype=DT)
    pos = frac @ cell[0]
    q, mu, theta = multipoles(n, gen)
    batch = torch.zeros(n, dtype=torch.long)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    sigma, beta, cutoff = 1.0, 0.45, 7.0
    edge_index, shifts = neighbour_pairs(pos, cell, pbc, batch, cutoff)
    phi, field, grad = real_space_site_fields(pos, cell, batch, edge_index, shifts, q, mu, theta,
                                              sigma, beta, True)
    rng = torch.arange(-3, 4, dtype=DT)
    images = torch.stack(torch.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3) @ cell[0]
    ii, jj, kk = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(images.shape[0]),
                                indexing="ij")
    ii, jj, kk = ii.reshape(-1), jj.reshape(-1), kk.reshape(-1)
    R = pos[ii] - pos[jj] - images[kk]
    r = R.norm(dim=1)
    keep = (r > 0) & (r <= cutoff)
    ii, jj, R = ii[keep], jj[keep], R[keep]
    B = radial_derivatives(R.norm(dim=1), sigma, beta, 4)
    p, e, g = pair_site_fields(R, B, q[jj], mu[jj], theta[jj], True)
    phi_ref = torch.zeros(n, dtype=DT).index_add(0, ii, p)
    field_ref = torch.zeros(n, 3, dtype=DT).index_add(0, ii, e)
    grad_ref = torch.zeros(n, 3, 3, dtype=DT).index_add(0, ii, g)
    assert edge_index.shape[1] == int(keep.sum())
    assert torch.allclose(phi, phi_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(field, field_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_real_space_zero_length_edge_raises():
    pos = torch.tensor([[0.0, 0, 0], [0.0, 0, 0]], dtype=DT)
    cell = 10.0 * torch.eye(3, dtype=DT)[None]
    batch = torch.zeros(2, dtype=torch.long)
    edge_index = torch.tensor([[0, 1], [1, 0]])
    shifts = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="positions"):
        real_space_site_fields(pos, cell, batch, edge_index, shifts, torch.ones(2, dtype=DT), None,
                               None, 1.0, 0.3, False)


# ----------------------------------------------------------------------------- TorchScript

class _Wrapper(torch.nn.Module):
    def __init__(self, sigma: float, beta: float):
        super().__init__()
        self.sigma = sigma
        self.beta = beta

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                edge_index: torch.Tensor, shifts: torch.Tensor, q: torch.Tensor,
                mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        p, f, g = direct.open_site_fields(positions, batch, q, mu, theta, self.sigma, True, 64)
        e = kernels.site_energy(q, mu, theta, p, f, g)
        p2, f2, g2 = direct.real_space_site_fields(positions, cell, batch, edge_index, shifts, q,
                                                   None, None, self.sigma, self.beta, False)
        return e + kernels.site_energy(q, None, None, p2, f2, g2)


def test_torchscript():
    gen = torch.Generator().manual_seed(12)
    n = 6
    pos = random_cluster(n, gen)
    q, mu, theta = multipoles(n, gen)
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    cell = 9.0 * torch.eye(3, dtype=DT).repeat(2, 1, 1)
    edge_index, shifts = neighbour_pairs(pos, cell, torch.ones(2, 3, dtype=torch.bool), batch, 6.0)
    module = _Wrapper(1.0, 0.4)
    scripted = torch.jit.script(module)
    args = (pos, cell, batch, edge_index, shifts, q, mu, theta)
    assert torch.allclose(scripted(*args), module(*args), rtol=1e-14, atol=0)
    for fn in (kernels.radial_derivatives, kernels.pair_site_fields, kernels.site_energy,
               direct.open_site_fields, direct.real_space_site_fields):
        torch.jit.script(fn)
    # forces through the scripted module
    p = pos.clone().requires_grad_(True)
    (f,) = torch.autograd.grad(scripted(p, cell, batch, edge_index, shifts, q, mu, theta).sum(), p)
    assert torch.isfinite(f).all()


# ----------------------------------------------------------------------------- scale

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_open_2000_atoms_quadrupoles_memory(dtype):
    """2,000 atoms with q, μ, Θ (σ = 1): energy + forces by autograd stay finite and under 4 GB
    (the pairwise route is chunked; an unchunked [N,N,3,3] table would need far more).

    The times are printed (run with -s) but not asserted: they depend on the machine and on what
    else runs. `python benchmarks/electrostatics_scaling.py` measures them against an anchor.
    """
    gen = torch.Generator().manual_seed(13)
    n = 2000
    pos = random_cluster(n, gen, spacing=2.15, dtype=dtype).requires_grad_(True)  # ~0.1 atoms/Å³
    q, mu, theta = multipoles(n, gen, dtype)
    batch = torch.zeros(n, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu = time.perf_counter(), time.process_time()
        phi, field, grad = open_site_fields(pos, batch, q, mu, theta, 1.0, True)
        energy = site_energy(q, mu, theta, phi, field, grad).sum()
        (forces,) = torch.autograd.grad(-energy, pos)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"\n2000 atoms q+mu+theta {dtype}, 1 thread: cpu {cpu:.2f} s, wall {wall:.2f} s, "
          f"peak RSS {peak_mb:.0f} MB (before {before / 1024.0:.0f} MB)")
    assert torch.isfinite(forces).all()
    assert peak_mb < 4096

"""Smooth PME (polarmace.electrostatics.pme) against a brute-force reciprocal k-sum.

The reference below is written independently of the module: it enumerates the integer cube of
reciprocal-lattice vectors and evaluates, for Gaussian-smeared multipoles (kernel erf(βr)/r),

    S(k)  = Σ_j (q_j + i k·μ_j − ½ kᵀΘ_j k) e^{ik·r_j}
    φ_i   = (1/(ε0 V)) Σ_{k≠0} e^{−k²/4β²}/k² Re[S(k) e^{−ik·r_i}],  E = −∇φ,  G = −∇∇φ
    U     = (1/(2 ε0 V)) Σ_{k≠0} e^{−k²/4β²}/k² |S(k)|²
"""

import math
import os
import resource
import time

import numpy as np
import pytest
import torch

from polarmace.electrostatics.pme import (
    choose_mesh,
    mesh_spacing,
    pme_energy,
    pme_site_fields,
)
from polarmace.units import EPSILON0

BETA = 1.0 / math.sqrt(2.0)  # σ = 1 Å, β = a (reciprocal-only split)

CELLS = {
    "cubic": np.eye(3) * 8.0,
    "triclinic": np.array([[8.0, 0.0, 0.0], [2.1, 7.6, 0.0], [-1.3, 1.7, 8.4]]),
    # left-handed (det < 0), non-orthogonal
    "left": np.array([[0.0, 8.2, 0.3], [7.9, 0.0, -1.1], [1.2, 0.8, 8.1]]),
}


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def exact_reciprocal(pos, cell, q, mu, theta, beta, tol=1e-17):
    """Brute-force k-sum: loops over the integer cube n ∈ [−n_max, n_max]³ (vectorised)."""
    pos = np.asarray(pos, float)
    cell = np.asarray(cell, float)
    recip = 2.0 * np.pi * np.linalg.inv(cell).T  # rows b_c, k = n @ recip
    volume = abs(np.linalg.det(cell))
    kmax = 2.0 * beta * math.sqrt(-math.log(tol))
    # |n_c| ≤ |k||a_c|/2π for any k with |k| ≤ kmax
    nmax = [int(math.ceil(kmax * np.linalg.norm(cell[c]) / (2 * np.pi))) + 1 for c in range(3)]
    grids = np.meshgrid(*[np.arange(-m, m + 1) for m in nmax], indexing="ij")
    n = np.stack(grids, -1).reshape(-1, 3)
    n = n[np.any(n != 0, axis=1)]
    k = n @ recip
    k2 = (k * k).sum(1)
    f = np.exp(-k2 / (4 * beta * beta)) / k2
    keep = f > tol * 1e-6
    k, f = k[keep], f[keep]
    phase = np.exp(1j * pos @ k.T)  # [N, K]
    src = (q[:, None] + 1j * (mu @ k.T) - 0.5 * np.einsum("ka,nab,kb->nk", k, theta, k))
    s = (src * phase).sum(0)
    a = f * s / (EPSILON0 * volume)
    w = a[None, :] * np.conj(phase)  # [N, K]
    phi = w.real.sum(1)
    field = (1j * w[:, :, None] * k[None]).real.sum(1)
    grad = (w[:, :, None, None] * k[None, :, :, None] * k[None, :, None, :]).real.sum(1)
    energy = 0.5 * (f * np.abs(s) ** 2).sum() / (EPSILON0 * volume)
    return phi, field, grad, energy


def random_system(n, cell, seed, kinds="qmt"):
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 3)) @ cell + rng.normal(scale=3.0, size=3)  # not wrapped into the cell
    q = rng.normal(size=n) if "q" in kinds else np.zeros(n)
    mu = rng.normal(size=(n, 3)) if "m" in kinds else np.zeros((n, 3))
    th = rng.normal(size=(n, 3, 3))
    th = 0.5 * (th + th.transpose(0, 2, 1))
    th -= np.eye(3) * np.trace(th, axis1=1, axis2=2)[:, None, None] / 3.0
    if "t" not in kinds:
        th[:] = 0.0
    return pos, q, mu, th


def rel_rms(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def t64(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def run_pme(pos, cell, q, mu, th, mesh, order=6, kinds="qmt", gradient=True, dtype=torch.float64):
    n = len(pos)
    args = dict(
        positions=t64(pos).to(dtype),
        batch=torch.zeros(n, dtype=torch.long),
        cell=t64(cell)[None].to(dtype),
        q=t64(q).to(dtype),
        mu=t64(mu).to(dtype) if "m" in kinds else None,
        theta=t64(th).to(dtype) if "t" in kinds else None,
        beta=BETA,
        mesh=list(mesh),
        order=order,
    )
    phi, field, grad = pme_site_fields(need_gradient=gradient, **args)
    energy = pme_energy(**args)
    return phi, field, grad, energy


# ------------------------------------------------------------------------------------------------
# accuracy against the exact k-sum
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cellname", list(CELLS))
@pytest.mark.parametrize("kinds", ["q", "qm", "qmt"])
def test_matches_exact_ksum(cellname, kinds):
    cell = CELLS[cellname]
    pos, q, mu, th = random_system(24, cell, seed=hash((cellname, kinds)) % 1000, kinds=kinds)
    phi0, e0, g0, u0 = exact_reciprocal(pos, cell, q, mu, th, BETA)
    mesh = choose_mesh(t64(cell)[None], BETA, accuracy=1e-6, order=6)
    phi, field, grad, energy = run_pme(pos, cell, q, mu, th, mesh, order=6, kinds=kinds)
    # energy from site fields equals the mesh energy (gather is the adjoint of spreading)
    qt, mt, tt = t64(q), t64(mu), t64(th)
    u_sites = 0.5 * (qt * phi - (mt * field).sum(1) - 0.5 * (tt * grad).sum((1, 2))).sum()
    assert abs(u_sites.item() - energy.item()) <= 1e-10 * abs(energy.item())

    # default max_rank=2 (mesh fine enough for quadrupoles): observed φ, E, U ≲ 3e-7 and
    # G ≲ 2e-6 (G is one derivative rougher than E)
    assert rel_rms(phi.numpy(), phi0) < 1e-5
    assert rel_rms(field.numpy(), e0) < 1e-5
    assert rel_rms(grad.numpy(), g0) < 1e-5
    assert abs(energy.item() - u0) < 1e-5 * abs(u0)


@pytest.mark.parametrize("kinds", ["q", "qmt"])
def test_error_decreases_with_mesh(kinds):
    cell = CELLS["triclinic"]
    pos, q, mu, th = random_system(20, cell, seed=3, kinds=kinds)
    phi0, e0, g0, u0 = exact_reciprocal(pos, cell, q, mu, th, BETA)
    errors = []
    for k in (12, 16, 20, 24, 32, 40):
        phi, field, grad, energy = run_pme(pos, cell, q, mu, th, (k, k, k), order=6, kinds=kinds)
        errors.append((rel_rms(phi.numpy(), phi0), rel_rms(field.numpy(), e0),
                       rel_rms(grad.numpy(), g0)))
    errors = np.array(errors)
    assert np.all(np.diff(np.log(errors), axis=0) < 0), errors
    # algebraic convergence: at least ~h^3 between K = 20 and K = 40 (quadrupole sources spread
    # with second spline derivatives converge about two orders slower than charges)
    assert np.all(errors[-1] < errors[2] / 2 ** 3)


def test_higher_order_is_more_accurate():
    cell = CELLS["cubic"]
    pos, q, mu, th = random_system(20, cell, seed=4)
    _, e0, _, _ = exact_reciprocal(pos, cell, q, mu, th, BETA)
    errs = [rel_rms(run_pme(pos, cell, q, mu, th, (24, 24, 24), order=p)[1].numpy(), e0)
            for p in (5, 6, 8, 10)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("accuracy,order,kinds", [
    (1e-4, 5, "qmt"), (1e-5, 6, "q"), (1e-6, 6, "qm"), (1e-6, 8, "t"), (1e-6, 8, "qmt"),
    (1e-7, 10, "qmt"), (1e-8, 8, "q"),
])
def test_choose_mesh_meets_accuracy(accuracy, order, kinds):
    """The calibrated rule gives a field error close to (not above, not far below) the target."""
    cell = CELLS["left"]
    pos, q, mu, th = random_system(50, cell, seed=5, kinds=kinds)
    _, e0, _, _ = exact_reciprocal(pos, cell, q, mu, th, BETA)
    rank = 2 if "t" in kinds else (1 if "m" in kinds else 0)
    mesh = choose_mesh(t64(cell)[None], BETA, accuracy=accuracy, order=order, max_rank=rank)
    assert all(isinstance(m, int) and m >= order for m in mesh)
    for m in mesh:  # 2·3·5-smooth
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1
    err = rel_rms(run_pme(pos, cell, q, mu, th, mesh, order=order, kinds=kinds,
                          gradient=False)[1].numpy(), e0)
    assert err < 2.0 * accuracy
    assert err > accuracy / 300.0  # not absurdly over-resolved


def test_choose_mesh_batch_and_monotone():
    cells = torch.stack([t64(CELLS["cubic"]), t64(CELLS["triclinic"]) * 1.5])
    mesh = choose_mesh(cells, BETA, 1e-6, 6)
    single = [choose_mesh(c[None], BETA, 1e-6, 6) for c in cells]
    assert all(mesh[c] == max(s[c] for s in single) for c in range(3))
    assert mesh_spacing(BETA, 1e-8, 6) < mesh_spacing(BETA, 1e-6, 6) < mesh_spacing(BETA, 1e-4, 6)
    assert mesh_spacing(BETA, 1e-6, 8) > mesh_spacing(BETA, 1e-6, 6)
    assert mesh_spacing(0.5 * BETA, 1e-6, 6) == pytest.approx(2.0 * mesh_spacing(BETA, 1e-6, 6))


# ------------------------------------------------------------------------------------------------
# batching, invariances, derivatives
# ------------------------------------------------------------------------------------------------
def _batch(systems, dtype=torch.float64):
    pos = torch.cat([t64(s[0]) for s in systems]).to(dtype)
    batch = torch.cat([torch.full((len(s[0]),), i, dtype=torch.long)
                       for i, s in enumerate(systems)])
    q = torch.cat([t64(s[1]) for s in systems]).to(dtype)
    mu = torch.cat([t64(s[2]) for s in systems]).to(dtype)
    th = torch.cat([t64(s[3]) for s in systems]).to(dtype)
    return pos, batch, q, mu, th


def test_batched_equals_single():
    cells = [CELLS["cubic"], CELLS["triclinic"] * 1.2, CELLS["left"] * 0.9]
    systems = [random_system(n, c, seed=10 + i) for i, (n, c) in enumerate(zip((7, 19, 12), cells))]
    cell_t = torch.stack([t64(c) for c in cells])
    mesh = [20, 24, 18]
    pos, batch, q, mu, th = _batch(systems)
    phi, field, grad = pme_site_fields(pos, batch, cell_t, q, mu, th, BETA, mesh, 6, True)
    energy = pme_energy(pos, batch, cell_t, q, mu, th, BETA, mesh, 6)
    assert energy.shape == (3,)
    start = 0
    for i, s in enumerate(systems):
        n = len(s[0])
        p1, f1, g1, u1 = run_pme(s[0], cells[i], s[1], s[2], s[3], mesh)
        sl = slice(start, start + n)
        torch.testing.assert_close(phi[sl], p1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(field[sl], f1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad[sl], g1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(energy[i], u1[0], rtol=1e-12, atol=1e-12)
        start += n
    # batch order need not be sorted
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))
    phi_p, field_p, _ = pme_site_fields(pos[perm], batch[perm], cell_t, q[perm], mu[perm],
                                        th[perm], BETA, mesh, 6, False)
    torch.testing.assert_close(phi_p, phi[perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(field_p, field[perm], rtol=1e-12, atol=1e-12)


def test_chunking_is_exact():
    """Stencil work split into chunks of sites gives the same numbers and derivatives."""
    cells = [CELLS["triclinic"], CELLS["left"] * 1.1]
    systems = [random_system(n, c, seed=20 + i) for i, (n, c) in enumerate(zip((13, 17), cells))]
    cell_t = torch.stack([t64(c) for c in cells])
    pos, batch, q, mu, th = _batch(systems)
    results = []
    for chunk in (0, 1, 7):
        p = pos.clone().requires_grad_()
        phi, field, grad = pme_site_fields(p, batch, cell_t, q, mu, th, BETA, [16, 18, 20], 6, True,
                                           chunk_size=chunk)
        u = pme_energy(p, batch, cell_t, q, mu, th, BETA, [16, 18, 20], 6, chunk_size=chunk)
        (f,) = torch.autograd.grad(u.sum() + (phi ** 2).sum() + (grad ** 2).sum(), p)
        results.append((phi, field, grad, u, f))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_translation_invariance():
    cell = CELLS["triclinic"]
    pos, q, mu, th = random_system(20, cell, seed=6)
    mesh = choose_mesh(t64(cell)[None], BETA, 1e-6, 6)
    u0 = run_pme(pos, cell, q, mu, th, mesh)[3].item()
    rng = np.random.default_rng(0)
    for _ in range(3):
        u1 = run_pme(pos + rng.normal(size=3), cell, q, mu, th, mesh)[3].item()
        assert abs(u1 - u0) < 1e-6 * abs(u0)
    # a whole lattice vector is an exact symmetry of the mesh
    u2 = run_pme(pos + cell[1], cell, q, mu, th, mesh)[3].item()
    assert abs(u2 - u0) < 1e-12 * abs(u0)


def _energy_fn(kinds, cell, mesh, order=6, via_fields=False):
    def fn(pos_t, cell_t, q_t, mu_t, th_t):
        b = torch.zeros(len(pos_t), dtype=torch.long)
        mu_a = mu_t if "m" in kinds else None
        th_a = th_t if "t" in kinds else None
        if via_fields:
            phi, field, grad = pme_site_fields(pos_t, b, cell_t[None], q_t, mu_a, th_a, BETA, mesh,
                                               order, "t" in kinds)
            u = (q_t * phi).sum()
            if mu_a is not None:
                u = u - (mu_a * field).sum()
            if th_a is not None:
                assert grad is not None
                u = u - 0.5 * (th_a * grad).sum()
            return 0.5 * u
        return pme_energy(pos_t, b, cell_t[None], q_t, mu_a, th_a, BETA, mesh, order)[0]
    return fn


@pytest.mark.parametrize("kinds", ["q", "qm", "qmt"])
def test_forces_match_finite_differences(kinds):
    cell = CELLS["left"]
    pos, q, mu, th = random_system(12, cell, seed=7, kinds=kinds)
    mesh = [16, 18, 16]
    fn = _energy_fn(kinds, cell, mesh)
    pos_t = t64(pos).requires_grad_()
    args = (t64(cell), t64(q), t64(mu), t64(th))
    u = fn(pos_t, *args)
    (grad,) = torch.autograd.grad(u, pos_t)
    # the site-field route gives the same energy and forces
    pos_t2 = t64(pos).requires_grad_()
    u_f = _energy_fn(kinds, cell, mesh, via_fields=True)(pos_t2, *args)
    (grad_f,) = torch.autograd.grad(u_f, pos_t2)
    torch.testing.assert_close(u_f, u, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grad_f, grad, rtol=1e-9, atol=1e-9)
    h = 1e-5
    for i in (0, 5, 11):
        for a in range(3):
            dp = torch.zeros_like(pos_t)
            dp[i, a] = h
            with torch.no_grad():
                fd = (fn(t64(pos) + dp, *args) - fn(t64(pos) - dp, *args)) / (2 * h)
            assert abs(fd.item() - grad[i, a].item()) < 1e-6 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("kinds", ["q", "qmt"])
def test_strain_derivative(kinds):
    cell = CELLS["triclinic"]
    pos, q, mu, th = random_system(12, cell, seed=8, kinds=kinds)
    mesh = [16, 16, 18]
    fn = _energy_fn(kinds, cell, mesh)
    eye = torch.eye(3, dtype=torch.float64)

    def strained(eps):
        m = eye + eps
        return fn(t64(pos) @ m, t64(cell) @ m, t64(q), t64(mu), t64(th))

    eps = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    (dude,) = torch.autograd.grad(strained(eps), eps)
    h = 1e-6
    for a in range(3):
        for b in range(3):
            d = torch.zeros(3, 3, dtype=torch.float64)
            d[a, b] = h
            with torch.no_grad():
                fd = (strained(d) - strained(-d)) / (2 * h)
            assert abs(fd.item() - dude[a, b].item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_gradcheck_and_double_backward():
    """Analytic first and second derivatives of φ, E, G w.r.t. positions, cell and multipoles."""
    cell = CELLS["triclinic"] * 0.6
    pos, q, mu, th = random_system(3, cell, seed=9)
    mesh = [6, 7, 8]
    b = torch.zeros(3, dtype=torch.long)

    def fn(pos_t, cell_t, q_t, mu_t, th_t):
        th_s = 0.5 * (th_t + th_t.transpose(1, 2))
        return pme_site_fields(pos_t, b, cell_t[None], q_t, mu_t, th_s, BETA, mesh, 5, True)

    inputs = tuple(t64(x).requires_grad_() for x in (pos, cell, q, mu, th))
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_force_training_double_backward():
    """Loss on forces (create_graph) back-propagates to the multipoles and the cell."""
    cell = CELLS["cubic"]
    pos, q, mu, th = random_system(10, cell, seed=11)
    mesh = [16, 16, 16]
    pos_t = t64(pos).requires_grad_()
    cell_t, q_t, mu_t, th_t = (t64(x).requires_grad_() for x in (cell, q, mu, th))
    fn = _energy_fn("qmt", cell, mesh, via_fields=True)
    u = fn(pos_t, cell_t, q_t, mu_t, th_t)
    (forces,) = torch.autograd.grad(-u, pos_t, create_graph=True)
    loss = (forces ** 2).sum()
    gq, gmu, gth, gcell = torch.autograd.grad(loss, (q_t, mu_t, th_t, cell_t))
    for g in (gq, gmu, gth, gcell):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # check d(loss)/dq against finite differences
    h = 1e-6
    for i in (0, 7):
        dq = torch.zeros_like(q_t)
        dq[i] = h
        vals = []
        for sgn in (1, -1):
            pp = t64(pos).requires_grad_()
            uu = fn(pp, t64(cell), t64(q) + sgn * dq, t64(mu), t64(th))
            (ff,) = torch.autograd.grad(-uu, pp)
            vals.append((ff ** 2).sum().item())
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(fd - gq[i].item()) < 1e-5 * max(1.0, abs(fd))


def test_float32_matches_float64():
    cell = CELLS["triclinic"]
    pos, q, mu, th = random_system(30, cell, seed=12)
    mesh = [24, 24, 24]
    r64 = run_pme(pos, cell, q, mu, th, mesh)
    r32 = run_pme(pos, cell, q, mu, th, mesh, dtype=torch.float32)
    for a, b in zip(r32, r64):
        assert a.dtype == torch.float32
        assert rel_rms(a.double().numpy(), b.numpy()) < 1e-5
    # forces in float32
    fn = _energy_fn("qmt", cell, mesh)
    grads = []
    for dt in (torch.float32, torch.float64):
        p = t64(pos).to(dt).requires_grad_()
        u = fn(p, *(t64(x).to(dt) for x in (cell, q, mu, th)))
        grads.append(torch.autograd.grad(u, p)[0].double().numpy())
    assert rel_rms(grads[0], grads[1]) < 1e-4


def test_torchscript():
    scripted = torch.jit.script(pme_site_fields)
    scripted_energy = torch.jit.script(pme_energy)
    cell = CELLS["left"]
    pos, q, mu, th = random_system(9, cell, seed=13)
    b = torch.zeros(9, dtype=torch.long)
    args = (t64(pos), b, t64(cell)[None], t64(q), t64(mu), t64(th), BETA, [12, 15, 16], 6)
    ref = pme_site_fields(*args, need_gradient=True)
    out = scripted(*args, need_gradient=True)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(scripted_energy(*args), pme_energy(*args))
    # forces through the scripted function
    forces = []
    for f in (pme_site_fields, scripted):
        p = t64(pos).requires_grad_()
        phi, field, _ = f(p, *args[1:], need_gradient=False)
        u = 0.5 * ((t64(q) * phi).sum() - (t64(mu) * field).sum())
        forces.append(torch.autograd.grad(u, p)[0])
    torch.testing.assert_close(forces[1], forces[0])
    scripted_mesh = torch.jit.script(choose_mesh)
    cells = torch.stack([t64(CELLS["left"]), t64(CELLS["triclinic"]) * 2])
    for rank in (0, 1, 2):
        assert scripted_mesh(cells, BETA, 1e-6, 8, rank) == choose_mesh(cells, BETA, 1e-6, 8, rank)


def test_order_checks():
    cell = CELLS["cubic"]
    pos, q, mu, th = random_system(4, cell, seed=1)
    with pytest.raises(ValueError):
        run_pme(pos, cell, q, mu, th, (10, 10, 10), order=4, kinds="qmt", gradient=False)
    with pytest.raises(ValueError):
        run_pme(pos, cell, q, mu, th, (10, 10, 10), order=3, kinds="qm", gradient=False)
    run_pme(pos, cell, q, mu, th, (10, 10, 10), order=3, kinds="q", gradient=False)


# ------------------------------------------------------------------------------------------------
# building blocks: spline table, symmetric convolution, site sorting, influence cache
# ------------------------------------------------------------------------------------------------
def _cardinal_bspline(order, x):
    """M_n(x) by the Cox–de Boor recursion M_p(x) = [x M_{p−1}(x) + (p − x) M_{p−1}(x − 1)]/(p − 1)."""
    if order == 1:
        return np.where((x >= 0.0) & (x < 1.0), 1.0, 0.0)
    return (x * _cardinal_bspline(order - 1, x)
            + (order - x) * _cardinal_bspline(order - 1, x - 1.0)) / (order - 1)


def _cardinal_bspline_derivative(order, x, d):
    """d-th derivative from M_n' (x) = M_{n−1}(x) − M_{n−1}(x − 1), applied d times."""
    if d == 0:
        return _cardinal_bspline(order, x)
    return (_cardinal_bspline_derivative(order - 1, x, d - 1)
            - _cardinal_bspline_derivative(order - 1, x - 1.0, d - 1))


@pytest.mark.parametrize("order", [3, 5, 8, 10, 12])
def test_bspline_table_matches_recursion(order):
    from polarmace.electrostatics.pme import _bspline_table

    w = np.random.default_rng(order).random(64)
    nderiv = min(order, 5)
    table = _bspline_table(t64(w), order, nderiv).numpy()  # [64, nderiv+1, order]
    for d in range(nderiv + 1):
        for j in range(order):
            ref = _cardinal_bspline_derivative(order, w + j, d) if d < order else 0.0 * w
            np.testing.assert_allclose(table[:, d, j], ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))
    # partition of unity and float32 agreement
    np.testing.assert_allclose(table[:, 0].sum(1), 1.0, atol=1e-14)
    t32 = _bspline_table(t64(w).float(), order, nderiv).double().numpy()
    assert np.abs(t32 - table).max() < 1e-5


def test_symmetric_convolution_is_its_own_adjoint():
    """The custom backward (one more convolution) equals autograd through the FFTs, to second
    order (a force-trained loss differentiates the convolution twice)."""
    from polarmace.electrostatics.pme import _SymmetricConvolution, _convolve_fft, influence_function

    mesh = [6, 5, 8]  # odd and even sizes (Nyquist planes)
    infl = influence_function(t64(CELLS["triclinic"])[None], BETA, mesh, 6)
    gen = torch.Generator().manual_seed(3)
    grid = torch.randn(6 * 5 * 8, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(6 * 5 * 8, generator=gen, dtype=torch.float64)
    ours = _SymmetricConvolution.apply(grid, infl, mesh)
    plain = _convolve_fft(grid, infl, mesh)
    scale = float(plain.abs().max())
    assert torch.allclose(ours, plain, rtol=0, atol=1e-14 * scale)
    g_ours = torch.autograd.grad((ours * probe).sum(), grid, create_graph=True)[0]
    g_plain = torch.autograd.grad((plain * probe).sum(), grid, create_graph=True)[0]
    assert torch.allclose(g_ours, g_plain, rtol=0, atol=1e-14 * float(g_plain.abs().max()))
    assert torch.autograd.gradcheck(lambda g: _SymmetricConvolution.apply(g, infl, mesh), (grid,))
    assert torch.autograd.gradgradcheck(lambda g: _SymmetricConvolution.apply(g, infl, mesh) ** 2, (grid,))


def test_sorted_and_unsorted_sites_agree(monkeypatch):
    """Large meshes sort the sites along the mesh (cache locality); the result and the forces do
    not depend on it."""
    from polarmace.electrostatics import pme

    cell = CELLS["left"]
    pos, q, mu, th = random_system(40, cell, seed=9)

    def fields_and_forces():
        p = t64(pos).requires_grad_(True)
        phi, field, grad = pme_site_fields(p, torch.zeros(40, dtype=torch.long), t64(cell)[None],
                                           t64(q), t64(mu), t64(th), BETA, [20, 18, 24], 8, True)
        u = 0.5 * ((t64(q) * phi).sum() - (t64(mu) * field).sum() - 0.5 * (t64(th) * grad).sum())
        return phi, field, grad, torch.autograd.grad(u, p)[0]

    monkeypatch.setattr(pme, "_sort_mesh_points", lambda: 10 ** 9)
    unsorted = fields_and_forces()
    monkeypatch.setattr(pme, "_sort_mesh_points", lambda: 0)
    sorted_ = fields_and_forces()
    for a, b in zip(unsorted, sorted_):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_influence_cache_follows_the_cell():
    """At fixed cell the influence table is reused; a changed cell or a cell under autograd
    gets its own (checked against the uncached evaluation)."""
    from polarmace.electrostatics.pme import _influence_uncached, influence_function

    mesh = [12, 10, 14]
    for name in CELLS:
        cell = t64(CELLS[name])[None]
        ref = _influence_uncached(cell, BETA, mesh, 8)
        assert torch.equal(influence_function(cell, BETA, mesh, 8), ref)
        strained = cell * 1.01
        assert torch.equal(influence_function(strained, BETA, mesh, 8),
                           _influence_uncached(strained, BETA, mesh, 8))
        with_grad = cell.clone().requires_grad_(True)
        table = influence_function(with_grad, BETA, mesh, 8)
        assert table.requires_grad and torch.allclose(table, ref, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------------
# timing (run with -m slow -s to see the numbers)
# ------------------------------------------------------------------------------------------------
def _water_density_system(n, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    length = (n / 0.1) ** (1.0 / 3.0)
    pos = torch.rand(n, 3, generator=gen, dtype=dtype) * length
    q = torch.randn(n, generator=gen, dtype=dtype)
    q = q - q.mean()
    mu = torch.randn(n, 3, generator=gen, dtype=dtype)
    th = torch.randn(n, 3, 3, generator=gen, dtype=dtype)
    th = 0.5 * (th + th.transpose(1, 2))
    th = th - torch.eye(3, dtype=dtype) * th.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / 3
    cell = torch.eye(3, dtype=dtype)[None] * length
    return pos, cell, q, mu, th


@pytest.mark.slow
@pytest.mark.parametrize("natoms", [12288, 98304])
@pytest.mark.parametrize("order", [10])
def test_energy_forces_at_scale(natoms, order):
    """Energy (from φ, E, G with q, μ, Θ) + forces by autograd at water density, σ = 1 Å
    (β = a = 1/√2, reciprocal-only), mesh from choose_mesh(accuracy=1e-6): finite forces at
    98,304 atoms. Times are printed (-s), not asserted (they depend on the machine);
    `python benchmarks/electrostatics_scaling.py` measures them against the anchor."""
    pos, cell, q, mu, th = _water_density_system(natoms)
    mesh = choose_mesh(cell, BETA, 1e-6, order)
    batch = torch.zeros(natoms, dtype=torch.long)
    pos.requires_grad_()
    c0 = time.process_time()
    t0 = time.perf_counter()
    phi, field, grad = pme_site_fields(pos, batch, cell, q, mu, th, BETA, mesh, order, True)
    u = 0.5 * ((q * phi).sum() - (mu * field).sum() - 0.5 * (th * grad).sum())
    t1 = time.perf_counter()
    (f,) = torch.autograd.grad(-u, pos)
    t2 = time.perf_counter()
    cpu = time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    print(f"\nPME N={natoms} order={order} mesh={mesh} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.1f}: fields+energy {t1 - t0:.2f} s, forces {t2 - t1:.2f} s, "
          f"total {t2 - t0:.2f} s (cpu {cpu:.2f} s), peak RSS {rss:.0f} MiB")
    assert torch.isfinite(f).all()

"""Reciprocal-space Ewald sums (polarmace/electrostatics/ewald.py), float64.

References: a brute-force numpy k-sum over a full ±n integer cube with complex exponentials, a
brute-force real-space sum (the Ewald split independence of erf(βr)/r), autograd identities of
the bilinear energy and finite differences.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from polarmace.electrostatics.ewald import (
    converged_kvectors,
    kmax_for_accuracy,
    les_kvectors,
    reciprocal_energy,
    reciprocal_site_fields,
)
from polarmace.units import COULOMB, EPSILON0

DTYPE = torch.float64
SIGMA_BETA = 1.0 / math.sqrt(2.0)  # β = a for σ = 1 Å

TRICLINIC = np.array([[6.3, 0.0, 0.0], [1.7, 5.6, 0.0], [-1.1, 1.3, 7.2]])
LEFT_HANDED = np.array([[0.4, 5.9, 0.6], [6.1, -0.3, 0.9], [0.8, 1.2, 6.8]])  # det < 0


def _traceless(a):
    s = 0.5 * (a + a.transpose(-1, -2))
    trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return s - torch.eye(3, dtype=a.dtype) * trace / 3


def _system(cell, n, seed, dipoles=True, quadrupoles=True, neutral=True):
    g = torch.Generator().manual_seed(seed)
    cell = torch.as_tensor(cell, dtype=DTYPE)
    pos = torch.rand(n, 3, generator=g, dtype=DTYPE) @ cell
    q = torch.randn(n, generator=g, dtype=DTYPE) * 0.5
    if neutral:
        q = q - q.mean()
    mu = 0.3 * torch.randn(n, 3, generator=g, dtype=DTYPE) if dipoles else None
    theta = None
    if quadrupoles:
        theta = _traceless(0.3 * torch.randn(n, 3, 3, generator=g, dtype=DTYPE))
    return pos, cell, q, mu, theta


def _single(pos, cell, q, mu, theta, beta, kset="converged", accuracy=1e-14, need_gradient=True,
            chunk_size=0):
    batch = torch.zeros(pos.shape[0], dtype=torch.long)
    cell_b = cell.unsqueeze(0)
    if kset == "converged":
        k, m = converged_kvectors(cell_b, kmax_for_accuracy(beta, accuracy))
    else:
        k, m = les_kvectors(cell_b)
    fields = reciprocal_site_fields(pos, batch, cell_b, q, mu, theta, beta, k, m, need_gradient,
                                    chunk_size)
    energy = reciprocal_energy(pos, batch, cell_b, q, mu, theta, beta, k, m, chunk_size)
    return fields, energy


def _energy_from_fields(q, mu, theta, phi, field, grad):
    e = q @ phi
    if mu is not None:
        e = e - (mu * field).sum()
    if theta is not None:
        e = e - 0.5 * (theta * grad).sum()
    return 0.5 * e


# --------------------------------------------------------------------------- brute-force references

def _brute_force_kspace(pos, cell, q, mu, theta, beta, nmax):
    """Plain loops over n in [−nmax, nmax]³ (both ±k), complex exponentials."""
    pos, cell, q = np.asarray(pos), np.asarray(cell), np.asarray(q)
    n_atoms = len(q)
    mu = np.zeros((n_atoms, 3)) if mu is None else np.asarray(mu)
    theta = np.zeros((n_atoms, 3, 3)) if theta is None else np.asarray(theta)
    volume = abs(np.linalg.det(cell))
    recip = 2.0 * np.pi * np.linalg.inv(cell).T
    phi = np.zeros(n_atoms)
    field = np.zeros((n_atoms, 3))
    grad = np.zeros((n_atoms, 3, 3))
    energy = 0.0
    for n in itertools.product(range(-nmax, nmax + 1), repeat=3):
        if n == (0, 0, 0):
            continue
        k = np.array(n, dtype=float) @ recip
        k2 = k @ k
        pref = np.exp(-k2 / (4.0 * beta**2)) / k2 / (EPSILON0 * volume)
        s = 0j
        for j in range(n_atoms):
            s += (q[j] + 1j * (k @ mu[j]) - 0.5 * (k @ theta[j] @ k)) * np.exp(1j * (k @ pos[j]))
        energy += 0.5 * pref * abs(s) ** 2
        for i in range(n_atoms):
            c = s * np.exp(-1j * (k @ pos[i]))
            phi[i] += pref * c.real
            field[i] += pref * (1j * k * c).real  # −∇ of e^{−ik·r}
            grad[i] += pref * (np.outer(k, k) * c).real  # −∇∇ of e^{−ik·r}
    return phi, field, grad, energy


def _brute_force_realspace_difference(pos, cell, q, beta1, beta2, rcut):
    """½ Σ_{i,j,n}' q_i q_j k_e [erf(β1 r) − erf(β2 r)]/r + r → 0 limit of the i = j, n = 0 term.

    This equals E_rec(β1) − E_rec(β2) for a neutral set of charges (both include the self image).
    """
    from math import erf
    pos, cell, q = np.asarray(pos), np.asarray(cell), np.asarray(q)
    areas = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    heights = abs(np.linalg.det(cell)) / areas
    nrep = [int(np.ceil(rcut / h)) + 1 for h in heights]
    total = 0.0
    for n in itertools.product(*[range(-m, m + 1) for m in nrep]):
        shift = np.array(n, dtype=float) @ cell
        for i in range(len(q)):
            for j in range(len(q)):
                r = np.linalg.norm(pos[i] - pos[j] - shift)
                if r == 0.0:
                    total += q[i] ** 2 * 2.0 / math.sqrt(math.pi) * (beta1 - beta2)
                elif r < rcut:
                    total += q[i] * q[j] * (erf(beta1 * r) - erf(beta2 * r)) / r
    return 0.5 * COULOMB * total


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("cell", [TRICLINIC, LEFT_HANDED], ids=["triclinic", "left_handed"])
def test_matches_brute_force_kspace(cell):
    assert np.linalg.det(cell) * (1 if cell is TRICLINIC else -1) > 0
    beta = 0.55
    pos, cell_t, q, mu, theta = _system(cell, 4, seed=1)
    (phi, field, grad), energy = _single(pos, cell_t, q, mu, theta, beta, accuracy=1e-15)
    kmax = kmax_for_accuracy(beta, 1e-15)
    nmax = 12
    assert kmax * np.linalg.norm(cell, axis=1).max() / (2 * np.pi) < nmax  # cube holds the sphere
    ref_phi, ref_field, ref_grad, ref_energy = _brute_force_kspace(pos, cell_t, q, mu, theta,
                                                                   beta, nmax)
    np.testing.assert_allclose(phi.numpy(), ref_phi, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(field.numpy(), ref_field, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(energy.item(), ref_energy, rtol=1e-10)


def test_converged_kset_is_the_full_sphere():
    cells = np.stack([TRICLINIC, LEFT_HANDED, np.diag([5.0, 9.0, 13.0])])
    cell = torch.as_tensor(cells, dtype=DTYPE)
    kmax = torch.tensor([2.1, 1.7, 2.5], dtype=DTYPE)
    k, m = converged_kvectors(cell, kmax)
    for b in range(3):
        recip = 2 * np.pi * np.linalg.inv(cell[b].numpy()).T
        nn = np.array(list(itertools.product(range(-15, 16), repeat=3)), dtype=float)
        kk = nn @ recip
        k2 = (kk**2).sum(1)
        inside = (k2 > 0) & (k2 <= kmax[b].item() ** 2)
        # n_a = k·a_a/(2π), so the ±15 cube holds the whole sphere when kmax |a_a| / 2π < 15
        assert kmax[b].item() * np.linalg.norm(cell[b].numpy(), axis=1).max() / (2 * np.pi) < 15
        got = k[b][m[b]].numpy()
        assert 2 * len(got) == inside.sum()
        full = np.concatenate([got, -got])
        # every brute-force vector appears once in {k} ∪ {−k}
        ref = np.round(kk[inside], 8)
        assert set(map(tuple, np.round(full, 8))) == set(map(tuple, ref))
        assert not m[b][m[b].sum():].any()
        assert torch.all(k[b][~m[b]] == 0)


def test_split_independence_against_realspace():
    # E_rec(β1) − E_rec(β2) is a short-ranged real-space sum of [erf(β1 r) − erf(β2 r)]/r:
    # checks the 1/(ε0 V) normalisation, the factor 2 of the half set and the self image.
    pos, cell, q, _, _ = _system(TRICLINIC, 5, seed=3, dipoles=False, quadrupoles=False)
    b1, b2 = 0.9, 0.6
    _, e1 = _single(pos, cell, q, None, None, b1, need_gradient=False)
    _, e2 = _single(pos, cell, q, None, None, b2, need_gradient=False)
    ref = _brute_force_realspace_difference(pos, cell, q, b1, b2, rcut=11.0)
    np.testing.assert_allclose((e1 - e2).item(), ref, rtol=1e-9, atol=1e-10)


def test_energy_equals_half_sum_of_site_fields():
    pos, cell, q, mu, theta = _system(TRICLINIC, 7, seed=2)
    for chunk in (0, 7):
        (phi, field, grad), energy = _single(pos, cell, q, mu, theta, SIGMA_BETA, accuracy=1e-8,
                                             chunk_size=chunk)
        e_fields = _energy_from_fields(q, mu, theta, phi, field, grad)
        np.testing.assert_allclose(energy.item(), e_fields.item(), rtol=1e-12)


def test_fields_are_energy_derivatives():
    pos, cell, q, mu, theta = _system(LEFT_HANDED, 6, seed=4)
    pos, q, mu, theta = (t.clone().requires_grad_(True) for t in (pos, q, mu, theta))
    (phi, field, grad), energy = _single(pos, cell, q, mu, theta, SIGMA_BETA, accuracy=1e-8)
    d_pos, d_q, d_mu, d_theta = torch.autograd.grad(energy.sum(), (pos, q, mu, theta))
    # bilinear energy: φ_i = ∂E/∂q_i, E_i = −∂E/∂μ_i, and ∂E/∂Θ_i = −½ G_i (Θ enters as
    # −½ kᵀΘk with a free 3×3 tensor, so no traceless projection here)
    torch.testing.assert_close(d_q, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_mu, -field, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_theta, -0.5 * grad, rtol=1e-10, atol=1e-12)


def test_field_is_minus_gradient_of_potential():
    # forces on charges and dipoles: −∂E/∂r_i = q_i E_i + G_i μ_i (G symmetric); this checks
    # E = −∇φ and G = ∇E at the sites (the self-image exerts no force).
    pos, cell, q, mu, _ = _system(TRICLINIC, 6, seed=5, quadrupoles=False)
    pos = pos.clone().requires_grad_(True)
    (phi, field, grad), energy = _single(pos, cell, q, mu, None, SIGMA_BETA, accuracy=1e-8)
    forces = -torch.autograd.grad(energy.sum(), pos)[0]
    expected = q[:, None] * field + torch.einsum("nab,nb->na", grad, mu)
    torch.testing.assert_close(forces, expected, rtol=1e-9, atol=1e-11)
    # and the potential of a probe: φ at a point = ∂E/∂q of an added zero charge, its field = −∇φ
    probe = torch.tensor([[1.1, 2.2, 0.7]], dtype=DTYPE, requires_grad=True)
    pos2 = torch.cat([pos.detach(), probe])
    q2 = torch.cat([q, torch.zeros(1, dtype=DTYPE)])
    mu2 = torch.cat([mu, torch.zeros(1, 3, dtype=DTYPE)])
    (phi2, field2, _), _ = _single(pos2, cell, q2, mu2, None, SIGMA_BETA, accuracy=1e-8,
                                   need_gradient=False)
    grad_phi = torch.autograd.grad(phi2[-1], probe)[0]
    torch.testing.assert_close(field2[-1:], -grad_phi, rtol=1e-9, atol=1e-11)


def test_batched_equals_single_and_padding_does_not_leak():
    systems = [
        _system(TRICLINIC, 5, seed=10),
        _system(np.diag([9.0, 8.0, 10.0]), 11, seed=11),
        _system(LEFT_HANDED, 3, seed=12),
    ]
    beta = SIGMA_BETA
    kmax = kmax_for_accuracy(beta, 1e-6)
    pos = torch.cat([s[0] for s in systems])
    cell = torch.stack([s[1] for s in systems])
    q = torch.cat([s[2] for s in systems])
    mu = torch.cat([s[3] for s in systems])
    theta = torch.cat([s[4] for s in systems])
    batch = torch.cat([torch.full((len(s[2]),), b, dtype=torch.long)
                       for b, s in enumerate(systems)])
    for kset in ("converged", "les"):
        k, m = converged_kvectors(cell, kmax) if kset == "converged" else les_kvectors(cell)
        assert (m.sum(1) < m.shape[1]).any()  # there is padding to leak through
        phi, field, grad = reciprocal_site_fields(pos, batch, cell, q, mu, theta, beta, k, m,
                                                  True, 100)
        energy = reciprocal_energy(pos, batch, cell, q, mu, theta, beta, k, m, 100)
        for b, (p, c, qq, mm, tt) in enumerate(systems):
            (phi_s, field_s, grad_s), e_s = _single(p, c, qq, mm, tt, beta, kset=kset,
                                                    accuracy=1e-6)
            sel = batch == b
            torch.testing.assert_close(phi[sel], phi_s, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(field[sel], field_s, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad[sel], grad_s, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(energy[b], e_s[0], rtol=1e-11, atol=1e-12)
    # atoms of different structures interleaved: same per-atom results
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(3))
    phi_p, field_p, grad_p = reciprocal_site_fields(pos[perm], batch[perm], cell, q[perm],
                                                    mu[perm], theta[perm], beta, k, m, True, 0)
    torch.testing.assert_close(phi_p, phi[perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(field_p, field[perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-10, atol=1e-12)


def test_rotation_invariance():
    pos, cell, q, mu, theta = _system(TRICLINIC, 6, seed=6)
    (phi, field, grad), energy = _single(pos, cell, q, mu, theta, SIGMA_BETA, accuracy=1e-6)
    gen = torch.Generator().manual_seed(0)
    rot = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=DTYPE))[0]
    rot = rot * torch.sign(torch.det(rot))  # proper rotation
    (phi_r, field_r, grad_r), energy_r = _single(pos @ rot.T, cell @ rot.T, q, mu @ rot.T,
                                                 rot @ theta @ rot.T, SIGMA_BETA, accuracy=1e-6)
    torch.testing.assert_close(energy_r, energy, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(phi_r, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(field_r, field @ rot.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_r, rot @ grad @ rot.T, rtol=1e-10, atol=1e-12)


def test_lattice_reduction_invariance():
    pos, cell, q, mu, theta = _system(TRICLINIC, 6, seed=7)
    sheared = cell.clone()
    sheared[1] = cell[1] + cell[0]
    sheared[2] = cell[2] - 2.0 * cell[1] + cell[0]
    assert abs(torch.det(sheared) - torch.det(cell)) < 1e-9
    (phi, field, _), energy = _single(pos, cell, q, mu, theta, SIGMA_BETA, accuracy=1e-6)
    (phi_s, field_s, _), energy_s = _single(pos, sheared, q, mu, theta, SIGMA_BETA, accuracy=1e-6)
    torch.testing.assert_close(energy_s, energy, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(phi_s, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(field_s, field, rtol=1e-10, atol=1e-12)


def test_les_kset_cubic_by_hand():
    cell = torch.eye(3, dtype=DTYPE).unsqueeze(0) * 10.0  # L = 10 Å, dl = 2 → m = 5, |k| ≤ π/Å
    k, m = les_kvectors(cell, dl=2.0)
    ref = [n for n in itertools.product(range(-5, 6), repeat=3)
           if 0 < n[0] ** 2 + n[1] ** 2 + n[2] ** 2 <= 25]
    assert len(ref) == 514  # lattice points of the radius-5 ball, origin excluded
    assert int(m.sum()) == 257 == k.shape[1]
    n_got = np.round(k[0].numpy() * 10.0 / (2 * np.pi)).astype(int)
    got = set(map(tuple, n_got)) | set(map(tuple, -n_got))
    assert got == set(ref)
    # skewed cell: the set by its definition (brute force) equals the |k| ≤ 2π/dl sphere, since
    # |n_a| ≤ |k||a_a|/(2π) ≤ |a_a|/dl: the box bound never cuts into that sphere
    skew = torch.tensor([[9.0, 0.0, 0.0], [6.5, 3.1, 0.0], [0.0, 0.0, 1.5]], dtype=DTYPE)
    k2, m2 = les_kvectors(skew.unsqueeze(0), dl=2.0)
    recip = 2 * np.pi * np.linalg.inv(skew.numpy()).T
    bounds = [max(1, int(np.linalg.norm(a) // 2.0)) for a in skew.numpy()]
    assert bounds[2] == 1
    ref2 = [np.array(n) @ recip for n in itertools.product(*[range(-b, b + 1) for b in bounds])
            if 0 < np.sum((np.array(n) @ recip) ** 2) <= np.pi ** 2]
    got2 = k2[0][m2[0]].numpy()
    assert 2 * len(got2) == len(ref2)
    got2_full = np.round(np.concatenate([got2, -got2]), 8)
    assert set(map(tuple, got2_full)) == set(map(tuple, np.round(ref2, 8)))
    k2c, m2c = converged_kvectors(skew.unsqueeze(0), math.pi)
    torch.testing.assert_close(k2c, k2)
    # the truncated set is not the converged one at σ = 1
    kc, mc = converged_kvectors(cell, kmax_for_accuracy(SIGMA_BETA, 1e-6))
    assert int(mc.sum()) > 4 * 257


def _strain_scan(kset, accuracy, npoints=41, span=0.04):
    pos, cell, q, _, _ = _system(np.eye(3) * 8.6, 64, seed=8, dipoles=False, quadrupoles=False)
    frac = pos @ torch.linalg.inv(cell)
    q = q * 0.6
    energies = []
    for eps in torch.linspace(-span / 2, span / 2, npoints, dtype=DTYPE):
        c = cell * (1.0 + eps)
        _, e = _single(frac @ c, c, q, None, None, SIGMA_BETA, kset=kset, accuracy=accuracy,
                       need_gradient=False)
        energies.append(e[0])
    return torch.stack(energies)


def test_les_energy_jumps_under_strain_converged_does_not():
    e_les = _strain_scan("les", 0.0)
    e_conv6 = _strain_scan("converged", 1e-6)
    e_conv8 = _strain_scan("converged", 1e-8)
    d2_les = torch.diff(e_les, n=2).abs().max()
    d2_conv = torch.diff(e_conv6, n=2).abs().max()
    # a smooth E(ε) has |Δ²E| ≈ |E''| h² (h = 1e-3 here: a few 1e-5 eV for this system); the
    # truncated set adds jumps of order 1e-2 eV
    assert d2_les > 1e-3
    assert d2_les > 100 * d2_conv
    # the non-smooth part, seen by the 4th difference (smooth part ≈ E'''' h⁴ ≈ 0): k-shells
    # entering the sphere at kmax carry the relative weight `accuracy`
    assert torch.diff(e_conv6, n=4).abs().max() < 1e-4
    assert torch.diff(e_conv8, n=4).abs().max() < 1e-6
    assert torch.diff(e_les, n=4).abs().max() > 1e-3


def test_double_backward():
    pos, cell, q, mu, theta = _system(TRICLINIC, 5, seed=9)
    pos = pos.clone().requires_grad_(True)
    q = q.clone().requires_grad_(True)
    v = torch.randn(pos.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)

    def forces_dot_v(charges, create_graph):
        _, e = _single(pos, cell, charges, mu, theta, SIGMA_BETA, accuracy=1e-8,
                       need_gradient=False)
        f = -torch.autograd.grad(e.sum(), pos, create_graph=create_graph)[0]
        return (f * v).sum()

    g = torch.autograd.grad(forces_dot_v(q, True), q)[0]
    assert torch.isfinite(g).all()
    h = 1e-5
    dq = torch.zeros_like(q)
    dq[2] = h
    fd = (forces_dot_v(q.detach() + dq, False) - forces_dot_v(q.detach() - dq, False)) / (2 * h)
    np.testing.assert_allclose(g[2].item(), fd.item(), rtol=1e-7, atol=1e-9)


def test_stress_strain_derivative():
    pos, cell, q, mu, theta = _system(TRICLINIC, 6, seed=13)
    strain_dir = torch.tensor([[1.0, 0.3, 0.0], [0.3, -0.5, 0.2], [0.0, 0.2, 0.7]], dtype=DTYPE)

    def energy(eps):
        deform = torch.eye(3, dtype=DTYPE) + eps * strain_dir
        # dipoles and quadrupoles are kept fixed: only positions and cell are strained
        _, e = _single(pos @ deform, cell @ deform, q, mu, theta, SIGMA_BETA, accuracy=1e-8,
                       need_gradient=False)
        return e[0]

    eps = torch.zeros((), dtype=DTYPE, requires_grad=True)
    d_auto = torch.autograd.grad(energy(eps), eps)[0]
    h = 1e-6
    d_fd = (energy(torch.tensor(h, dtype=DTYPE)) - energy(torch.tensor(-h, dtype=DTYPE))) / (2 * h)
    np.testing.assert_allclose(d_auto.item(), d_fd.item(), rtol=1e-7, atol=1e-8)


def test_torchscript_and_float32():
    scripted = {f.__name__: torch.jit.script(f) for f in
                (converged_kvectors, les_kvectors, reciprocal_site_fields, reciprocal_energy)}
    pos, cell, q, mu, theta = _system(TRICLINIC, 5, seed=14)
    batch = torch.zeros(5, dtype=torch.long)
    kmax = kmax_for_accuracy(SIGMA_BETA, 1e-6)
    k, m = converged_kvectors(cell[None], kmax)
    k_s, m_s = scripted["converged_kvectors"](cell[None], kmax)
    torch.testing.assert_close(k_s, k)
    assert torch.equal(m_s, m)
    k_t, _ = scripted["converged_kvectors"](cell[None], torch.tensor([kmax], dtype=DTYPE))
    torch.testing.assert_close(k_t, k)
    k_l, m_l = les_kvectors(cell[None])
    torch.testing.assert_close(scripted["les_kvectors"](cell[None], 2.0)[0], k_l)
    ref = reciprocal_site_fields(pos, batch, cell[None], q, mu, theta, SIGMA_BETA, k, m, True, 0)
    out = scripted["reciprocal_site_fields"](pos, batch, cell[None], q, mu, theta, SIGMA_BETA, k, m,
                                             True, 0)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    e = reciprocal_energy(pos, batch, cell[None], q, mu, theta, SIGMA_BETA, k, m)
    torch.testing.assert_close(
        scripted["reciprocal_energy"](pos, batch, cell[None], q, mu, theta, SIGMA_BETA, k, m, 0), e)
    # float32 in, float32 out, same numbers to single precision; same k-set
    f = torch.float32
    k32, m32 = converged_kvectors(cell[None].to(f), kmax)
    assert k32.dtype == f and torch.equal(m32, m)
    out32 = reciprocal_site_fields(pos.to(f), batch, cell[None].to(f), q.to(f), mu.to(f),
                                   theta.to(f), SIGMA_BETA, k32, m32, True, 0)
    for a, b in zip(out32, ref):
        assert a.dtype == f
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    # no multipoles beyond charges, no k-vectors
    phi, field, grad = reciprocal_site_fields(pos, batch, cell[None], q, None, None, SIGMA_BETA,
                                              k[:, :0], m[:, :0], False, 0)
    assert grad is None and torch.all(phi == 0) and torch.all(field == 0)

"""Tests of the MACE trunk (polarmace.nn): symmetry, the reduced symmetric basis, exactness of the
hand-written contractions against e3nn / brute force, TorchScript, locality, smooth cutoff.

All in float64 with small irreps (8x0e+8x1o) unless stated.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from e3nn import o3

from polarmace.nn.embedding import ElementMapping
from polarmace.nn.interaction import FirstInteraction, Interaction, _PathMessage, _path_message_plain, tp_paths
from polarmace.nn.product import SymmetricBasis, SymmetricContraction, natural_irreps
from polarmace.nn.radial import PolynomialCutoff, RadialEmbedding
from polarmace.nn.readouts import EquivariantReadout
from polarmace.nn.trunk import MACETrunk
from reference_impls import full_coupling_basis, reference_contraction, scatter_sum, symmetric_tensor

DT = torch.float64
R_MAX = 3.0


def _structure(n=10, seed=0, box=4.0, elements=(1, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    pos = []
    while len(pos) < n:
        p = torch.rand(3, generator=g, dtype=DT) * box
        if all(float((p - q).norm()) > 0.9 for q in pos):
            pos.append(p)
    pos = torch.stack(pos)
    z = torch.tensor([elements[i % len(elements)] for i in range(n)])
    return z, pos


def _edges(pos, r_max=R_MAX):
    n = pos.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    d = (pos[i] - pos[j]).norm(dim=-1)
    mask = (i != j) & (d < r_max)
    ei = torch.stack([i[mask], j[mask]])
    return ei, pos[ei[1]] - pos[ei[0]]


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    t = MACETrunk([1, 6, 8], r_max=R_MAX, hidden_irreps="8x0e+8x1o", max_ell=3, correlation=3,
                  num_interactions=2, radial_mlp=[16, 16], avg_num_neighbors=4.0, edge_chunk=4).to(DT)
    return t


@pytest.fixture(scope="module")
def trunk_full():
    """Last layer keeps all hidden irreps (equivariant features in every layer)."""
    torch.manual_seed(1)
    return MACETrunk([1, 6, 8], r_max=R_MAX, hidden_irreps="8x0e+8x1o", max_ell=2, correlation=3,
                     num_interactions=2, radial_mlp=[16], avg_num_neighbors=4.0, edge_chunk=3,
                     last_layer_scalars_only=False).to(DT)


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / (b.abs().max() + 1e-300))


def _wigner(irreps, rot):
    """D(rot) in float64 (e3nn builds the generators in the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.Irreps(irreps).D_from_matrix(rot)
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# symmetry of the trunk
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["trunk", "trunk_full"])
@pytest.mark.parametrize("improper", [False, True])
def test_rotation_reflection_equivariance(request, which, improper):
    model = request.getfixturevalue(which)
    z, pos = _structure(12, seed=3)
    ei, vec = _edges(pos)
    feats, energy = model(z, ei, vec)
    rot = o3.rand_matrix(dtype=DT)
    if improper:
        rot = -rot
    feats_r, energy_r = model(z, ei, vec @ rot.T)
    assert _rel(energy_r, energy) < 1e-10
    d = _wigner(model.node_features_irreps, rot)
    assert _rel(feats_r, feats @ d.T) < 1e-10
    # the features do carry vectors (the test is not vacuous)
    assert feats.abs().max() > 1e-3 and energy.abs().max() > 1e-6


def test_permutation_and_translation_invariance(trunk):
    z, pos = _structure(11, seed=5)
    ei, vec = _edges(pos)
    feats, energy = trunk(z, ei, vec)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(2))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(z))
    pos_p = pos[perm] + torch.tensor([1.3, -7.0, 2.5], dtype=DT)
    ei_p, vec_p = _edges(pos_p)
    feats_p, energy_p = trunk(z[perm], ei_p, vec_p)
    assert _rel(energy_p, energy[perm]) < 1e-10
    assert _rel(feats_p, feats[perm]) < 1e-10
    # edge order and chunk size do not matter either
    order = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(3))
    k0 = trunk.edge_chunk
    try:
        trunk.edge_chunk = 7
        feats_o, energy_o = trunk(z, ei[:, order], vec[order])
    finally:
        trunk.edge_chunk = k0
    assert _rel(energy_o, energy) < 1e-12
    assert _rel(feats_o, feats) < 1e-12


def test_forces_finite_difference_and_double_backward(trunk):
    z, pos = _structure(8, seed=7)
    pos = pos.clone().requires_grad_(True)
    ei, _ = _edges(pos.detach())

    def energy(p):
        return trunk(z, ei, p[ei[1]] - p[ei[0]])[1].sum()

    e = energy(pos)
    (grad,) = torch.autograd.grad(e, pos, create_graph=True)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2), (5, 1)]:
        dp = torch.zeros_like(pos)
        dp[atom, axis] = h
        fd = (energy(pos.detach() + dp) - energy(pos.detach() - dp)) / (2 * h)
        assert abs(float(fd) - float(grad[atom, axis])) < 1e-7 * max(1.0, abs(float(fd)))
    # force loss backpropagates to the parameters (second derivatives exist)
    loss = (grad ** 2).sum()
    params = [p for p in trunk.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_locality(trunk):
    # a chain along x with spacing 0.8 r_max: atom k is 2.4 k Å from atom 0
    n = 7
    pos = torch.zeros(n, 3, dtype=DT)
    pos[:, 0] = torch.arange(n, dtype=DT) * 0.8 * R_MAX
    pos[:, 1] = 0.1 * torch.sin(torch.arange(n, dtype=DT))
    z = torch.tensor([8, 1, 6, 1, 8, 6, 1])
    ei, vec = _edges(pos)
    feats, energy = trunk(z, ei, vec)
    far = 4  # 9.6 Å > num_interactions * r_max = 6 Å
    moved = pos.clone()
    moved[far] += torch.tensor([0.3, 0.2, -0.4], dtype=DT)
    ei2, vec2 = _edges(moved)
    feats2, energy2 = trunk(z, ei2, vec2)
    assert float((energy2[0] - energy[0]).abs()) == 0.0
    assert float((feats2[0] - feats[0]).abs().max()) == 0.0
    assert float((energy2[far] - energy[far]).abs()) > 0.0
    # control: a second neighbour (4.8 Å, within 2 r_max) does influence atom 0
    near = moved.clone()
    near[2] += torch.tensor([0.1, 0.3, 0.0], dtype=DT)
    ei3, vec3 = _edges(near)
    assert float((trunk(z, ei3, vec3)[1][0] - energy2[0]).abs()) > 1e-9


def test_isolated_atoms_and_no_edges(trunk):
    z = torch.tensor([1, 8])
    ei = torch.zeros(2, 0, dtype=torch.long)
    feats, energy = trunk(z, ei, torch.zeros(0, 3, dtype=DT))
    assert feats.shape == (2, trunk.node_features_irreps.dim)
    assert torch.isfinite(energy).all()


def test_unknown_element_raises(trunk):
    z, pos = _structure(4, seed=1)
    z[2] = 26
    ei, vec = _edges(pos)
    with pytest.raises(ValueError, match="Fe"):
        trunk(z, ei, vec)
    with pytest.raises(ValueError, match="Fe"):
        ElementMapping([1, 8])(torch.tensor([1, 26]))


def test_float32(trunk):
    z, pos = _structure(9, seed=4)
    ei, vec = _edges(pos)
    t32 = MACETrunk([1, 6, 8], r_max=R_MAX, hidden_irreps="8x0e+8x1o", max_ell=3, radial_mlp=[16, 16],
                    avg_num_neighbors=4.0, edge_chunk=4)
    t32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in trunk.state_dict().items()})
    f32, e32 = t32(z, ei, vec.float())
    f64, e64 = trunk(z, ei, vec)
    assert f32.dtype == torch.float32 and e32.dtype == torch.float32
    assert _rel(e32.double(), e64) < 1e-4
    assert _rel(f32.double(), f64) < 1e-4


def test_torchscript_matches_eager(trunk):
    z, pos = _structure(10, seed=6)
    ei, vec = _edges(pos)
    scripted = torch.jit.script(trunk)
    f1, e1 = trunk(z, ei, vec)
    f2, e2 = scripted(z, ei, vec)
    assert float((f1 - f2).abs().max()) < 1e-6 and float((e1 - e2).abs().max()) < 1e-6
    with pytest.raises(Exception, match="Fe"):
        scripted(torch.tensor([1, 26]), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=DT))
    # forces: eager (recomputing autograd function) and scripted (plain ops) agree
    v1 = vec.clone().requires_grad_(True)
    v2 = vec.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(trunk(z, ei, v1)[1].sum(), v1)
    (g2,) = torch.autograd.grad(scripted(z, ei, v2)[1].sum(), v2)
    assert float((g1 - g2).abs().max()) < 1e-10


# ------------------------------------------------------------------------------------------------
# radial part
# ------------------------------------------------------------------------------------------------

def test_envelope_and_radial_vanish_smoothly_at_rmax():
    r_max = 5.0
    cut = PolynomialCutoff(r_max, 5)
    r = torch.tensor([r_max - 1e-3, r_max, r_max + 0.5], dtype=DT, requires_grad=True)
    u = cut(r)
    (du,) = torch.autograd.grad(u.sum(), r, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), r)
    # u ~ −35 (1 − r/r_max)³ near r_max (p = 5): value, slope and curvature all vanish
    x = 1e-3 / r_max
    assert abs(float(u[0])) < 40 * x ** 3 and float(u[1]) == 0.0 and float(u[2]) == 0.0
    assert abs(float(du[0])) < 3 * 40 * x ** 2 / r_max and abs(float(d2u[0])) < 6 * 40 * x / r_max ** 2
    assert abs(float(cut(torch.tensor([1e-9], dtype=DT))[0]) - 1.0) < 1e-12
    emb = RadialEmbedding(r_max, 8, 5).to(DT)
    x = torch.linspace(0.5, 6.0, 200, dtype=DT)[:, None]
    feats = emb(x)
    assert (feats[x[:, 0] >= r_max] == 0).all()
    near = emb(torch.tensor([[r_max - 1e-3]], dtype=DT))
    assert float(near.abs().max()) < 1e-8


def test_energy_continuous_when_neighbour_crosses_rmax(trunk):
    z = torch.tensor([8, 1, 1])
    base = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=DT)

    def e_at(d):
        pos = torch.cat([base, torch.tensor([[0.0, 0.0, d]], dtype=DT)])
        ei, vec = _edges(pos)
        return float(trunk(torch.cat([z, torch.tensor([6])]), ei, vec)[1].sum())

    inside, outside = e_at(R_MAX - 1e-4), e_at(R_MAX + 1e-4)
    assert abs(inside - outside) < 1e-10


# ------------------------------------------------------------------------------------------------
# reduced symmetric basis
# ------------------------------------------------------------------------------------------------

def _character_multiplicity(max_ell, nu, L, p):
    """Multiplicity of (L, p) in Sym^ν(0e+1o+…+max_ell) from characters (Weyl integration on O(3))."""
    x, w = np.polynomial.legendre.leggauss(400)
    theta = (x + 1.0) * math.pi / 2.0
    w = w * math.pi / 2.0
    measure = (1.0 - np.cos(theta)) / math.pi

    def chi_l(l, t):
        return np.sin((l + 0.5) * t) / np.sin(t / 2.0)

    def chi_v(t, improper, k):
        # character of g^k, g = R(t) (proper) or -R(t) (improper)
        return sum((((-1) ** l) ** k if improper else 1.0) * chi_l(l, k * t) for l in range(max_ell + 1))

    total = 0.0
    for improper in (False, True):
        h = [np.ones_like(theta)]
        for n in range(1, nu + 1):
            h.append(sum(chi_v(theta, improper, k) * h[n - k] for k in range(1, n + 1)) / n)
        sign = p if improper else 1.0
        total += 0.5 * float((w * measure * h[nu] * sign * chi_l(L, theta)).sum())
    return total


@pytest.mark.parametrize("max_ell,correlation,irreps", [(3, 3, "0e+1o+1e+2e"), (1, 4, "0e+1o+2o+3e")])
def test_symmetric_basis_dimension_and_equivariance(max_ell, correlation, irreps):
    irreps = o3.Irreps(irreps)
    basis = SymmetricBasis(max_ell, correlation, irreps)
    v = natural_irreps(max_ell)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, v.dim, generator=g, dtype=DT)
    rot = -o3.rand_matrix(dtype=DT)
    for mi in irreps:
        l, p = mi.ir.l, mi.ir.p
        for nu in range(1, correlation + 1):
            k = basis.num_paths(nu, l, p)
            expected = _character_multiplicity(max_ell, nu, l, p)
            assert abs(expected - round(expected)) < 1e-8
            assert k == round(expected), (nu, l, p)
            if k == 0:
                continue
            t = symmetric_tensor(basis, nu, l, p)  # [K, d.., M]
            # symmetric, orthonormal
            flat = t.reshape(k, -1)  # orthonormal in the component normalisation Σ T T' / (2L+1)
            assert torch.allclose(flat @ flat.T / (2 * l + 1), torch.eye(k, dtype=DT), atol=1e-10)
            if nu >= 2:
                assert torch.allclose(t, t.transpose(1, 2), atol=1e-12)
            # equivariant: P(D a) = D_L P(a)
            coeff = basis.get(nu, l, p)
            idx = torch.tensor(basis.monos[nu])  # [S, ν]

            def poly(x):
                return torch.einsum("ns,ksm->nkm", x[:, idx].prod(dim=-1), coeff)

            d_in = _wigner(v, rot)
            d_out = _wigner(o3.Irreps([(1, (l, p))]), rot)
            assert _rel(poly(a @ d_in.T), poly(a) @ d_out.T) < 1e-10


def test_reduced_contraction_equals_full_unreduced_contraction():
    """Random weights on the full (unreduced) generalized CG basis, projected on the symmetric
    subspace, give the same map as the brute-force full contraction; the reduced basis spans the
    symmetrised full basis and is strictly smaller."""
    max_ell, correlation = 2, 3
    irreps = o3.Irreps("0e+1o+2e")
    sc = SymmetricContraction(max_ell, correlation, irreps, num_elements=1, num_channels=1).to(DT)
    basis = SymmetricBasis(max_ell, correlation, irreps)
    d = natural_irreps(max_ell).dim
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 6, d, generator=g, dtype=DT)  # [C, N, d]
    weight = torch.zeros_like(sc.weight)
    expected = []
    kstart = 0
    for mi in irreps:
        l, p = mi.ir.l, mi.ir.p
        out = torch.zeros(6, 2 * l + 1, dtype=DT)
        for nu in range(1, correlation + 1):
            full = full_coupling_basis(max_ell, nu, l, p)  # [Kf, d.., M]
            red = symmetric_tensor(basis, nu, l, p)  # [K, d.., M]
            kf, k = full.shape[0], red.shape[0]
            assert k <= kf
            if nu == 3:
                assert 2 * k < kf  # the unreduced basis is at least twice as large
            wf = torch.randn(kf, generator=g, dtype=DT)
            tw = torch.einsum("k,k...->...", wf, full)
            # brute force: contract all ν copies of a with the unsymmetrised tensor
            x = torch.einsum("ni,i...->n...", a[0], tw)
            for _ in range(nu - 1):
                x = torch.einsum("ni,ni...->n...", a[0], x)
            out = out + x
            # projection on the reduced basis; it reproduces the symmetrised tensor exactly
            wr = torch.einsum("k...,...->k", red, tw) / (2 * l + 1)
            perms = list(itertools.permutations(range(nu)))
            sym = sum(tw.permute(*(list(perm) + [nu])) for perm in perms) / len(perms)
            assert _rel(torch.einsum("k,k...->...", wr, red), sym) < 1e-10
            weight[0, kstart:kstart + k, 0] = wr
            kstart += k
        expected.append(out)
    with torch.no_grad():
        sc.weight.copy_(weight)
    got = sc(a, [6])[0]
    assert _rel(got, torch.cat(expected, dim=1)) < 1e-10


def test_contraction_module_matches_reference_with_elements():
    sc = SymmetricContraction(3, 3, o3.Irreps("0e+1o"), num_elements=3, num_channels=4).to(DT)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 9, 16, generator=g, dtype=DT)
    element = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert _rel(sc(a, [2, 4, 3]), reference_contraction(a, element, sc)) < 1e-12
    # MACE defaults: 29 reduced weights per element and channel for 0e+1o at ν ≤ 3, l ≤ 3
    assert sc.num_weights == 29


@pytest.mark.parametrize("correlation", [1, 2, 4])
def test_contraction_other_correlations(correlation):
    sc = SymmetricContraction(2, correlation, o3.Irreps("0e+1o+2e"), num_elements=2, num_channels=3).to(DT)
    g = torch.Generator().manual_seed(correlation)
    a = torch.randn(3, 5, 9, generator=g, dtype=DT)
    element = torch.tensor([0, 0, 1, 1, 1])
    assert _rel(sc(a, [2, 3]), reference_contraction(a, element, sc)) < 1e-12
    rot = -o3.rand_matrix(dtype=DT)
    d_in, d_out = _wigner(natural_irreps(2), rot), _wigner("0e+1o+2e", rot)
    assert _rel(sc(a @ d_in.T, [2, 3]), sc(a, [2, 3]) @ d_out.T) < 1e-10


# ------------------------------------------------------------------------------------------------
# hand-written tensor products against e3nn
# ------------------------------------------------------------------------------------------------

def _e3nn_tp(irreps_in, max_ell, c):
    sh_irreps = o3.Irreps.spherical_harmonics(max_ell)
    paths = tp_paths(irreps_in, max_ell)
    in_irreps = o3.Irreps([(c, (l, p)) for l, p in irreps_in])
    mid = o3.Irreps([(c, (l3, p3)) for (_, _, l3, p3) in paths])
    ins = [(i, l2, k, "uvu", True) for k, (i, l2, _, _) in enumerate(paths)]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its constants in the default dtype
    try:
        tp = o3.TensorProduct(in_irreps, sh_irreps, mid, ins, shared_weights=False, internal_weights=False)
    finally:
        torch.set_default_dtype(old)
    return tp, in_irreps, mid, paths


def _to_flat(xs):
    return torch.cat([x.transpose(1, 2).reshape(x.shape[0], -1) for x in xs], dim=1)


def _from_flat(x, irreps):
    out = []
    for mi, sl in zip(irreps, irreps.slices()):
        out.append(x[:, sl].reshape(x.shape[0], mi.mul, mi.ir.dim).transpose(1, 2))
    return out


def _layout(trunk, ei, vec, n):
    order, slot, chunk_node, sender_pad = trunk._edge_layout(ei[0], ei[1], n)
    fill = torch.zeros(sender_pad.shape[0], 3, dtype=DT)
    fill[:, 2] = 2 * trunk.r_max
    vpad = fill.index_copy(0, slot, vec[order])
    sh = trunk.spherical_harmonics(vpad)
    radial = trunk.radial_embedding(vpad.norm(dim=1, keepdim=True))
    return sh, radial, sender_pad, chunk_node


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_interaction_matches_e3nn_tensor_product(trunk, chunk):
    torch.manual_seed(3)
    c, max_ell = 4, 3
    irreps_in = [(0, 1), (1, -1), (2, 1)]
    block = Interaction(irreps_in, [(0, 1)], 2, c, max_ell, [8, 16], avg_num_neighbors=3.0).to(DT)
    z, pos = _structure(9, seed=8)
    ei, vec = _edges(pos)
    n = len(z)
    xs = [torch.randn(n, 2 * l + 1, c, dtype=DT) for l, _ in irreps_in]
    k0 = trunk.edge_chunk
    trunk.edge_chunk = chunk
    try:
        sh, radial, sender_pad, chunk_node = _layout(trunk, ei, vec, n)
    finally:
        trunk.edge_chunk = k0
    a, _ = block(xs, sh, radial, sender_pad, chunk_node, chunk, n, [n, 0])
    # reference: e3nn TensorProduct on the plain edge list + scatter-sum
    tp, in_irreps, mid, _ = _e3nn_tp(irreps_in, max_ell, c)
    xu = _to_flat(block.linear_up(xs))
    sh_e = o3.spherical_harmonics(list(range(max_ell + 1)), vec, normalize=True, normalization="component")
    w = block.radial(trunk.radial_embedding(vec.norm(dim=1, keepdim=True)))
    msg = scatter_sum(tp(xu[ei[1]], sh_e, w), ei[0], n) / 3.0
    a_ref = block.linear(_from_flat(msg, mid))
    for x, y in zip(a, a_ref):
        assert _rel(x, y) < 1e-12


@pytest.mark.parametrize("d1,d3", [(1, 5), (3, 7)])
def test_path_message_recompute_gradients(d1, d3):
    g = torch.Generator().manual_seed(d1)
    nch, chunk, nh, c = 3, 2, 4, 5
    s = nch * chunk
    h = torch.randn(s, nh, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(nh, c, generator=g, dtype=DT, requires_grad=True)
    xj = torch.randn(s, d1, c, generator=g, dtype=DT, requires_grad=True)
    m = torch.randn(s, d1 * d3, generator=g, dtype=DT, requires_grad=True)
    inputs = (h, w, xj, m)
    assert torch.allclose(_PathMessage.apply(h, w, xj, m, nch, chunk), _path_message_plain(h, w, xj, m, nch, chunk))
    fn = lambda *t: _PathMessage.apply(*t, nch, chunk)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_first_interaction_matches_e3nn_tensor_product(trunk):
    torch.manual_seed(4)
    c, max_ell, nz = 4, 3, 3
    block = FirstInteraction(nz, c, max_ell, [8, 16], avg_num_neighbors=2.5).to(DT)
    z, pos = _structure(10, seed=9)
    elem = torch.tensor([0, 1, 2] * 4)[:10].sort().values  # nodes sorted by element
    ei, vec = _edges(pos)
    n = len(z)
    table = torch.randn(nz, c, dtype=DT)
    sh, radial, sender_pad, chunk_node = _layout(trunk, ei, vec, n)
    counts = torch.bincount(elem, minlength=nz).tolist()
    a = block(table, sh, radial, elem[sender_pad], chunk_node, trunk.edge_chunk, n, counts)
    tp, in_irreps, mid, _ = _e3nn_tp([(0, 1)], max_ell, c)
    xu = block.linear_up([table[:, None, :]])[0][:, 0, :]
    sh_e = o3.spherical_harmonics(list(range(max_ell + 1)), vec, normalize=True, normalization="component")
    w = block.radial(trunk.radial_embedding(vec.norm(dim=1, keepdim=True)))
    msg = scatter_sum(tp(xu[elem[ei[1]]], sh_e, w), ei[0], n) / 2.5
    a_ref = block.skip(block.linear(_from_flat(msg, mid)), counts)
    for x, y in zip(a, a_ref):
        assert _rel(x, y) < 1e-12


# ------------------------------------------------------------------------------------------------
# readouts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("irreps_out", ["1x0e", "1x1o", "1x2e", "1x0e+1x2e", "2x0e+1x1o+1x2e"])
def test_equivariant_readout(trunk, irreps_out):
    torch.manual_seed(5)
    ro = EquivariantReadout(trunk.node_features_irreps, irreps_out, scale=0.1).to(DT)
    z, pos = _structure(8, seed=10)
    ei, vec = _edges(pos)
    rot = -o3.rand_matrix(dtype=DT)
    y = ro(trunk(z, ei, vec)[0])
    y_r = ro(trunk(z, ei, vec @ rot.T)[0])
    d = _wigner(irreps_out, rot)
    assert y.shape == (8, o3.Irreps(irreps_out).dim)
    assert _rel(y_r, y @ d.T) < 1e-10
    assert float(y.abs().max()) > 0
    scripted = torch.jit.script(ro)
    assert float((scripted(trunk(z, ei, vec)[0]) - y).abs().max()) < 1e-12


def test_readout_scale_small_at_init(trunk):
    torch.manual_seed(6)
    z, pos = _structure(8, seed=11)
    ei, vec = _edges(pos)
    feats = trunk(z, ei, vec)[0]
    big = EquivariantReadout(trunk.node_features_irreps, "1x1o", scale=1.0).to(DT)
    small = EquivariantReadout(trunk.node_features_irreps, "1x1o", scale=0.01).to(DT)
    small.load_state_dict(big.state_dict())
    assert torch.allclose(small(feats), 0.01 * big(feats))

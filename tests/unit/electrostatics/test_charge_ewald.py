"""The training fast paths of the periodic electrostatics: the energy-only route of the engine
(compute_fields=False) and the hand-written second derivatives of the charge k-sum, each
against the autograd path through the site fields, which the rest of the suite checks
against Madelung constants, OpenMM and finite differences."""

import pytest
import torch

from polarmace.electrostatics import Electrostatics, ewald
from polarmace.electrostatics.charge_ewald import charge_reciprocal_energy

# float64 per test (conftest's fixture restores the default): a module-level
# set_default_dtype leaks into every module collected after this one (test_nn's float32 test).
pytestmark = pytest.mark.usefixtures("float64_default")

BETA = 0.7


def _system(seed=0, counts=(12, 9, 12)):
    g = torch.Generator().manual_seed(seed)
    cell = torch.stack([torch.eye(3) * 6.0,
                        torch.tensor([[6.0, 0.0, 0.0], [1.0, 6.5, 0.0], [0.5, 0.3, 7.0]]),
                        torch.tensor([[5.5, 0.0, 0.0], [0.0, 0.0, 5.8], [0.0, 6.1, 0.0]])])  # left-handed
    batch = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    pos = torch.rand(len(batch), 3, generator=g) * 6.0
    q = torch.randn(len(batch), generator=g)
    kv, km = ewald.converged_kvectors(cell, 4.0)
    return pos, q, batch, cell, kv, km


def _autograd(pos, q, batch, cell, kv, km):
    return ewald.reciprocal_energy(pos, batch, cell, q, None, None, BETA, kv, km, 0, 3.5, 4.0)


def _hand(pos, q, batch, cell, kv, km):
    return charge_reciprocal_energy(pos, batch, cell, q, BETA, kv, km, 3.5, 4.0)


def _force_loss(energy_fn, pos, q, batch, cell, kv, km):
    """A training-like loss: charges that depend on the positions (like latent charges), the
    energies and the forces −dE/dr (graph kept), both weighted, as in a force-trained step."""
    q_of_r = q * (1.0 + 0.1 * torch.tanh(pos.sum(1)))
    e = energy_fn(pos, q_of_r, batch, cell, kv, km)
    forces = -torch.autograd.grad(e.sum(), pos, create_graph=True)[0]
    weights = torch.linspace(0.5, 2.0, forces.numel()).view_as(forces)
    return (e * torch.tensor([1.0, 2.0, 3.0])).sum() + (weights * forces ** 2).sum()


def test_hand_written_energy_and_derivatives_equal_autograd():
    pos, q, batch, cell, kv, km = _system()
    grads = []
    for fn in (_autograd, _hand):
        p = pos.clone().requires_grad_(True)
        c = q.clone().requires_grad_(True)
        loss = _force_loss(fn, p, c, batch, cell, kv, km)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, [p, c])))
    scale = [float(x.abs().max()) for x in grads[0]]
    for a, b, s in zip(grads[0], grads[1], scale):
        assert torch.allclose(a, b, rtol=0.0, atol=1e-12 * s)


def test_hand_written_gradcheck_and_gradgradcheck():
    pos, q, batch, cell, kv, km = _system(seed=1, counts=(5, 3, 4))

    def fn(p, c):
        return _hand(p, c, batch, cell, kv, km)

    inputs = (pos.clone().requires_grad_(True), q.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_hand_written_refuses_a_cell_under_autograd():
    pos, q, batch, cell, kv, km = _system()
    cell = cell.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="cell must not require grad"):
        _hand(pos, q, batch, cell, kv, km)


def _random_multipoles(atoms, moments, seed):
    g = torch.Generator().manual_seed(seed)
    cell = torch.stack([torch.eye(3) * 8.0, torch.tensor([[8.0, 0, 0], [1.0, 8.5, 0], [0.5, 0.3, 9.0]])])
    batch = torch.repeat_interleave(torch.arange(2), atoms)
    pos = torch.rand(2 * atoms, 3, generator=g) * 8.0
    q = torch.randn(2 * atoms, generator=g)
    kw = {}
    if "mu" in moments:
        kw["dipoles"] = 0.2 * torch.randn(2 * atoms, 3, generator=g)
    if "theta" in moments:
        t = 0.1 * torch.randn(2 * atoms, 3, 3, generator=g)
        t = t + t.transpose(1, 2)
        kw["quadrupoles"] = t - t.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] * torch.eye(3) / 3
    return pos, cell, batch, q, kw


def _energy_and_forces(engine, pos, cell, batch, q, kw, fields, total=None):
    p = pos.clone().requires_grad_(True)
    pbc = torch.ones(cell.shape[0], 3, dtype=torch.bool)
    out = engine(p, cell, pbc, q, batch=batch, total_charge=total, compute_fields=fields, **kw)
    return out.energy.detach(), -torch.autograd.grad(out.energy.sum(), p)[0], out


@pytest.mark.parametrize("moments", ["q", "q+mu", "q+mu+theta"])
def test_auto_energy_route_meets_the_accuracy(moments):
    """`auto` may pick PME for the energy alone (cheaper in training); its energy and forces
    stay within the requested accuracy of a converged (1e-10) Ewald sum."""
    pos, cell, batch, q, kw = _random_multipoles(40, moments, seed=5)
    exact = Electrostatics(sigma=1.0, method="ewald", accuracy=1e-10)
    e0, f0, _ = _energy_and_forces(exact, pos, cell, batch, q, kw, True)
    e1, f1, _ = _energy_and_forces(Electrostatics(sigma=1.0, accuracy=1e-6), pos, cell, batch, q, kw, False)
    assert float((e1 - e0).abs().max() / e0.abs().max()) < 1e-6
    assert float((f1 - f0).norm() / f0.norm()) < 1e-5   # field-type errors are ~10x the energy's


@pytest.mark.parametrize("atoms,method,kspace", [(30, "ewald", "converged"), (130, "pme", "converged"),
                                                 (30, "auto", "les")])
@pytest.mark.parametrize("moments", ["q", "q+mu", "q+mu+theta"])
@pytest.mark.parametrize("charged", [False, True])
def test_energy_route_equals_site_field_route(atoms, method, kspace, moments, charged):
    """Same method, two routes: Ewald, PME and the `les` k-set give the same energy and forces
    from the energy-only route as from the site fields."""
    pos, cell, batch, q, kw = _random_multipoles(atoms, moments, seed=atoms)
    total = torch.tensor([1.0, -0.5]) if charged else None
    engine = Electrostatics(sigma=1.0, method=method, kspace=kspace)
    e1, f1, o1 = _energy_and_forces(engine, pos, cell, batch, q, kw, True, total)
    e2, f2, o2 = _energy_and_forces(engine, pos, cell, batch, q, kw, False, total)
    assert torch.allclose(e1, e2, rtol=1e-12, atol=1e-12 * float(e1.abs().max()))
    assert torch.allclose(f1, f2, rtol=0.0, atol=1e-10 * float(f1.abs().max()))
    assert o1.potential.shape == (2 * atoms,) and o2.potential.shape == (0,)
    assert o2.field.shape == (0, 3)


def test_energy_route_is_not_taken_with_a_response_or_open_structures():
    """The site fields are needed for κ/α and open structures use the direct sum: the
    compute_fields=False request must not change their energies."""
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(20, 3, generator=g) * 7.0
    q = torch.randn(20, generator=g)
    cell = torch.eye(3)[None] * 7.0
    engine = Electrostatics(sigma=1.0)
    kappa = torch.full((20,), 0.01)
    for pbc in (torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)):
        a = engine(pos, cell, pbc, q, kappa=kappa)
        b = engine(pos, cell, pbc, q, kappa=kappa, compute_fields=False)
        assert torch.equal(a.energy, b.energy) and b.potential.shape == (20,)
    a = engine(pos, cell, torch.zeros(1, 3, dtype=torch.bool), q)
    b = engine(pos, cell, torch.zeros(1, 3, dtype=torch.bool), q, compute_fields=False)
    assert torch.equal(a.energy, b.energy)


def test_model_stress_takes_the_autograd_path_and_matches_the_strain_derivative():
    """With stress the cell is under autograd, so the charge fast path must step aside; the
    les model's virial equals a central difference of its energy under strain."""
    from polarmace.data.atoms import Configuration
    from polarmace.data.graph import collate
    from polarmace.model import build_model
    import numpy as np

    rng = np.random.default_rng(0)
    cell = np.diag([6.0, 6.3, 5.9])
    conf = Configuration(atomic_numbers=np.array([11, 17] * 6), positions=rng.random((12, 3)) * 5.9,
                         cell=cell, pbc=np.array([True] * 3))
    cfg = {"model": {"elements": ["Na", "Cl"], "e0s": {"Na": 0.0, "Cl": 0.0}, "avg_num_neighbors": 10.0,
                     "hidden_irreps": "8x0e+8x1o", "max_ell": 1, "correlation": 2,
                     "num_interactions": 1, "r_max": 4.0},
           "long_range": {"variant": "les", "readout_scales": {"charges": 1.0}}}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = model(collate([conf], 4.0), compute_stress=True)
    h = 1e-5
    for a, b in [(0, 0), (1, 2)]:
        e = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = sign * h / (2.0 if a != b else 1.0)
            strained = Configuration(atomic_numbers=conf.atomic_numbers,
                                     positions=conf.positions @ (np.eye(3) + eps),
                                     cell=cell @ (np.eye(3) + eps), pbc=conf.pbc)
            e.append(float(model(collate([strained], 4.0), compute_forces=False)["energy"]))
        fd = -(e[0] - e[1]) / (2 * h)          # virial = −dE/dε for this symmetric strain
        assert abs(float(out["virials"][0, a, b]) - fd) < 1e-6 * max(1.0, abs(fd))

"""Training pieces on their own: the weighted loss (global BEC sign, masks, missing labels), the
metrics, the EMA through a checkpoint round trip (keep N, atomic writes) and the epoch order."""

from __future__ import annotations

import pytest
import torch

import toy_model
from polarmace.training.checkpoint import CheckpointHandler
from polarmace.training.ema import ExponentialMovingAverage
from polarmace.training.loss import WeightedLoss
from polarmace.training.metrics import MetricsAccumulator


# ------------------------------------------------------------------------------------ loss
def _graph(n_struct=2, n_atoms=3, labels=("energy", "forces", "bec")):
    g = torch.Generator().manual_seed(0)
    n = n_struct * n_atoms
    graph = {"positions": torch.randn(n, 3, generator=g, dtype=torch.float64),
             "batch": torch.arange(n_struct).repeat_interleave(n_atoms),
             "num_atoms": torch.full((n_struct,), n_atoms), "cell": torch.eye(3, dtype=torch.float64).expand(n_struct, 3, 3)}
    if "energy" in labels:
        graph["energy"] = torch.randn(n_struct, generator=g, dtype=torch.float64)
        graph["energy_mask"] = torch.ones(n_struct, dtype=torch.float64)
    if "forces" in labels:
        graph["forces"] = torch.randn(n, 3, generator=g, dtype=torch.float64)
        graph["forces_mask"] = torch.ones(n, dtype=torch.float64)
    if "bec" in labels:
        graph["bec"] = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
        graph["bec_mask"] = torch.ones(n, dtype=torch.float64)
    return graph


def test_bec_loss_and_metrics_fix_the_global_sign():
    graph = _graph()
    loss_fn = WeightedLoss({"energy": 0.0, "forces": 0.0, "bec": 1.0})
    loss_fn.resolve(["energy", "forces", "bec"])
    pred = {"bec": graph["bec"].clone()}
    pred["bec"][graph["batch"] == 1] *= -1  # structure 1 has the opposite latent-charge sign
    total, terms = loss_fn(pred, graph)
    assert float(total) == pytest.approx(0.0, abs=1e-24)
    acc = MetricsAccumulator()
    acc.update(pred, graph)
    m = acc.compute()
    assert m["BEC_mae"] == pytest.approx(0.0, abs=1e-12) and m["BEC_r2"] == pytest.approx(1.0)


def test_masked_structures_do_not_contribute():
    graph = _graph()
    pred = {"energy": graph["energy"].clone(), "forces": graph["forces"].clone()}
    pred["energy"][1] += 100.0
    pred["forces"][graph["batch"] == 1] += 5.0
    loss_fn = WeightedLoss({"energy": 1.0, "forces": 1.0})
    loss_fn.resolve(["energy", "forces"])
    assert float(loss_fn(pred, graph)[0]) > 1.0
    graph["energy_mask"][1] = 0.0
    graph["forces_mask"][graph["batch"] == 1] = 0.0
    assert float(loss_fn(pred, graph)[0]) == pytest.approx(0.0, abs=1e-24)


def test_missing_label_gives_one_warning_and_weight_zero():
    loss_fn = WeightedLoss({"energy": 1.0, "forces": 100.0, "dipole": 5.0, "bec": 2.0})
    with pytest.warns(UserWarning, match="'dipole'.*'bec'.*absent") as record:
        weights = loss_fn.resolve(["energy", "forces"])
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    assert weights["dipole"] == 0.0 and weights["bec"] == 0.0 and weights["forces"] == 100.0
    assert loss_fn.active() == ("energy", "forces")


# ------------------------------------------------------------------------- EMA, checkpoints
def test_ema_state_survives_a_checkpoint_round_trip(tmp_path):
    cfg = {"model": {"elements": ["Cu", "Au"], "r_max": 4.0, "num_bessel": 4}}
    model = toy_model.ToyModel(cfg)
    ema = ExponentialMovingAverage(model, 0.95)
    for k in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (k + 1))
        ema.update(model)
    handler = CheckpointHandler(tmp_path, keep=2)
    for step in range(4):
        handler.save({"model": model.state_dict(), "ema": ema.state_dict()}, epoch=1, step=step)
    assert [s for _, s, _ in handler.list()] == [2, 3]  # keep N
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    state = handler.load()
    assert state["epoch"] == 1 and state["step"] == 3 and {"torch", "numpy", "python"} <= set(state["rng"])
    fresh = ExponentialMovingAverage(toy_model.ToyModel(cfg), 0.5)
    fresh.load_state_dict(state["ema"])
    assert fresh.num_updates == 5 and fresh.decay == 0.95
    for name, t in ema.shadow.items():
        assert torch.equal(fresh.shadow[name], t)
    # evaluation swaps the averaged weights in and restores the training weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.average_parameters(model):
        assert torch.equal(model.pair_weights, ema.shadow["pair_weights"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    from polarmace.data.batching import epoch_batches

    a = epoch_batches(23, 4, seed=5, epoch=3)
    assert a == epoch_batches(23, 4, seed=5, epoch=3)
    assert a != epoch_batches(23, 4, seed=5, epoch=4)
    assert sorted(i for b in a for i in b) == list(range(23))

"""GPU readiness: given the host-side facts of a batch (polarmace.data.keys.HOST_KEYS), the
model's forward pass reads nothing back from the device.

The check runs the model with every device tensor on PyTorch's "meta" device, which has shapes
but no data: any operation whose result depends on tensor values on the host (`.item()`,
`bool(t)`, `.tolist()`, `.cpu()`, `bincount`, `nonzero`, `repeat_interleave` without an output
size, ...) raises there. On a GPU each of those is a device synchronisation. The host facts stay
on the CPU, as `to_device` keeps them. A control shows the check bites: without the host facts
the same call fails on the meta device.
"""

import numpy as np
import pytest
import torch

from polarmace.data.batching import to_device
from polarmace.data.graph import collate
from polarmace.data.keys import HOST_KEYS
from polarmace.data.schema import Configuration
from polarmace.electrostatics import pme
from polarmace.model import build_model
from test_model import tiny_config

pytestmark = pytest.mark.usefixtures("float64_default", "one_thread")


def _periodic(seed: int = 0) -> Configuration:
    rng = np.random.default_rng(seed)
    return Configuration(atomic_numbers=np.array([1, 6, 8, 1, 8, 6, 1, 1]),
                         positions=rng.uniform(0.0, 5.0, (8, 3)), cell=np.eye(3) * 6.0,
                         pbc=np.array([True, True, True]))


def _open(seed: int = 1) -> Configuration:
    rng = np.random.default_rng(seed)
    return Configuration(atomic_numbers=np.array([8, 1, 1, 6, 8]),
                         positions=rng.uniform(0.0, 4.0, (5, 3)))


def _model(variant: str, method: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config(variant)
    cfg["long_range"]["method"] = method
    return build_model(cfg)


def _on_meta(graph):
    return {k: (v if k in HOST_KEYS else v.to("meta")) for k, v in graph.items()}


def _run(model, graph, mode: str):
    out = model(graph, True, mode == "stress", mode == "bec")
    if mode == "train":  # the training step's double backward
        ((out["forces"] ** 2).sum() + out["energy"].sum()).backward()
    return out


@pytest.mark.parametrize("variant,method", [("sr", "auto"), ("les", "ewald"), ("les", "pme"),
                                            ("uiu", "ewald"), ("uQiqiu", "ewald"), ("uQiqiu", "pme"),
                                            ("uiq", "pme")])
@pytest.mark.parametrize("mode", ["eval", "stress", "bec", "train"])
def test_periodic_forward_reads_nothing_back_from_the_device(variant, method, mode):
    model = _model(variant, method).to("meta")
    model.train(mode == "train")
    graph = collate([_periodic(0), _periodic(3)], cutoff=3.0)
    out = _run(model, _on_meta(graph), mode)
    assert out["energy"].device.type == "meta" and out["forces"].shape == (16, 3)


@pytest.mark.parametrize("variant", ["sr", "les", "uQiqiu"])
def test_without_host_facts_the_meta_check_fails(variant):
    """The control: the fallback path reads the batch back (so the test above would catch it)."""
    model = _model(variant, "ewald").to("meta").eval()
    graph = {k: v for k, v in collate([_periodic()], cutoff=3.0).items() if k not in HOST_KEYS}
    with pytest.raises((RuntimeError, NotImplementedError)):
        _run(model, {k: v.to("meta") for k, v in graph.items()}, "eval")


@pytest.mark.parametrize("variant,method", [("sr", "auto"), ("les", "ewald"), ("les", "pme"),
                                            ("uQiqiu", "ewald"), ("uQiqiu", "pme")])
def test_host_facts_change_no_number(variant, method):
    """Same energies, forces, stress and BEC with and without the host facts, periodic and a
    mixed open + periodic batch."""
    model = _model(variant, method).eval()
    for structures in ([_periodic(0), _periodic(3)], [_open(), _periodic(2)]):
        with_facts = collate(structures, cutoff=3.0)
        without = {k: v for k, v in with_facts.items() if k not in HOST_KEYS}
        bec = variant != "sr"
        a = model(with_facts, True, True, bec)
        b = model(without, True, True, bec)
        for key in ("energy", "forces", "stress") + (("bec", "charges") if bec else ()):
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


def test_unknown_element_is_named_from_the_host_facts():
    model = _model("les").eval()
    structure = _periodic()
    structure.atomic_numbers[2] = 26  # Fe, not in the model's H, C, O
    graph = collate([structure], cutoff=3.0)
    with pytest.raises(ValueError, match="atomic number 26 is not in model.elements"):
        model(graph)


def test_to_device_keeps_the_host_facts_on_the_cpu():
    graph = collate([_periodic()], cutoff=3.0)
    moved = to_device(graph, torch.device("meta"), torch.float32)
    for key, value in moved.items():
        assert value.device.type == ("cpu" if key in HOST_KEYS else "meta"), key
    assert moved["host_cell"].dtype == torch.float64 and moved["positions"].dtype == torch.float32


def test_pme_influence_cached_by_the_host_cell():
    """At fixed cell (MD) the influence table is reused, keyed by the host copy of the cell."""
    cell = torch.eye(3).unsqueeze(0) * 7.0
    host = cell.clone()
    mesh = [12, 12, 12]
    first = pme.influence_function(cell, 0.8, mesh, 6, host)
    again = pme.influence_function(cell, 0.8, mesh, 6, host)
    assert again is first
    torch.testing.assert_close(first, pme._influence_uncached(cell, 0.8, mesh, 6), rtol=0, atol=0)
    other = pme.influence_function(cell * 1.01, 0.8, mesh, 6, host * 1.01)
    assert other is not first

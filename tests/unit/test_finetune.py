"""model.init_from / freeze_trunk_epochs (polarmace.finetune): a run starts from a model file's
trunk and statistics, new long-range heads start fresh, the trunk stays fixed while frozen and
trains afterwards, and bad init files are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("float64_default", "one_thread")

TINY = {"r_max": 4.0, "num_bessel": 4, "max_ell": 1, "hidden_irreps": "4x0e+4x1o", "num_interactions": 2,
        "correlation": 2, "radial_mlp": [8], "dtype": "float64"}


def _data(path: Path, n: int = 8) -> Path:
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
        a.set_chemical_symbols(["Cu", "Au"] * 4)
        a.positions += 0.05 * rng.normal(size=a.positions.shape)
        a.calc = EMT()
        a.info["energy"] = a.get_potential_energy()
        a.arrays["forces"] = a.get_forces()
        a.calc = None
        frames.append(a)
    ase.io.write(str(path), frames, format="extxyz")
    return path


def _source(tmp: Path, elements=("Au", "Cu")) -> Path:
    from polarmace import build_model

    torch.manual_seed(3)
    cfg = {"model": dict(TINY, elements=list(elements), e0s={e: -1.0 - i for i, e in enumerate(elements)},
                         avg_num_neighbors=9.0, residual_first_block=True),
           "long_range": {"variant": "sr"}}
    model = build_model(cfg, statistics={"scale": 0.7, "shift": 0.05})
    path = tmp / "source.pt"
    model.save(str(path))
    return path


def _config(data: Path, init: Path, out: Path, epochs: int, freeze: int, variant: str = "les") -> dict:
    # the model section's trunk keys are deliberately different: init_from replaces them
    return {"model": {"init_from": str(init), "freeze_trunk_epochs": freeze, "hidden_irreps": "8x0e",
                      "num_interactions": 1},
            "long_range": {"variant": variant},
            "data": {"train": str(data), "valid_fraction": 0.25, "batch_size": 2, "seed": 1},
            "training": {"epochs": epochs, "lr": 0.01, "seed": 1, "ema_decay": None,
                         "loss_weights": {"energy": 1.0, "forces": 10.0}},
            "output": {"directory": str(out), "name": "ft", "plots": False}}


def test_initial_model_takes_trunk_and_statistics(tmp_path: Path) -> None:
    from polarmace import build_model
    from polarmace.config import load_config
    from polarmace.finetune import initial_model
    from polarmace.model import PolarMACE

    src = _source(tmp_path)
    cfg = load_config({"model": {"init_from": str(src), "hidden_irreps": "8x0e"},
                       "long_range": {"variant": "les"}}).to_dict()
    stats = {"elements": ["Cu"], "e0s": {"Cu": 5.0}, "scale": 3.0, "shift": 1.0, "avg_num_neighbors": 2.0}
    model, cbs = initial_model(build_model, cfg, stats)
    ref = PolarMACE.load(str(src))
    assert cfg["model"]["hidden_irreps"] == "4x0e+4x1o" and cfg["model"]["elements"] == ["Au", "Cu"]
    assert cfg["model"]["residual_first_block"] is True and cbs == ()
    own = model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(own[k], v), k
    assert float(model.scale) == pytest.approx(0.7) and float(model.shift) == pytest.approx(0.05)
    assert hasattr(model, "charge_readout")


def test_init_statistics_data(tmp_path: Path) -> None:
    from polarmace import build_model
    from polarmace.config import load_config
    from polarmace.finetune import initial_model

    src = _source(tmp_path)
    cfg = load_config({"model": {"init_from": str(src), "init_statistics": "data"},
                       "long_range": {"variant": "sr"}}).to_dict()
    stats = {"elements": ["Cu"], "e0s": {"Cu": 5.0}, "scale": 3.0, "shift": 1.0}
    model, _ = initial_model(build_model, cfg, stats)
    e0 = dict(zip(cfg["model"]["elements"], model.atomic_energies.tolist()))
    assert e0 == {"Au": pytest.approx(-1.0), "Cu": pytest.approx(5.0)}  # data's for Cu, the file's for Au
    assert float(model.scale) == pytest.approx(0.7) and float(model.shift) == pytest.approx(1.0)


def test_bad_init_files(tmp_path: Path) -> None:
    from polarmace import build_model
    from polarmace.config import ConfigError, load_config
    from polarmace.errors import InputError
    from polarmace.finetune import initial_model

    src = _source(tmp_path)
    stats = {"elements": ["Cu", "Pt"], "e0s": {}, "scale": 1.0, "shift": 0.0}
    cfg = load_config({"model": {"init_from": str(src)}}).to_dict()
    with pytest.raises(ConfigError, match="not Pt"):
        initial_model(build_model, cfg, copy.deepcopy(stats))
    cfg = load_config({"model": {"init_from": str(tmp_path / "nope.pt")}}).to_dict()
    with pytest.raises(InputError, match="nope.pt"):
        initial_model(build_model, cfg, {"elements": ["Cu"], "scale": 1.0, "shift": 0.0})
    # a dipole variant needs vector features in the last layer: the sr file has scalars only there
    cfg = load_config({"model": {"init_from": str(src)}, "long_range": {"variant": "u"}}).to_dict()
    with pytest.raises(ConfigError, match="--variant u"):
        initial_model(build_model, cfg, {"elements": ["Cu"], "scale": 1.0, "shift": 0.0})


def test_freeze_then_train(tmp_path: Path) -> None:
    """Through the trainer (model factory route, the same function the trainer calls): trunk
    unchanged after the frozen epoch, changed after the next; the charge head trains from the start."""
    from polarmace import build_model
    from polarmace.finetune import initial_model
    from polarmace.model import PolarMACE
    from polarmace.training.trainer import train

    data = _data(tmp_path / "d.xyz")
    src = _source(tmp_path)
    ref = {k: v.clone() for k, v in PolarMACE.load(str(src)).state_dict().items() if k.startswith("trunk.")}
    cfg = _config(data, src, tmp_path / "run", epochs=2, freeze=1)
    wanted = copy.deepcopy(cfg["model"])
    cfg["model"].update(init_from=None, freeze_trunk_epochs=0)
    extra: list = []
    snaps: list = []

    def factory(c, statistics):
        c["model"].update(init_from=wanted["init_from"], freeze_trunk_epochs=wanted["freeze_trunk_epochs"])
        model, cbs = initial_model(build_model, c, statistics)
        extra[:] = list(cbs)
        return model

    def callback(event, state):
        for cb in extra:
            cb(event, state)
        if event == "epoch_end":
            snaps.append({k: v.detach().clone() for k, v in state["model"].state_dict().items()})

    train(cfg, model_factory=factory, callbacks=[callback])
    assert len(snaps) == 2
    trunk_keys = [k for k in ref if "weight" in k]
    assert all(torch.equal(snaps[0][k], ref[k]) for k in trunk_keys)
    assert any(not torch.equal(snaps[1][k], ref[k]) for k in trunk_keys)
    head = [k for k in snaps[0] if k.startswith("charge_readout.") and "weight" in k]
    assert head


def test_trainer_reads_init_from(tmp_path: Path) -> None:
    """The config alone (what polarmace-train reads): trunk, statistics and freeze from
    model.init_from; the final model file records the file's trunk; a resumed run keeps the file's
    trunk without reading the file again."""
    from polarmace.model import PolarMACE
    from polarmace.training.trainer import train

    data = _data(tmp_path / "d.xyz")
    src = _source(tmp_path)
    ref = {k: v.clone() for k, v in PolarMACE.load(str(src)).state_dict().items() if k.startswith("trunk.")}
    snaps: list = []

    def callback(event, state):
        if event == "epoch_end":
            snaps.append({k: v.detach().clone() for k, v in state["model"].state_dict().items()})

    cfg = _config(data, src, tmp_path / "run", epochs=1, freeze=1)
    train(cfg, callbacks=[callback])
    assert all(torch.equal(snaps[0][k], ref[k]) for k in ref if "weight" in k)
    final = PolarMACE.load(str(tmp_path / "run" / "ft.model"))
    assert final.config["model"]["hidden_irreps"] == "4x0e+4x1o"
    assert final.config["model"]["residual_first_block"] is True
    assert final.config["model"]["init_from"] is None  # no paths in a model file
    # resume for one more epoch (past the frozen one): the trunk trains now
    src.unlink()
    cfg["training"]["epochs"] = 2
    train(cfg, resume=True, callbacks=[callback])
    assert any(not torch.equal(snaps[-1][k], ref[k]) for k in ref if "weight" in k)


def test_run_config_records_what_init_from_built(tmp_path: Path) -> None:
    """config.json / config.yaml of the run directory are written after model.init_from is applied:
    they carry the file's trunk, elements and E0s (the config's own trunk keys differ), the same
    model section the checkpoint carries and the final model was built from."""
    import json

    import yaml

    from polarmace.finetune import TRUNK_KEYS
    from polarmace.model import PolarMACE
    from polarmace.training.checkpoint import CheckpointHandler
    from polarmace.training.trainer import train

    src = _source(tmp_path)
    train(_config(_data(tmp_path / "d.xyz"), src, tmp_path / "run", epochs=0, freeze=0))
    run = tmp_path / "run"
    written = json.loads((run / "config.json").read_text())["model"]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == written
    assert written["hidden_irreps"] == "4x0e+4x1o" and written["num_interactions"] == 2
    assert written["residual_first_block"] is True and written["avg_num_neighbors"] == 9.0
    assert written["elements"] == ["Au", "Cu"] and written["e0s"] == {"Au": -1.0, "Cu": -2.0}
    assert written["init_from"] == str(src)  # how the run started
    assert written == CheckpointHandler(run).load()["config"]["model"]
    built = PolarMACE.load(str(run / "ft.model")).config["model"]
    assert {k: written[k] for k in TRUNK_KEYS} == {k: built[k] for k in TRUNK_KEYS}

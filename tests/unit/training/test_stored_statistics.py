"""The trainer takes the statistics a polarmace-prepare HDF5 file stores when they describe its
training split (the whole file, the same r_max, elements and E0 method), and recomputes them,
saying why in the log, otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

import toy_model
from polarmace.cli import prepare
from polarmace.config import load_config
from polarmace.data.hdf5 import HDF5Dataset
from polarmace.data.sources import Subset
from polarmace.data.statistics import STATISTICS_KEYS, compute_statistics
from polarmace.training import datasets
from polarmace.training.checkpoint import CheckpointHandler
from polarmace.training.trainer import train
from toy_data import make_dataset, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")

R_MAX = 4.0  # toy_config's model.r_max


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """train.h5 (12 EMT Cu/Au cells, statistics stored for r_max 4 Å) and a separate valid file."""
    root = tmp_path_factory.mktemp("stored")
    xyz = make_dataset(root / "train.xyz", n=12, seed=0)
    h5 = root / "train.h5"
    assert prepare.main([str(xyz), "-o", str(h5), "--r-max", str(R_MAX), "--no-progress"]) == 0
    return {"h5": h5, "valid": make_dataset(root / "valid.xyz", n=4, seed=1)}


def _config(files: dict, out: Path, data: dict = None, model: dict = None) -> dict:
    cfg = toy_config(files["h5"], out, epochs=1)
    cfg["data"].update({"valid": str(files["valid"]), "valid_fraction": 0.0, "test_fraction": 0.0, **(data or {})})
    cfg["model"].update(model or {})
    cfg["output"]["plots"] = False
    return cfg


def _no_recompute(*args, **kwargs):
    raise AssertionError("compute_statistics called: the statistics stored in train.h5 were not used")


def test_stored_statistics_equal_the_recomputed_ones(files):
    """What polarmace-prepare stores is what the trainer would compute on the file read back."""
    dataset = HDF5Dataset(files["h5"])
    assert dataset.statistics == compute_statistics(dataset, R_MAX)
    assert set(dataset.statistics) == set(STATISTICS_KEYS)


def test_the_trainer_takes_the_stored_statistics_without_recomputing(files, tmp_path, monkeypatch):
    stored = HDF5Dataset(files["h5"]).statistics
    monkeypatch.setattr(datasets, "compute_statistics", _no_recompute)
    train(_config(files, tmp_path / "run"), model_factory=toy_model.build_toy_model)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "statistics stored in train.h5 by polarmace-prepare, not recomputed" in log
    assert CheckpointHandler(tmp_path / "run").load()["statistics"] == stored
    written = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert written["avg_num_neighbors"] == stored["avg_num_neighbors"] and written["e0s"] == stored["e0s"]


def test_the_stored_values_are_the_ones_the_model_gets(files, tmp_path, monkeypatch):
    """Changed stored statistics reach the model: they are read, not recomputed behind the scenes."""
    h5 = tmp_path / "edited.h5"
    h5.write_bytes(files["h5"].read_bytes())
    with h5py.File(h5, "r+") as f:
        stats = json.loads(f.attrs["statistics"])
        stats.update(avg_num_neighbors=7.25, scale=0.5, shift=-0.125, e0s={"Cu": -1.5, "Au": -2.5})
        f.attrs["statistics"] = json.dumps(stats)
    monkeypatch.setattr(datasets, "compute_statistics", _no_recompute)
    train(_config({**files, "h5": h5}, tmp_path / "run"), model_factory=toy_model.build_toy_model)
    saved = CheckpointHandler(tmp_path / "run").load()
    assert saved["statistics"] == stats
    assert saved["config"]["model"]["avg_num_neighbors"] == 7.25
    assert saved["config"]["model"]["e0s"] == {"Cu": -1.5, "Au": -2.5}


def test_a_split_of_the_file_is_recomputed_and_the_log_says_why(files, tmp_path, monkeypatch):
    calls = []

    def spy(train_set, *args, **kwargs):
        calls.append(len(train_set))
        return compute_statistics(train_set, *args, **kwargs)

    monkeypatch.setattr(datasets, "compute_statistics", spy)
    cfg = _config(files, tmp_path / "run", data={"valid": None, "valid_fraction": 0.25})
    train(cfg, model_factory=toy_model.build_toy_model)
    assert calls == [9]
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("statistics computed on the 9 training structures (train.h5's stored statistics cover all 12 of "
            "its structures, the training split 9") in log
    split = json.loads((tmp_path / "run" / "splits.json").read_text())["train"]
    expected = compute_statistics(Subset(HDF5Dataset(files["h5"]), split), R_MAX)
    assert CheckpointHandler(tmp_path / "run").load()["statistics"] == expected
    assert expected != HDF5Dataset(files["h5"]).statistics


@pytest.mark.parametrize("model, reason", [
    ({"r_max": 3.5}, "train.h5's statistics are stored for r_max 4 Å, model.r_max is 3.5 Å"),
    ({"e0s": "average"}, "model.e0s is 'average', train.h5 stores least-squares E0s"),
    ({"elements": ["Au", "Cu"]}, "train.h5's statistics are stored for elements ['Cu', 'Au'], model.elements "
                                 "['Au', 'Cu']"),
])
def test_other_settings_recompute(files, model, reason):
    dataset = HDF5Dataset(files["h5"])
    conf = load_config({"model": {"r_max": R_MAX, **model}}).model
    stats, origin = datasets.training_statistics(Subset(dataset, range(len(dataset))), conf)
    assert origin == f"computed on the 12 training structures ({reason})"
    assert stats == compute_statistics(dataset, conf.r_max, elements=conf.elements, e0s=conf.e0s)
    same, origin = datasets.training_statistics(Subset(dataset, range(len(dataset))),
                                                load_config({"model": {"r_max": R_MAX}}).model)
    assert origin == "stored in train.h5 by polarmace-prepare, not recomputed" and same == dataset.statistics


def test_elements_given_to_prepare_but_not_to_the_model_recompute(files, tmp_path):
    """A stored element list with an element the data lacks is not what the trainer would find."""
    xyz = make_dataset(tmp_path / "cu_au.xyz", n=6, seed=2)
    h5 = tmp_path / "with_ag.h5"
    assert prepare.main([str(xyz), "-o", str(h5), "--r-max", str(R_MAX), "--elements", "Cu", "Ag", "Au",
                         "--no-progress"]) == 0
    dataset = HDF5Dataset(h5)
    _, origin = datasets.training_statistics(Subset(dataset, range(6)), load_config({"model": {"r_max": R_MAX}}).model)
    assert origin == ("computed on the 6 training structures (with_ag.h5's statistics are stored for elements "
                      "['Cu', 'Ag', 'Au'], the elements of the data ['Cu', 'Au'])")
    stats, origin = datasets.training_statistics(
        Subset(dataset, range(6)), load_config({"model": {"r_max": R_MAX, "elements": ["Cu", "Ag", "Au"]}}).model)
    assert origin.startswith("stored in with_ag.h5") and stats == dataset.statistics

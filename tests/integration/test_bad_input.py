"""Every mistake a clear message: the command-line tools on bad input, each case in its own process.

Each case checks the exit status (2 for an expected error), that stderr is one line naming the
file, key, frame or setting (no traceback), and that nothing was written or lost (the
directories a case may touch are hashed before and after). The cases run through
`cli_runner.py`, which forks one child process per case from a process that imported polarmace
once (a fresh interpreter per case would cost ~5 s of imports each). One case also runs as a
plain `python -m` subprocess, to cover the entry point itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml

from repo_paths import ROOT, TESTS
from toy_data import make_dataset, toy_config

TOY = ["--model-factory", "toy_model:build_toy_model"]


# ----------------------------------------------------------------------------------- inputs
def tiny_polarmace(path: Path) -> Path:
    """An untrained H/O latent-charge model whose training data defaulted to +1 e."""
    from polarmace import build_model
    from polarmace.config import load_config

    cfg = load_config({"model": {"elements": ["H", "O"], "r_max": 3.0, "num_bessel": 4, "max_ell": 1,
                                 "hidden_irreps": "4x0e+4x1o", "num_interactions": 1, "correlation": 1,
                                 "radial_mlp": [4], "e0s": {"H": -1.0, "O": -2.0}, "avg_num_neighbors": 2.0},
                       "long_range": {"variant": "les"}, "data": {"default_total_charge": 1.0}})
    build_model(cfg).save(str(path))
    return path


def water(n: int = 2, total_charge: Optional[float] = None, **info):
    from ase import Atoms

    mol = np.array([[0.0, 0.0, 0.0], [0.76, 0.59, 0.0], [-0.76, 0.59, 0.0]])
    atoms = Atoms("OH2" * n, positions=np.concatenate([mol + [3.0 * k, 0.0, 0.0] for k in range(n)]))
    if total_charge is not None:
        atoms.info["total_charge"] = total_charge
    atoms.info.update(info)
    return atoms


def write(path: Path, frames) -> Path:
    import ase.io

    ase.io.write(str(path), frames, format="extxyz")
    return path


def tree_digest(*roots: Path) -> Dict[str, str]:
    """{path: sha1} of every file under `roots` (nothing written or lost = equal digests); the
    run lock's record (.lock, rewritten by every run that takes the lock) is left out."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            if p.name == ".lock":
                continue
            out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data files, a trained toy run (checkpoint + model) and model files of every kind."""
    from polarmace.data.atoms import read_configurations
    from polarmace.data.hdf5 import write_dataset
    from polarmace.training.trainer import train

    root = tmp_path_factory.mktemp("bad_input")
    w = {"root": root}
    w["data"] = make_dataset(root / "cu_au.xyz", n=10)
    w["other"] = make_dataset(root / "cu_au_other.xyz", n=6, seed=5)
    cfg = toy_config(w["data"], root / "toy_run", epochs=1)
    cfg["output"]["plots"] = False
    w["toy_cfg"] = cfg
    train(cfg, model_factory=__import__("toy_model").build_toy_model)
    w["toy_run"] = root / "toy_run"
    w["checkpoint"] = sorted(w["toy_run"].glob("checkpoint-*.pt"))[-1]
    w["model"] = tiny_polarmace(root / "water.model")
    blob = w["model"].read_bytes()
    (root / "truncated.model").write_bytes(blob[: len(blob) // 2])
    (root / "random.model").write_bytes(np.random.default_rng(0).bytes(4096))
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(root / "exported.pt"))  # a TorchScript archive under a .pt name
    w["water"] = write(root / "water.xyz", [water(2, total_charge=1.0), water(2)])
    w["nan_xyz"] = root / "nan.xyz"
    w["nan_xyz"].write_text(_xyz_with_nan_forces())
    w["copper"] = write(root / "copper.xyz", [water(1), _copper_frame()])
    both = write(root / "both.xyz", [water(1, total_charge=0.0), water(1, total_charge=1.0, charge=0.0)])
    w["both"] = both
    w["conflict"] = write(root / "conflict.xyz", [water(1, total_charge=0.0, charge=1.0)])
    flat = water(1)
    flat.cell = [[1e-7, 0, 0], [0, 6, 0], [0, 0, 6]]
    flat.pbc = True
    w["flat"] = write(root / "flat.xyz", [flat])
    configs = read_configurations(w["data"])
    w["h5"] = root / "train.h5"
    write_dataset(w["h5"], configs)
    w["h5_nan"], w["h5_rows"] = _broken_h5(w["h5"], root)
    w["file"] = root / "a_file"
    w["file"].write_text("not a directory\n")
    return w


def _copper_frame():
    from ase import Atoms

    return Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])


def _xyz_with_nan_forces() -> str:
    rows = ["O 0 0 0 0 0 0", "H 0.76 0.59 0 0 nan 0", "H -0.76 0.59 0 0 0 0"]
    return "3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\n" + "\n".join(rows) + "\n"


def _broken_h5(good: Path, root: Path):
    import h5py

    nan, rows = root / "nan.h5", root / "missing_row.h5"
    shutil.copy(good, nan)
    shutil.copy(good, rows)
    with h5py.File(nan, "r+") as f:
        forces = f["atoms/forces"][()]
        ptr = f["configs/ptr"][()]
        forces[ptr[3] + 1, 2] = np.nan  # structure 3, its second atom
        del f["atoms/forces"]
        f["atoms"].create_dataset("forces", data=forces)
    with h5py.File(rows, "r+") as f:
        forces = f["atoms/forces"][()]
        del f["atoms/forces"]
        f["atoms"].create_dataset("forces", data=forces[:-1])
    return nan, rows


def config_file(w, name: str, **changes) -> Path:
    """A toy config YAML in a fresh directory; changes are {section: {key: value}} merged in."""
    cfg = json.loads(json.dumps(w["toy_cfg"]))
    cfg["output"]["directory"] = str(w["root"] / f"run_{name}")
    for section, values in changes.items():
        if values is None:
            cfg.pop(section, None)
        else:
            cfg.setdefault(section, {}).update(values)
    path = w["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------ cases
def run_cases(cases: Sequence[dict], tmp: Path) -> List[dict]:
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    result = tmp / "results.json"
    proc = subprocess.run([sys.executable, str(TESTS / "cli_runner.py"), str(spec), str(result)],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    return json.loads(result.read_text())


ENOSPC_AT_FSYNC = """
import errno, os
import polarmace.training.checkpoint as c
def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
c.os.fsync = full
"""

TORCH_FULL_DISK = """
import shutil, collections, torch
import polarmace.errors as e
Usage = collections.namedtuple("Usage", "total used free")
e.shutil.disk_usage = lambda path: Usage(10**9, 10**9, 0)
def torn(obj, fh, *a, **k):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2752 vs 2640")
torch.save = torn
"""


def _case(prog: str, argv: List, fragments: List[str], keep: Sequence = (), absent: Sequence = (),
          setup: str = "", code: int = 2) -> dict:
    return {"prog": prog, "argv": [str(a) for a in argv], "setup": setup, "fragments": fragments,
            "keep": [str(p) for p in keep], "absent": [str(p) for p in absent], "code": code}


def _cases(w) -> Dict[str, dict]:
    """name -> case: the tool, its arguments, fragments its one-line message must hold, paths
    that must not change and paths that must not appear."""
    r = w["root"]
    data, model, water_xyz = w["data"], w["model"], w["water"]
    shutil.copytree(w["toy_run"], r / "run_resume_other")
    shutil.copytree(w["toy_run"], r / "run_existing")
    (r / "run_locked").mkdir()
    md_in = write(r / "md_in.xyz", [water(2, total_charge=1.0)])
    empty = r / "empty.yaml"
    empty.write_text("")
    dup = r / "dup.yaml"
    dup.write_text(f"data:\n  train: {data}\ntraining:\n  lr: 0.01\n  epochs: 1\n  lr: 0.05\n")
    bug = "import polarmace.training.datasets as t\nt.compute_statistics = lambda *a, **k: 1 / 0\n"
    cases = {
        # polarmace-train
        "train_empty_config": _case("train", [empty] + TOY, ["data.train is not set"], [empty], [r / "runs"]),
        "train_no_data_train": _case("train", [config_file(w, "nodata", data={"train": None})] + TOY,
                                     ["data.train is not set"], [], [r / "run_nodata"]),
        "train_elements_lack_data_element": _case(
            "train", [config_file(w, "elements", model={"elements": ["Cu"]})] + TOY, ["model.elements", "Au"], [],
            [r / "run_elements" / "toy.model"]),
        "train_duplicate_yaml_key": _case("train", [dup] + TOY, ["dup.yaml", "line 6", "duplicate key 'lr'", "line 4"],
                                          [dup]),
        "train_resume_other_data": _case(
            "train", [config_file(w, "resume_other", data={"train": str(w["other"])}), "--resume"] + TOY,
            ["--resume", "6 structures", "trained on 10"], [r / "run_resume_other"]),
        "train_output_not_a_directory": _case(
            "train", [config_file(w, "notdir", output={"directory": str(w["file"] / "run")})] + TOY,
            ["a_file/run", "cannot write"], [w["file"]]),
        "train_disk_full": _case("train", [config_file(w, "enospc")] + TOY, ["splits.json", "no space left on device"],
                                 [], [r / "run_enospc" / "toy.model"], ENOSPC_AT_FSYNC),
        "train_disk_full_torch_message": _case(
            "train", [config_file(w, "torchfull")] + TOY, ["run_torchfull", "no space left on device"], [],
            [r / "run_torchfull" / "toy.model"], TORCH_FULL_DISK),
        "train_run_directory_locked": _case("train", [config_file(w, "locked")] + TOY,
                                            ["in use by another run", "the test pid"], [r / "run_locked"]),
        "train_existing_run": _case("train", [config_file(w, "existing")] + TOY,
                                    ["already holds checkpoints", "--resume"], [r / "run_existing"]),
        "train_hdf5_nan": _case("train", [config_file(w, "h5nan", data={"train": str(w["h5_nan"])})] + TOY,
                                ["nan.h5", "structure 3", "forces contains NaN"], [w["h5_nan"]],
                                [r / "run_h5nan" / "toy.model"]),
        "train_hdf5_missing_row": _case(
            "train", [config_file(w, "h5rows", data={"train": str(w["h5_rows"])})] + TOY,
            ["missing_row.h5", "structure 9", "atoms/forces has"], [w["h5_rows"]], [r / "run_h5rows" / "toy.model"]),
        "train_bug_keeps_traceback": _case("train", [config_file(w, "bug")] + TOY, ["ZeroDivisionError"], [], [],
                                           bug, code=1),
        # polarmace-eval
        "eval_missing_data": _case("eval", ["--model", model, "--data", r / "none.xyz"], ["none.xyz", "no such data file"],
                                   [model]),
        "eval_nan_in_data": _case("eval", ["--model", model, "--data", w["nan_xyz"]], ["nan.xyz", "frame 0", "NaN"]),
        "eval_unknown_element": _case("eval", ["--model", model, "--data", w["copper"]],
                                      ["copper.xyz", "frame 1", "element Cu", "H, O"], [], [r / "copper-eval"]),
        "eval_truncated_model": _case("eval", ["--model", r / "truncated.model", "--data", water_xyz],
                                      ["truncated.model", "truncated or corrupt"], [], [r / "water-eval"]),
        "eval_random_model": _case("eval", ["--model", r / "random.model", "--data", water_xyz],
                                   ["random.model", "not a torch file"], [], [r / "water-eval"]),
        "eval_torchscript_model": _case("eval", ["--model", r / "exported.pt", "--data", water_xyz],
                                        ["exported.pt", "TorchScript"], [], [r / "water-eval"]),
        "eval_trainer_checkpoint": _case("eval", ["--model", w["checkpoint"], "--data", water_xyz],
                                         [w["checkpoint"].name, "checkpoint", "--resume"]),
        "eval_hdf5_nan": _case("eval", ["--model", model, "--data", w["h5_nan"]], ["nan.h5", "structure 3", "NaN"]),
        # polarmace-prepare
        "prepare_near_zero_cell_vector": _case(
            "prepare", [w["flat"], "-o", r / "flat.h5", "--no-progress"],
            ["flat.xyz", "frame 0", "too small", "plane spacing along lattice vector 0 is 1e-07"], [w["flat"]],
            [r / "flat.h5"]),
        "prepare_two_total_charges": _case("prepare", [w["both"], "-o", r / "both.h5", "--no-progress"],
                                           ["both.xyz", "frame 1", "total_charge = 1 and charge = 0"], [w["both"]],
                                           [r / "both.h5"]),
        # polarmace-md
        "md_output_is_input": _case("md", [md_in, "--model", model, "-o", md_in], ["md_in.xyz", "overwritten"], [md_in]),
        "md_negative_steps": _case("md", [md_in, "--model", model, "--steps", "-5", "-o", r / "neg.xyz"],
                                   ["--steps must be >= 0", "-5"], [md_in], [r / "neg.xyz"]),
        "md_bad_model_file": _case("md", [md_in, "--model", r / "random.model", "-o", r / "rnd.xyz"],
                                   ["random.model", "cannot read"], [], [r / "rnd.xyz"]),
        # polarmace-spectra, -export, -driver
        "spectra_missing_file": _case("spectra", ["ir", r / "none.extxyz"], ["none.extxyz", "no such trajectory file"]),
        "export_trainer_checkpoint": _case("export", [w["checkpoint"], "-o", r / "x.ts"], ["checkpoint"], [],
                                           [r / "x.ts"]),
        "driver_two_total_charges": _case(
            "driver", ["--model", model, "--structure", w["conflict"], "--address", "unix:pm-never"],
            ["conflict.xyz", "total_charge = 0 and charge = 1"]),
    }
    if not torch.cuda.is_available():  # the case needs a machine without CUDA
        cases["train_cuda_without_cuda"] = _case(
            "train", [config_file(w, "cuda", training={"device": "cuda"})] + TOY, ["training.device", "'cuda'", "CUDA"],
            [], [r / "run_cuda"])
    return cases


CASE_NAMES = ["train_empty_config", "train_no_data_train", "train_elements_lack_data_element", "train_duplicate_yaml_key",
              "train_resume_other_data", "train_output_not_a_directory", "train_disk_full",
              "train_disk_full_torch_message", "train_run_directory_locked", "train_existing_run", "train_hdf5_nan",
              "train_hdf5_missing_row", "train_bug_keeps_traceback", "train_cuda_without_cuda", "eval_missing_data",
              "eval_nan_in_data", "eval_unknown_element", "eval_truncated_model", "eval_random_model",
              "eval_torchscript_model", "eval_trainer_checkpoint", "eval_hdf5_nan", "prepare_near_zero_cell_vector",
              "prepare_two_total_charges", "md_output_is_input", "md_negative_steps", "md_bad_model_file",
              "spectra_missing_file", "export_trainer_checkpoint", "driver_two_total_charges"]


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory):
    """{name: (case, result, digests of its `keep` paths before the run)} for every case, plus
    the success cases of `test_md_charge_writes_one_key_and_eval_reports_the_charge`, all run
    by one cli_runner call (one import of polarmace for all)."""
    from polarmace.training.lock import RunLock

    tmp = tmp_path_factory.mktemp("cli_results")
    cases = _cases(world)
    start = write(tmp / "start.xyz", [water(2, total_charge=1.0)])
    cases["md_charge_success"] = _case("md", [start, "--model", world["model"], "--steps", "2", "--interval", "1",
                                              "--charge", "0", "-o", tmp / "md.extxyz"], [], code=0)
    cases["eval_success"] = _case("eval", ["--model", world["model"], "--data", world["water"], "--no-plots",
                                           "--output", tmp / "ev"], [], code=0)
    before = {name: tree_digest(*map(Path, c["keep"])) for name, c in cases.items()}
    lock = RunLock(world["root"] / "run_locked", "the test")
    lock.acquire()  # "another run" holds run_locked while the cases run
    try:
        results = run_cases([{"prog": c["prog"], "argv": c["argv"], "cwd": str(world["root"]), "setup": c["setup"]}
                             for c in cases.values()], tmp)
    finally:
        lock.release()
    out = {name: (case, res, before[name]) for (name, case), res in zip(cases.items(), results)}
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_mistake_is_one_line_with_exit_status_2(name, outcomes, world):
    if name not in outcomes:
        pytest.skip("not applicable on this machine")
    case, res, digest = outcomes[name]
    err = res["err"].strip().splitlines()
    last = err[-1] if err else ""
    assert res["code"] == case["code"], res["err"][-2000:]
    if case["code"] == 1:  # a bug keeps its traceback
        assert "Traceback" in res["err"] and all(f in res["err"] for f in case["fragments"])
        return
    assert "Traceback" not in res["err"] and last.startswith(f"polarmace-{case['prog']}: error: "), res["err"]
    assert [f for f in case["fragments"] if f not in last] == [], last
    assert tree_digest(*map(Path, case["keep"])) == digest, f"changed: {case['keep']}"
    assert [p for p in case["absent"] if Path(p).exists()] == [], "written"
    assert [str(p) for p in world["root"].rglob("*.tmp")] == [], "temporary files left"
    if name == "train_run_directory_locked":
        assert f"the test pid {os.getpid()}" in last  # the message names the holder


def test_entry_point_subprocess_reports_one_line(tmp_path):
    """The real interpreter path (no fork): a missing trajectory, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "polarmace.cli.spectra", "ir", str(tmp_path / "gone.extxyz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"polarmace-spectra: error: {tmp_path / 'gone.extxyz'}: no such trajectory file"


def test_md_charge_writes_one_key_and_eval_reports_the_charge(outcomes):
    """polarmace-md --charge 0 on a +1 structure: every frame carries total_charge 0 and no
    'charge'; polarmace-eval prints the charges it used and stores them in metrics.json."""
    import ase.io

    tmp = outcomes["tmp"]
    _, md, _ = outcomes["md_charge_success"]
    _, ev, _ = outcomes["eval_success"]
    assert md["code"] == 0, md["err"]
    assert "total charge +0 e" in md["out"]
    frames = ase.io.read(str(tmp / "md.extxyz"), ":")
    assert len(frames) == 3 and all(f.info["total_charge"] == 0.0 and "charge" not in f.info for f in frames)
    assert ev["code"] == 0, ev["err"]
    assert "total charge used: +1 e for 1 (info total_charge); +0 e for 1 (default)" in ev["out"]
    assert "note: the model's training data defaulted to +1 e" in ev["out"]
    stored = json.loads((tmp / "ev" / "metrics.json").read_text())["total_charge"]
    assert sorted((e["total_charge"], e["structures"]) for e in stored) == [(0.0, 1), (1.0, 1)]
    predicted = ase.io.read(str(tmp / "ev" / "predictions.xyz"), ":")
    assert [f.info["total_charge"] for f in predicted] == [1.0, 0.0]


# ------------------------------------------------------------------------ library-level rules
def test_one_total_charge_rule():
    from polarmace.data.atoms import DataError, find_total_charge, set_total_charge, total_charge_of

    assert total_charge_of({}) == 0.0 and total_charge_of({}, default=1.0) == 1.0
    assert total_charge_of({"charge": 1}) == 1.0 and total_charge_of({"total_charge": -1.0}) == -1.0
    assert find_total_charge({"total_charge": 1.0, "charge": 1.0}) == (1.0, "total_charge")  # equal: fine
    with pytest.raises(DataError, match=r"f.xyz: frame 3: info has total_charge = 1 and charge = 0: two different"):
        total_charge_of({"total_charge": 1.0, "charge": 0.0}, source="f.xyz: frame 3")
    assert total_charge_of({"Q": 2.0, "charge": 5.0}, key="Q") == 2.0  # a custom key is the only key read
    info = {"charge": 0.0, "total_charge": 1.0}
    set_total_charge(info, 0.0)
    assert info == {"total_charge": 0.0}


def test_calculator_errors_name_the_atoms(world):
    from ase import Atoms

    from polarmace.calculator import PolarMACECalculator
    from polarmace.data.atoms import DataError

    calc = PolarMACECalculator(str(world["model"]))
    cases = [(Atoms(), "atoms: no atoms"),
             (Atoms("OH2", positions=[[0, 0, 0], [1, 0, 0], [1, 0, 0]]), "overlapping atoms 1 .H. and 2 .H. are 0.0000"),
             (Atoms("OH2", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True),
              "cell is singular"),
             (Atoms("OH2", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=[[1e-9, 0, 0], [0, 3, 0], [0, 0, 3]],
                    pbc=True), "cell is singular"),
             (Atoms("OCu", positions=[[0, 0, 0], [2, 0, 0]]), "element Cu .atom 1. is not one of the model's elements H, O"),
             (water(1, total_charge=1.0, charge=0.0), "atoms.info: info has total_charge = 1 and charge = 0")]
    for atoms, message in cases:
        atoms.calc = calc
        with pytest.raises(DataError, match=message):
            atoms.get_potential_energy()
    atoms = water(1, total_charge=1.0)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results["total_charge"] == 1.0  # the charge the model was given is recorded
    assert atoms.get_charges().sum() == pytest.approx(1.0)


def test_calculator_warns_about_overlapping_images_and_the_default_charge(world):
    """Two molecules in a 3.3 Å periodic cell overlap the images (0.3 Å apart): a warning, not
    a silent nonsense energy; no total charge on a model trained with +1 e: a warning."""
    from polarmace.calculator import PolarMACECalculator

    calc = PolarMACECalculator(str(world["model"]))
    atoms = water(2, total_charge=0.0)
    atoms.cell = np.eye(3) * 3.3
    atoms.pbc = True
    atoms.calc = calc
    with pytest.warns(UserWarning, match="across the periodic boundary .* is the cell too small"):
        atoms.get_potential_energy()
    neutral = water(2)
    neutral.calc = PolarMACECalculator(str(world["model"]))
    with pytest.warns(UserWarning, match=r"no total_charge/charge: using \+0 e; the model's training data defaulted to \+1 e"):
        neutral.get_potential_energy()
    assert neutral.calc.results["total_charge"] == 0.0


def test_reader_warns_about_overlapping_periodic_images(tmp_path):
    from polarmace.data.atoms import read_configurations

    atoms = water(2)
    atoms.cell = np.eye(3) * 3.3
    atoms.pbc = True
    path = write(tmp_path / "small_cell.xyz", [atoms])
    with pytest.warns(UserWarning, match=r"small_cell.xyz: frame 0: overlapping atoms .* across the periodic boundary"):
        read_configurations(path)


F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("alpha, message", [
    (torch.tensor([0.1, -0.2, 0.3], **F64), r"'alpha' \(polarizability\) must be >= 0; min = -0.2 at atom 1"),
    (torch.diag_embed(torch.full((3, 3), 0.1, **F64)) + torch.tensor([[0, 0.05, 0], [0, 0, 0], [0, 0, 0]], **F64),
     r"'alpha' \(polarizability\) must be symmetric"),
    (torch.diag_embed(torch.tensor([[0.1, 0.1, 0.1], [0.1, -0.3, 0.1], [0.1, 0.1, 0.1]], **F64)),
     r"'alpha' \(polarizability\) must be positive semi-definite; lowest eigenvalue = -0.3 at atom 1"),
])
def test_engine_rejects_negative_or_non_symmetric_alpha(alpha, message):
    from polarmace.electrostatics import Electrostatics

    pos = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.5, 0.0]], dtype=torch.float64)
    engine = Electrostatics(sigma=1.0)
    args = dict(charges=torch.tensor([0.5, -0.25, -0.25], dtype=torch.float64),
                batch=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        engine(pos, torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool),
               alpha=alpha.to(torch.float64), **args)
    good = alpha.clamp(min=0) if alpha.dim() == 1 else torch.diag_embed(torch.full((3, 3), 0.1))
    engine(pos, torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool),
           alpha=good.to(torch.float64), **args)


def test_duplicate_yaml_keys_and_device_checks(tmp_path):
    from polarmace.config import ConfigError, load_config
    from polarmace.errors import DeviceError, resolve_device

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  r_max: 4.0\n  r_max: 5.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 3: duplicate key 'r_max' \(first given at line 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config({}, ["model.e0s={a: 1, a: 2}"])
    path.write_text("base: &b {r_max: 4.0}\nmodel:\n  <<: *b\n  num_bessel: 6\n")  # merge keys are no duplicates
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config(path)
    with pytest.raises(DeviceError, match="--device: 'gpu' is not a device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda:0' asked for"):
            resolve_device("cuda:0", "--device")
    assert resolve_device("cpu").type == "cpu"

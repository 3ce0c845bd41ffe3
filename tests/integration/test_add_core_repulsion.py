"""scripts/add_core_repulsion.py: a wall below the data's shortest distances leaves the model's
energies and forces on those data bit for bit; a cutoff above them, or a bad flag, exits with 2."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from repo_paths import ROOT, load_benchmark

MODEL = ROOT / "benchmarks" / "results" / "quickstart" / "quickstart.model"
DATA = ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"


@pytest.fixture()
def frames(tmp_path):
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, ase.io.read(DATA, ":4"))
    return path


def _shortest(path) -> float:
    return min(float(np.min(a.get_all_distances(mic=True)[np.triu_indices(len(a), 1)])) for a in ase.io.read(path, ":"))


def test_a_wall_below_the_data_changes_nothing_there_and_is_stored(tmp_path, frames, capsys):
    from polarmace.calculator import PolarMACECalculator
    from polarmace.model import PolarMACE

    script = load_benchmark("add_core_repulsion", folder="scripts")
    out = tmp_path / "walled.model"
    rc = round(_shortest(frames) - 0.05, 3)  # just below the closest pair of the data
    args = [str(MODEL), "-o", str(out), "--data", str(frames)]
    for pair in ("Na-Na", "Cl-Na", "Cl-Cl"):
        args += ["--cutoff", f"{pair}={rc}"]
    assert script.main(args) == 0
    assert "shortest in data" in capsys.readouterr().out
    walled = PolarMACE.load(str(out))
    assert walled.config["model"]["core_repulsion"] == {"Cl-Cl": rc, "Cl-Na": rc, "Na-Na": rc}
    for atoms in ase.io.read(frames, ":"):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = PolarMACECalculator(str(MODEL)), PolarMACECalculator(str(out))
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.get_forces(), b.get_forces())
    # and the wall is there: two ions pushed inside the cutoff feel it
    atoms = ase.io.read(frames, 0)
    atoms.positions[1] = atoms.positions[0] + [0.0, 0.0, 0.6 * rc]
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = PolarMACECalculator(str(MODEL)), PolarMACECalculator(str(out))
    assert b.get_potential_energy() - a.get_potential_energy() > 0.1


@pytest.mark.parametrize("flags, message", [(["--cutoff", "Cl-Na=4.0"], "not below its shortest distance"),
                                            (["--cutoff", "ClNa=1.0"], "expected A-B=Å"),
                                            (["--cutoff", "Cl-Na=abc"], "expected A-B=Å"),
                                            (["--cutoff", "O-H=0.8"], "the model's elements")])
def test_bad_cutoffs_exit_with_2_and_name_the_problem(tmp_path, frames, capsys, flags, message):
    script = load_benchmark("add_core_repulsion", folder="scripts")
    out = tmp_path / "walled.model"
    assert script.main([str(MODEL), "-o", str(out), "--data", str(frames), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

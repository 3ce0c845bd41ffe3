"""benchmarks/water_ir_trpmd.py: i-PI trajectory files, the two-stage TRPMD run with the
polarmace driver, and the resume of a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from repo_paths import DATASETS, ROOT, load_benchmark
from tiny_water import tiny_model_file, water_molecules

from polarmace.calculator import PolarMACECalculator

WALL = {"H-H": 1.2, "H-O": 0.85, "O-O": 2.2}  # Å: random weights alone let atoms meet
EXPERIMENTAL = DATASETS / "water_ir_experimental" / "water_IR_Segelstein_alpha_200-4500.csv"
ipi_needed = pytest.mark.skipif(shutil.which("i-pi") is None, reason="i-PI (pip install ipi) not installed")
data_needed = pytest.mark.skipif(not EXPERIMENTAL.exists(), reason="needs ../shared/datasets")


def _frame(step: int, values: np.ndarray) -> str:
    lines = [str(len(values)), f"# CELL(abcABC): 10 10 10 90 90 90 Step: {step:11d} Bead: 0 positions{{angstrom}}"]
    lines += [f"H {x:.5e} {y:.5e} {z:.5e}" for x, y, z in values]
    return "\n".join(lines) + "\n"


def test_a_restarted_frame_keeps_its_last_copy_and_a_truncated_frame_is_dropped(tmp_path):
    mod = load_benchmark("water_ir_trpmd")
    a, b = np.full((2, 3), 1.0), np.full((2, 3), 2.0)
    text = _frame(0, a) + _frame(6, a) + _frame(12, a) + _frame(6, b) + _frame(12, b)
    path = tmp_path / "sim.pos_0.xyz"
    path.write_text(text + _frame(18, b).rsplit("\n", 2)[0] + "\n")  # killed while writing step 18
    steps, values = mod.read_trajectory(path)
    assert steps.tolist() == [0, 6, 12]
    assert np.array_equal(values[0], a) and np.array_equal(values[1], b) and np.array_equal(values[2], b)


def test_cut_after_keeps_what_precedes_the_checkpoint(tmp_path):
    mod = load_benchmark("water_ir_trpmd")
    x = np.arange(6.0).reshape(2, 3)
    xyz = tmp_path / "sim.vel_1.xyz"
    xyz.write_text(_frame(0, x) + _frame(6, x) + _frame(12, x) + "2\n# CELL")
    mod.cut_after(xyz, 6)
    assert xyz.read_text() == _frame(0, x) + _frame(6, x)
    props = tmp_path / "sim.out"
    props.write_text("# column 1 --> step\n 0.0 1.0\n 6.0 2.0\n 1.2e+01 3.0\n 1.8e+01 4.0\n")
    mod.cut_after(props, 12)
    assert props.read_text() == "# column 1 --> step\n 0.0 1.0\n 6.0 2.0\n 1.2e+01 3.0\n"
    for k in range(16):  # i-PI pads the bead index to the digits of P − 1
        (tmp_path / f"sim.pos_{k:02d}.xyz").write_text("")
    assert mod.bead_file(tmp_path, "pos", 3).name == "sim.pos_03.xyz"
    with pytest.raises(mod.RunFailed, match="bead 16"):
        mod.bead_file(tmp_path, "pos", 16)
    ckpt = tmp_path / "sim.chk"
    ckpt.write_text("<simulation>\n  <step>300</step>\n</simulation>\n")
    assert mod.checkpoint_step(ckpt) == 300


def _box(tmp_path: Path) -> Path:
    atoms = water_molecules(8, 3.1, seed=3)
    atoms.cell = [6.2, 6.2, 6.2]
    atoms.pbc = True
    path = tmp_path / "box.extxyz"
    atoms.write(str(path), format="extxyz")
    return path


def _args(model: Path, box: Path, out: Path, **kw) -> list:
    opts = {"--beads": 2, "--equil-ps": 0.006, "--prod-ps": 0.05, "--sample-every": 1, "--block-ps": 0.04,
            "--clients": 1, "--workers": 1, **kw}
    args = ["--model", str(model), "--structure", str(box), "--out", str(out)]
    for key, value in opts.items():
        args += [key, str(value)]
    return args


@ipi_needed
@data_needed
def test_trpmd_series_is_the_bead_average_of_the_dipole_derivative(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    mod = load_benchmark("water_ir_trpmd")
    model = tiny_model_file(tmp_path / "tiny.model", WALL)
    out = tmp_path / "run"
    assert mod.main(_args(model, _box(tmp_path), out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["beads"] == 2 and res["frames"] == 100
    prod = out / "production"
    # the production starts from the equilibration's last state, momenta included
    eq_last = mod.properties(out / "equilibration")[-1]
    pr_first = mod.properties(prod)[0]
    assert eq_last[0] == 12 and pr_first[0] == 0
    np.testing.assert_allclose(pr_first[3:6], eq_last[3:6], rtol=1e-6)  # T, potential, kinetic_cv(H)
    # velocities read back in Å/fs agree with the centred difference of the written positions,
    # on the centroid (the beads' internal modes feel the strong PILE friction every step)
    xs = np.stack([mod.read_trajectory(prod / f"sim.pos_{k}.xyz")[1] for k in range(2)]).mean(axis=0)
    vs = np.stack([mod.read_trajectory(prod / f"sim.vel_{k}.xyz")[1] for k in range(2)]).mean(axis=0)
    vs = vs * mod.MS_TO_ANG_FS
    fd = (xs[2:] - xs[:-2]) / (2 * 0.5)
    assert np.abs(fd - vs[1:-1]).max() < 0.05 * np.abs(vs[1:-1]).max()
    # the stored series: (1/P) Σ_beads Σ_i Z*_i·v_i, with Z* from the calculator on each bead
    calc = PolarMACECalculator(str(model), compute_bec=True)
    with np.load(out / "series.npz") as blob:
        signal_, dt = blob["signal"], float(blob["dt_fs"])
    assert dt == 0.5 and signal_.shape == (100, 3)
    from ase.io import read

    atoms = read(str(out / "structure.extxyz"))
    expected = np.zeros(3)
    for k in range(2):
        _, xk = mod.read_trajectory(prod / f"sim.pos_{k}.xyz")
        _, vk = mod.read_trajectory(prod / f"sim.vel_{k}.xyz")
        frame = atoms.copy()
        frame.positions = xk[5]  # production step 5 = series row 4 (step 0 is not in the series)
        expected += np.einsum("nab,nb->a", calc.get_property("bec", frame), vk[5] * mod.MS_TO_ANG_FS) / 2
    np.testing.assert_allclose(signal_[4], expected, rtol=1e-6, atol=1e-10)
    # --dipole-on centroid on the same run: no new MD, Z* of the bead-averaged frame times v̄
    before = (prod / "sim.out").read_text()
    assert mod.main(_args(model, _box(tmp_path), out) + ["--resume", "--dipole-on", "centroid"]) == 0
    assert (prod / "sim.out").read_text() == before
    assert json.loads((out / "centroid_dipole" / "results.json").read_text())["md_wall_s"] == res["md_wall_s"] > 0
    frame = atoms.copy()
    frame.positions = xs[5]
    expected = np.einsum("nab,nb->a", calc.get_property("bec", frame), vs[5])
    with np.load(out / "centroid_dipole" / "series.npz") as blob:
        np.testing.assert_allclose(blob["signal"][4], expected, rtol=1e-6, atol=1e-10)
    # a second call without --resume refuses to overwrite the run
    assert mod.main(_args(model, _box(tmp_path), out)) == 2


@ipi_needed
@data_needed
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_trajectory(tmp_path):
    """SIGKILL during the production, then --resume: the trajectory after the checkpoint is
    recomputed, not duplicated, and equals the one of a run that was never stopped."""
    model = tiny_model_file(tmp_path / "tiny.model", WALL)
    box = _box(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = [sys.executable, str(ROOT / "benchmarks" / "water_ir_trpmd.py")]
    long = {"--prod-ps": 0.15, "--sample-every": 3}
    whole = tmp_path / "whole"
    subprocess.run(script + _args(model, box, whole, **long), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(script + _args(model, box, killed, **long), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chk = killed / "production" / "sim.chk"
    deadline = time.monotonic() + 240
    while not (chk.exists() and (killed / "production" / "sim.out").stat().st_size > 0
               and load_benchmark("water_ir_trpmd")._steps_done(killed / "production") > 120):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    subprocess.run(script + _args(model, box, killed, **long) + ["--resume"], env=env, check=True,
                   capture_output=True)
    mod = load_benchmark("water_ir_trpmd")
    for name in ("sim.pos_0.xyz", "sim.vel_1.xyz"):
        steps_w, x_w = mod.read_trajectory(whole / "production" / name)
        text = (killed / "production" / name).read_text()
        steps_k, x_k = mod.read_trajectory(killed / "production" / name)
        assert text.count("Step:") == len(steps_k)  # no frame written twice
        assert np.array_equal(steps_k, steps_w)
        np.testing.assert_array_equal(x_k, x_w)
    with np.load(whole / "series.npz") as a, np.load(killed / "series.npz") as b:
        np.testing.assert_array_equal(a["signal"], b["signal"])

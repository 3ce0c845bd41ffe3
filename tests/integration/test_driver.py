"""polarmace-driver (i-PI socket driver): a real i-PI NVT run driven by the driver, whose recorded
energies and forces must equal PolarMACECalculator's on the recorded positions (periodic box with
i-PI wrapping the coordinates, and an open cluster in a big box); a protocol-level exchange with a
stand-in server (ASE's server-side IPIProtocol) ending in EXIT; and the argument errors.

Units: i-PI is asked for atomic units (potential in hartree, positions/cell in bohr, forces in
hartree/bohr) and the test converts them with ASE's constants, the same ones the driver's socket
client uses, so that the comparison does not depend on i-PI's and ASE's different CODATA values
(they differ by ~1e-7 relative for the hartree).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from ase import Atoms, units

from polarmace.calculator import PolarMACECalculator
from polarmace.cli import driver
from repo_paths import ROOT
from tiny_water import tiny_model_file, water_molecules

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS = 12


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.model")


# ------------------------------------------------------------------------------ i-PI helpers
def ipi_input(address: str, wrap: bool, steps: int, n_atoms: int, prefix_attr: str = "") -> str:
    """i-PI NVT (SVR thermostat, 0.5 fs) input. The properties file holds, at full precision
    (floatformat), step, time, potential (Ha), temperature, cell_h (bohr) and every atom's
    position (bohr) and force (Ha/bohr); the xyz trajectory repeats positions at 6 digits."""
    per_atom = ", ".join([f"atom_x(atom={i})" for i in range(n_atoms)]
                         + [f"atom_f(atom={i})" for i in range(n_atoms)])
    return textwrap.dedent(f"""\
        <simulation verbosity="low" floatformat="%25.16e" {prefix_attr}>
          <output prefix="sim">
            <properties stride="1" filename="out"> [ step, time{{femtosecond}}, potential, temperature{{kelvin}}, cell_h, {per_atom} ] </properties>
            <trajectory filename="pos" stride="1" format="xyz" cell_units="angstrom"> positions{{angstrom}} </trajectory>
          </output>
          <total_steps> {steps} </total_steps>
          <prng><seed> 12345 </seed></prng>
          <ffsocket name="polarmace" mode="unix" pbc="{str(wrap).lower()}">
            <address> {address} </address>
            <latency> 1e-4 </latency>
          </ffsocket>
          <system>
            <initialize nbeads="1">
              <file mode="xyz" units="angstrom"> init.xyz </file>
              <velocities mode="thermal" units="kelvin"> 300 </velocities>
            </initialize>
            <forces> <force forcefield="polarmace"> </force> </forces>
            <motion mode="dynamics">
              <dynamics mode="nvt">
                <timestep units="femtosecond"> 0.5 </timestep>
                <thermostat mode="svr"> <tau units="femtosecond"> 10 </tau> </thermostat>
              </dynamics>
            </motion>
            <ensemble> <temperature units="kelvin"> 300 </temperature> </ensemble>
          </system>
        </simulation>
        """)


def read_ipi_xyz(path: Path) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Frames of an i-PI xyz trajectory: (abc box lengths [3], values [N,3]) in its units."""
    frames = []
    lines = path.read_text().splitlines()
    k = 0
    while k < len(lines):
        n = int(lines[k])
        comment = lines[k + 1].split()
        abc = np.array([float(x) for x in comment[2:5]])
        values = np.array([[float(x) for x in line.split()[1:4]] for line in lines[k + 2:k + 2 + n]])
        frames.append((abc, values))
        k += 2 + n
    return frames


def read_properties(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return np.array(rows, dtype=float)


def stop(proc: subprocess.Popen, log_file: Path) -> str:
    """Kill a subprocess if still alive; return its combined output (written to `log_file`)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    return log_file.read_text() if log_file.exists() else ""


def run_ipi_with_driver(workdir: Path, atoms: Atoms, box: np.ndarray, model: Path, wrap: bool,
                        path_socket: bool) -> Dict[str, object]:
    """Run i-PI and the driver (both subprocesses) to completion; parse i-PI's outputs."""
    name = f"pm{uuid.uuid4().hex[:10]}"
    if path_socket:  # i-PI binds sockets_prefix + address; the driver gets the full path
        sockdir = Path(tempfile.mkdtemp(prefix="pmsock"))
        prefix_attr = f'sockets_prefix="{sockdir}/"'
        address_arg = str(sockdir / name)
    else:
        sockdir = None
        prefix_attr = ""
        address_arg = f"unix:{name}"
    (workdir / "init.xyz").write_text(driver.ipi_xyz(atoms.get_chemical_symbols(), atoms.positions, box))
    (workdir / "input.xml").write_text(ipi_input(name, wrap, N_STEPS, len(atoms), prefix_attr))
    structure = workdir / "structure.extxyz"
    atoms.write(str(structure), format="extxyz")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ipi_file, drv_file = workdir / "ipi.log", workdir / "driver.log"
    with open(ipi_file, "w") as out:  # files, not pipes: a full pipe would block the process
        ipi = subprocess.Popen([shutil.which("i-pi"), "input.xml"], cwd=workdir, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    drv = None
    drv_rc = ipi_rc = None
    try:
        with open(drv_file, "w") as out:
            drv = subprocess.Popen([sys.executable, "-m", "polarmace.cli.driver", "--model", str(model),
                                    "--structure", str(structure), "--address", address_arg,
                                    "--connect-wait", "60", "--timeout", "120", "--log-interval", "5"],
                                   cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        # generous limits: a few s when the machine is idle, much more on a loaded one
        try:
            drv_rc = drv.wait(timeout=240)
            ipi_rc = ipi.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    finally:
        drv_log = stop(drv, drv_file) if drv is not None else ""
        ipi_log = stop(ipi, ipi_file)
        if sockdir is not None:
            shutil.rmtree(sockdir, ignore_errors=True)
    if drv_rc is None or ipi_rc is None:
        pytest.fail(f"timed out; driver log:\n{drv_log[-3000:]}\ni-PI log:\n{ipi_log[-3000:]}")
    assert ipi_rc == 0, ipi_log[-3000:]
    assert drv_rc == 0, drv_log[-3000:]
    return {"props": read_properties(workdir / "sim.out"),
            "xyz": read_ipi_xyz(workdir / "sim.pos_0.xyz"), "driver_log": drv_log}


def h_matrix(cell_h: np.ndarray) -> np.ndarray:
    """i-PI's cell matrix (lattice vectors as columns) from cell_h = [xx, yy, zz, xy, xz, yz]."""
    xx, yy, zz, xy, xz, yz = cell_h
    return np.array([[xx, xy, xz], [0.0, yy, yz], [0.0, 0.0, zz]])


def check_against_calculator(result: Dict[str, object], atoms: Atoms, model: Path) -> None:
    """i-PI's energies/forces on every recorded frame equal the calculator's on those positions."""
    props = result["props"]
    n = len(atoms)
    assert props.shape == (N_STEPS + 1, 10 + 6 * n)  # step 0 .. N_STEPS
    assert np.array_equal(props[:, 0], np.arange(N_STEPS + 1))
    energy = props[:, 2] * units.Ha
    cells = np.array([h_matrix(row) for row in props[:, 4:10]]).transpose(0, 2, 1) * units.Bohr
    np.testing.assert_allclose(cells[0], atoms.cell.array if atoms.pbc.any() else cells[0], atol=1e-6)
    positions = props[:, 10:10 + 3 * n].reshape(-1, n, 3) * units.Bohr
    forces = props[:, 10 + 3 * n:].reshape(-1, n, 3) * units.Ha / units.Bohr
    for (abc, x), x_full in zip(result["xyz"], positions):  # the 6-digit trajectory agrees
        np.testing.assert_allclose(x, x_full, rtol=1e-4, atol=1e-4)
    assert np.abs(positions - positions[0]).max() > 1e-3  # the dynamics really moved the atoms
    calc = PolarMACECalculator(str(model))
    for e, cell, x, f in zip(energy, cells, positions, forces):
        frame = Atoms(numbers=atoms.numbers, positions=x, pbc=atoms.pbc,
                      cell=cell if atoms.pbc.any() else None)
        frame.calc = calc
        assert e == pytest.approx(frame.get_potential_energy(), rel=1e-12, abs=1e-10)
        np.testing.assert_allclose(f, frame.get_forces(), rtol=1e-9, atol=1e-10)


ipi_needed = pytest.mark.skipif(shutil.which("i-pi") is None, reason="i-PI (pip install ipi) not installed")


# ------------------------------------------------------------------------------ i-PI tests
@ipi_needed
def test_ipi_nvt_periodic_box_wrapped_by_ipi(model_path, tmp_path):
    """Periodic 4-water box (4.6 Å cube); i-PI wraps coordinates (ffsocket pbc=true) and the
    model's energies on the unwrapped recorded positions must be the same."""
    pytest.importorskip("ipi")
    atoms = water_molecules(4, 2.3, seed=3)
    box = np.full(3, 4.6)
    atoms.set_cell(np.diag(box))
    atoms.pbc = True
    atoms.positions += np.array([3.0, -1.0, 0.5])  # partly outside the cell: wrapping matters
    result = run_ipi_with_driver(tmp_path, atoms, box, model_path, wrap=True, path_socket=False)
    check_against_calculator(result, atoms, model_path)
    log = result["driver_log"]
    assert "connected to i-PI" in log
    assert f"disconnected after {N_STEPS + 1} force evaluations" in log  # steps 0 .. N_STEPS
    assert "10 force evaluations" in log  # the progress line (--log-interval 5)


@ipi_needed
def test_ipi_nvt_open_cluster_in_big_box_via_socket_path(model_path, tmp_path):
    """Open 3-water cluster in a 30 Å box; the structure file has no cell, so the driver treats
    it as open. The socket is given as a full path (i-PI's sockets_prefix)."""
    pytest.importorskip("ipi")
    atoms = water_molecules(3, 2.6, seed=5)
    result = run_ipi_with_driver(tmp_path, atoms, np.full(3, 30.0), model_path, wrap=False,
                                 path_socket=True)
    check_against_calculator(result, atoms, model_path)
    assert "treated as open" in result["driver_log"]


# ------------------------------------------------------------------------------ protocol
def serve_fake_ipi(server: socket.socket, frames: List[np.ndarray], cell: np.ndarray,
                   results: List[dict], errors: List[BaseException]) -> None:
    """Accept one driver, ask it for each frame's forces (ASE's server-side protocol), EXIT."""
    from ase.calculators.socketio import IPIProtocol

    try:
        conn, _ = server.accept()
        conn.settimeout(30)
        proto = IPIProtocol(conn)
        for positions in frames:
            results.append(proto.calculate(positions, cell))
        proto.end()
        conn.close()
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def fake_server(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(30)
    return server


def test_protocol_exchange_and_exit_with_stand_in_server(model_path, tmp_path, caplog):
    atoms = water_molecules(2, 2.8, seed=1)
    atoms.set_cell(np.eye(3) * 5.6)
    atoms.pbc = True
    atoms.info["charge"] = 0.0
    structure = tmp_path / "s.extxyz"
    atoms.write(str(structure))
    rng = np.random.default_rng(0)
    frames = [atoms.positions + 0.05 * rng.standard_normal(atoms.positions.shape) for _ in range(3)]
    sockdir = Path(tempfile.mkdtemp(prefix="pmsock"))
    path = str(sockdir / "drv")
    server = fake_server(path)
    results: List[dict] = []
    errors: List[BaseException] = []
    thread = threading.Thread(target=serve_fake_ipi,
                              args=(server, frames, atoms.cell.array, results, errors), daemon=True)
    thread.start()
    try:
        with caplog.at_level("DEBUG", logger="polarmace.driver"):
            rc = driver.main(["--model", str(model_path), "--structure", str(structure),
                              "--address", f"unix:{path}", "--timeout", "30", "-v"])
        thread.join(timeout=30)
    finally:
        server.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not errors, errors
    assert rc == 0 and len(results) == 3
    assert "disconnected after 3 force evaluations" in caplog.text
    assert "evaluation 3: energy" in caplog.text  # -v logs every evaluation
    calc = PolarMACECalculator(str(model_path))
    for positions, res in zip(frames, results):
        ref = atoms.copy()
        ref.positions = positions
        ref.calc = calc
        assert res["energy"] == pytest.approx(ref.get_potential_energy(), rel=1e-13, abs=1e-12)
        np.testing.assert_allclose(res["forces"], ref.get_forces(), rtol=1e-12, atol=1e-12)
        virial = -ref.get_volume() * ref.get_stress(voigt=False)  # periodic: virial is sent
        np.testing.assert_allclose(res["virial"], virial, rtol=1e-10, atol=1e-12)


def test_atom_count_mismatch_is_reported(model_path, tmp_path, caplog):
    atoms = water_molecules(2, 2.8, seed=1)
    structure = tmp_path / "s.xyz"
    atoms.write(str(structure))
    sockdir = Path(tempfile.mkdtemp(prefix="pmsock"))
    server = fake_server(str(sockdir / "drv"))
    errors: List[BaseException] = []
    thread = threading.Thread(target=serve_fake_ipi, daemon=True,
                              args=(server, [atoms.positions[:4]], np.eye(3) * 10, [], errors))
    thread.start()
    try:
        with caplog.at_level("INFO", logger="polarmace.driver"):
            rc = driver.main(["--model", str(model_path), "--structure", str(structure),
                              "--address", str(sockdir / "drv")])
        thread.join(timeout=30)
    finally:
        server.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert rc == 1
    assert "i-PI sent 4 atoms but --structure has 6" in caplog.text


# ------------------------------------------------------------------------------ errors
def test_parse_address_forms():
    assert driver.parse_address("unix:water") == driver.Address("unix", path="/tmp/ipi_water")
    assert driver.parse_address("unix:/run/x/sock") == driver.Address("unix", path="/run/x/sock")
    assert driver.parse_address("./sock") == driver.Address("unix", path="./sock")
    assert driver.parse_address("localhost:31415") == driver.Address("inet", host="localhost", port=31415)
    assert driver.parse_address("inet:10.0.0.2:2000") == driver.Address("inet", host="10.0.0.2", port=2000)


@pytest.mark.parametrize("address, fragment", [("water", "neither a UNIX socket nor HOST:PORT"),
                                               ("localhost:abc", "is not an integer"),
                                               ("localhost:0", "outside 1-65535"),
                                               ("unix:", "missing socket name"),
                                               (":31415", "neither")])
def test_bad_address_names_the_argument(address, fragment):
    with pytest.raises(driver.DriverError, match="--address") as err:
        driver.parse_address(address)
    assert fragment in str(err.value)


def _error_of(argv: List[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        driver.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_clear_errors_name_the_argument(model_path, tmp_path, capsys):
    structure = tmp_path / "s.xyz"
    water_molecules(1, 3.0, seed=0).write(str(structure))
    base = ["--model", str(model_path), "--structure", str(structure)]
    err = _error_of(["--model", str(tmp_path / "missing.model"), "--structure", str(structure),
                     "--address", "unix:x"], capsys)
    assert "--model: no such file" in err and "missing.model" in err
    err = _error_of(["--model", str(model_path), "--structure", str(tmp_path / "none.xyz"),
                     "--address", "unix:x"], capsys)
    assert "--structure: no such file" in err
    err = _error_of(["--model", str(model_path), "--address", "unix:x"], capsys)
    assert "--structure" in err and "required" in err
    err = _error_of(base + ["--address", "host-without-port"], capsys)
    assert "--address 'host-without-port'" in err
    err = _error_of(base + ["--address", "unix:x", "--pbc", "TT"], capsys)
    assert "--pbc 'TT'" in err
    missing = f"unix:/tmp/pm-no-such-{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    err = _error_of(base + ["--address", missing, "--connect-wait", "0.3"], capsys)
    assert "--address: cannot connect" in err and "is i-PI running?" in err
    assert time.perf_counter() - t0 < 20


def test_entry_point_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'polarmace-driver = "polarmace.cli.driver:main"' in text

"""GFN2-xTB reference data for charged NaCl clusters (tblite).

The benchmark of the multipole method uses Na9Cl8 and Na8Cl8 clusters that both carry a total
charge of +1: in Na9Cl8+ the excess charge sits on an ionic lattice, in Na8Cl8+ (a neutral Na
atom removed) a hole is delocalised over the cluster, so the charge distribution depends on the
whole geometry. Here the same systems are labelled with GFN2-xTB, where the exact dipoles,
Born effective charges and polarizabilities are available, so the learned latent quantities can
be compared with a reference.

Sampling: independent Langevin MD chunks with the xTB calculator itself at several temperatures,
plus randomly distorted (displaced and scaled) copies of MD frames. A random 200-frame test
subset additionally gets, by a finite electric field (±h along x, y, z: six extra single points),
    BEC[i, a, b] = ∂F_ib/∂E_a = ∂μ_a/∂r_ib   (e)
    α[a, b]      = ∂μ_a/∂E_b                  (Å³, i.e. α/(4πε0); μ = α E / k_e)
Work is split into independent, seeded chunks written atomically (one extxyz file each, through
`polarmace.reference.chunk_writer`), so a killed run resumes at the first missing chunk and
several worker processes give the same data; a chunk folder of another plan is refused.

Stored labels (eV, Å, e): info `energy`, `dipole` (e·Å about the coordinate origin, Σ q r
convention, positions centred on their centroid), `total_charge` (1.0), `temperature`, `kind`
("md" | "distorted"), `cluster`; arrays `forces`, `xtb_charges` (Mulliken), and for the test
subset `BEC` (N×9, row-major [a, b]) and info `polarizability` (9 values, Å³).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, CalculationFailed, all_changes
from ase.io import read, write

from polarmace.units import BOHR, HARTREE

from .chunk_writer import check_plan, run_chunks, write_atomic

__all__ = ["NACL_SPACING", "cluster", "XTBCalculator", "field_response", "generate_nacl",
           "NaClPlan"]

log = logging.getLogger(__name__)

#: Nearest-neighbour Na–Cl distance of rock salt (Å) used to build the starting clusters.
NACL_SPACING = 2.82
#: Atomic-unit field in V/Å (Hartree / (e·bohr)).
FIELD_AU = HARTREE / BOHR


def cluster(name: str) -> Atoms:
    """Starting geometry of "Na9Cl8" or "Na8Cl8" (both total charge +1), centred, open.

    A 3×3×2 rock-salt block (9 Na, 9 Cl) without one corner Cl gives Na9Cl8+; removing also the
    Na at the diagonally opposite corner gives Na8Cl8+ (an odd-electron cation, doublet).
    """
    grid = [(i, j, k) for i in range(3) for j in range(3) for k in range(2)]
    symbols = ["Na" if (i + j + k) % 2 == 0 else "Cl" for i, j, k in grid]
    positions = np.array(grid, dtype=float) * NACL_SPACING
    keep = [g != (0, 0, 1) for g in grid]  # a corner Cl vacancy: Na9Cl8
    if name == "Na8Cl8":
        keep = [k and g != (2, 2, 0) for k, g in zip(keep, grid)]  # and the opposite corner Na
    elif name != "Na9Cl8":
        raise ValueError(f"unknown cluster {name!r}; expected 'Na9Cl8' or 'Na8Cl8'")
    atoms = Atoms([s for s, k in zip(symbols, keep) if k], positions[np.array(keep)], pbc=False)
    atoms.positions -= atoms.positions.mean(axis=0)
    atoms.info["total_charge"] = 1.0
    atoms.info["cluster"] = name
    return atoms


def _multiplicity(atoms: Atoms, charge: float) -> int:
    electrons = int(atoms.numbers.sum() - round(charge))
    return 1 + electrons % 2


class XTBCalculator(Calculator):
    """ASE calculator around tblite's GFN2-xTB with an optional uniform field (V/Å).

    Units from polarmace.units. Results: energy, forces, dipole (e·Å about the origin), charges.
    """

    implemented_properties = ["energy", "free_energy", "forces", "dipole", "charges"]

    def __init__(self, charge: float = 1.0, field: Optional[Sequence[float]] = None,
                 accuracy: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.charge = float(charge)
        self.field = None if field is None else np.asarray(field, dtype=np.float64)
        self.accuracy = accuracy
        self._restart = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from tblite.interface import Calculator as TB
        from tblite.library import ffi

        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if "numbers" in system_changes:
            self._restart = None
        xtb = TB("GFN2-xTB", a.numbers, a.positions / BOHR, charge=self.charge,
                 uhf=_multiplicity(a, self.charge) - 1)
        xtb.set("verbosity", 0)
        xtb.set("accuracy", self.accuracy)
        if self.field is not None:
            # tblite 0.8's Python wrapper passes the array straight to cffi, which wants a pointer.
            field_au = np.ascontiguousarray(self.field / FIELD_AU)
            xtb.add("electric-field", ffi.cast("double*", field_au.ctypes.data))
        try:
            res = xtb.singlepoint(self._restart, copy=True) if self._restart is not None \
                else xtb.singlepoint()
        except RuntimeError as err:  # tblite raises TBLiteRuntimeError(RuntimeError) on SCF failure
            raise CalculationFailed(f"GFN2-xTB failed: {err}") from err
        self._restart = res
        energy = float(res.get("energy")) * HARTREE
        self.results = {
            "energy": energy, "free_energy": energy,
            "forces": -np.asarray(res.get("gradient")) * HARTREE / BOHR,
            "dipole": np.asarray(res.get("dipole")) * BOHR,
            "charges": np.asarray(res.get("charges")).copy(),
        }


def field_response(atoms: Atoms, charge: float = 1.0, step: float = 0.02,
                   accuracy: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Born effective charges [N,3,3] (e) and polarizability [3,3] (Å³) by a finite field.

    Central differences with ±step V/Å along each axis (6 single points):
    BEC[i,a,b] = ∂F_ib/∂E_a,  α_ab = k_e ∂μ_a/∂E_b.
    """
    from polarmace.units import COULOMB

    n = len(atoms)
    bec = np.zeros((n, 3, 3))
    dmu = np.zeros((3, 3))
    for a in range(3):
        out = []
        for sign in (1.0, -1.0):
            field = np.zeros(3)
            field[a] = sign * step
            calc = XTBCalculator(charge=charge, field=field, accuracy=accuracy)
            calc.calculate(atoms.copy(), ["energy"])
            out.append(calc.results)
        bec[:, a, :] = (out[0]["forces"] - out[1]["forces"]) / (2 * step)
        dmu[:, a] = (out[0]["dipole"] - out[1]["dipole"]) / (2 * step)
    return bec, COULOMB * dmu


@dataclass
class NaClPlan:
    """How many frames of each kind; chunks are the unit of resumption."""

    clusters: Tuple[str, ...] = ("Na9Cl8", "Na8Cl8")
    temperatures: Tuple[float, ...] = (300.0, 450.0, 600.0, 800.0)
    md_chunks: int = 24
    frames_per_chunk: int = 100
    sample_every: int = 5
    equilibration_steps: int = 100
    dt_fs: float = 2.0
    friction_per_fs: float = 0.02
    distorted_chunks: int = 8
    distorted_per_chunk: int = 50
    test_size: int = 200
    seed: int = 0

    @property
    def total(self) -> int:
        return self.md_chunks * self.frames_per_chunk + self.distorted_chunks * self.distorted_per_chunk


def _label(atoms: Atoms, calc: XTBCalculator, **info) -> Atoms:
    """A centred copy of atoms with the calculator's labels attached."""
    out = Atoms(atoms.numbers, atoms.positions, pbc=False)
    centre = out.positions.mean(axis=0)
    out.positions -= centre
    r = calc.results
    out.info.update(info)
    out.info["energy"] = r["energy"]
    out.info["total_charge"] = calc.charge
    # μ about the new origin: μ' = μ − Q·c for a shift of the coordinates by −c.
    out.info["dipole"] = r["dipole"] - calc.charge * centre
    out.arrays["forces"] = r["forces"].copy()
    out.arrays["xtb_charges"] = r["charges"].copy()
    if not (np.isfinite(out.info["energy"]) and np.isfinite(out.arrays["forces"]).all()
            and np.isfinite(out.info["dipole"]).all()):
        raise CalculationFailed("non-finite xTB labels")
    return out


def _md_chunk(plan: NaClPlan, index: int, attempts: int = 3) -> List[Atoms]:
    """One Langevin trajectory; an SCF failure restarts it with the next seed (logged)."""
    for attempt in range(attempts):
        try:
            return _md_trajectory(plan, index, attempt)
        except CalculationFailed as err:
            log.warning("MD chunk %d attempt %d failed (%s); retrying", index, attempt, err)
    raise CalculationFailed(f"MD chunk {index} failed {attempts} times")


def _md_trajectory(plan: NaClPlan, index: int, attempt: int) -> List[Atoms]:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = np.random.default_rng([plan.seed, 1, index, attempt])
    name = plan.clusters[index % len(plan.clusters)]
    temperature = plan.temperatures[(index // len(plan.clusters)) % len(plan.temperatures)]
    atoms = cluster(name)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    calc = XTBCalculator(charge=1.0)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, plan.dt_fs * units.fs, temperature_K=temperature,
                   friction=plan.friction_per_fs / units.fs, rng=rng)
    dyn.run(plan.equilibration_steps)
    frames = []
    for _ in range(plan.frames_per_chunk):
        dyn.run(plan.sample_every)
        atoms.get_potential_energy()
        frames.append(_label(atoms, calc, kind="md", cluster=name, temperature=temperature))
    return frames


def _distorted_chunk(plan: NaClPlan, index: int, md_frames: Sequence[Atoms]) -> List[Atoms]:
    rng = np.random.default_rng([plan.seed, 2, index])
    frames = []
    while len(frames) < plan.distorted_per_chunk:
        base = md_frames[int(rng.integers(len(md_frames)))]
        atoms = Atoms(base.numbers, base.positions * rng.uniform(0.94, 1.08), pbc=False)
        atoms.positions += rng.normal(scale=rng.uniform(0.03, 0.15), size=atoms.positions.shape)
        if np.min(_pair_distances(atoms.positions)) < 1.6:
            continue  # unphysically close ions: resample rather than label garbage
        calc = XTBCalculator(charge=1.0)
        try:
            calc.calculate(atoms, ["energy"])
        except CalculationFailed as err:
            log.warning("distorted frame skipped: %s", err)
            continue
        frames.append(_label(atoms, calc, kind="distorted", cluster=base.info["cluster"],
                             temperature=float("nan")))
    return frames


def _pair_distances(positions: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return d[np.triu_indices(len(positions), 1)]


def _read_frames(path: Path) -> List[Atoms]:
    """Every frame of a chunk file (complete by construction: see `_write_chunk`), [] when absent."""
    if not path.exists():
        return []
    return [_labels_from_calc(atoms) for atoms in read(path, index=":", format="extxyz")]


def _labels_from_calc(atoms: Atoms) -> Atoms:
    """ASE's reader moves energy/forces/dipole into a calculator; put them back as labels."""
    if atoms.calc is not None:
        for key, value in atoms.calc.results.items():
            if key in ("forces", "charges", "energies"):
                atoms.arrays[key] = np.asarray(value)
            elif key != "free_energy":
                atoms.info[key] = value
        atoms.calc = None
    return atoms


def _write_chunk(path: Path, frames: Sequence[Atoms]) -> None:
    """Write frames atomically (`chunk_writer.write_atomic`): the file exists only once complete."""

    def write_frames(tmp: Path) -> None:
        tmp.touch()  # an empty set is an empty file
        for atoms in frames:
            write(tmp, atoms, format="extxyz", append=True)

    write_atomic(path, write_frames)


def _run_chunk(job: Tuple[str, NaClPlan, int, Path, Path, float]) -> int:
    """Worker entry: compute one chunk and write it; returns its number of frames."""
    kind, plan, index, path, chunk_dir, field_step = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if kind == "md":
        frames = _md_chunk(plan, index)
    elif kind == "distorted":
        bases = [f for c in range(plan.md_chunks) for f in _read_frames(chunk_dir / f"md_{c:03d}.extxyz")]
        frames = _distorted_chunk(plan, index, bases)
    else:
        pool = _pool(plan, chunk_dir)
        frames = [_with_field_response(pool[int(i)], int(i), field_step)
                  for i in _test_chunks(plan, len(pool))[index]]
    _write_chunk(path, frames)
    return len(frames)


def _with_field_response(atoms: Atoms, pool_index: int, field_step: float) -> Atoms:
    atoms = atoms.copy()
    bec, alpha = field_response(atoms, charge=atoms.info["total_charge"], step=field_step)
    atoms.arrays["BEC"] = bec.reshape(len(atoms), 9)
    atoms.info["polarizability"] = alpha.reshape(9)
    atoms.info["pool_index"] = pool_index
    return atoms


def _pool(plan: NaClPlan, chunk_dir: Path) -> List[Atoms]:
    names = [f"md_{c:03d}" for c in range(plan.md_chunks)] + \
        [f"distorted_{c:03d}" for c in range(plan.distorted_chunks)]
    return [f for name in names for f in _read_frames(chunk_dir / f"{name}.extxyz")]


def _run_stage(kind: str, plan: NaClPlan, count: int, sizes: Sequence[int], chunk_dir: Path,
               workers: int, progress: bool, field_step: float = 0.0) -> None:
    """Run every missing chunk of one stage, on `workers` processes, with a progress bar."""
    paths = [chunk_dir / f"{kind}_{c:03d}.extxyz" for c in range(count)]
    jobs = [(kind, plan, c, paths[c], chunk_dir, field_step) for c in range(count)]
    run_chunks(paths, sizes, jobs, _run_chunk, f"NaCl xTB {kind}", progress=progress, workers=workers)
    log.info("%s chunks done: %d frames", kind, sum(sizes))


def _test_chunks(plan: NaClPlan, n: int, size: int = 25) -> List[np.ndarray]:
    """The seeded test subset of pool indices, split into chunks of `size`."""
    rng = np.random.default_rng([plan.seed, 3])
    idx = np.sort(rng.choice(n, size=min(plan.test_size, n), replace=False))
    return [idx[k:k + size] for k in range(0, len(idx), size)]


def generate_nacl(out_dir: Path, plan: Optional[NaClPlan] = None, progress: bool = True,
                  field_step: float = 0.02, workers: int = 1) -> Dict[str, Path]:
    """Generate (or resume) the NaCl xTB set; returns the paths of the train and test files.

    out_dir/nacl_xtb_chunks/       one file per finished chunk (the unit of resumption), plan.txt
    out_dir/nacl_xtb_pool.extxyz   every sampled frame
    out_dir/nacl_xtb_test.extxyz   the test subset with BEC and polarizability
    out_dir/nacl_xtb_train.extxyz  the remaining frames
    Chunks are independent and seeded by their index, so `workers` processes give the same data.
    """
    plan = plan or NaClPlan()
    out_dir = Path(out_dir)
    chunk_dir = out_dir / "nacl_xtb_chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    check_plan(chunk_dir, repr((plan, float(field_step))))
    _run_stage("md", plan, plan.md_chunks, [plan.frames_per_chunk] * plan.md_chunks, chunk_dir,
               workers, progress)
    _run_stage("distorted", plan, plan.distorted_chunks,
               [plan.distorted_per_chunk] * plan.distorted_chunks, chunk_dir, workers, progress)
    pool = _pool(plan, chunk_dir)
    tests = _test_chunks(plan, len(pool))
    _run_stage("test", plan, len(tests), [len(t) for t in tests], chunk_dir, workers, progress,
               field_step)
    paths = {name: out_dir / f"nacl_xtb_{name}.extxyz" for name in ("pool", "test", "train")}
    test_set = set(int(i) for t in tests for i in t)
    _write_chunk(paths["pool"], pool)
    _write_chunk(paths["test"], [f for c in range(len(tests))
                                 for f in _read_frames(chunk_dir / f"test_{c:03d}.extxyz")])
    _write_chunk(paths["train"], [f for k, f in enumerate(pool) if k not in test_set])
    return paths

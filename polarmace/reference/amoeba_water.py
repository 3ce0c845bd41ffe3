"""AMOEBA (OpenMM, amoeba2018) reference data for liquid water and water clusters.

AMOEBA is a polarizable force field with permanent atomic charges, dipoles and quadrupoles and
induced atomic dipoles that are solved self-consistently ("mutual" polarization). Its total
dipole, Born effective charges and polarizability are exact functions of the geometry, so a model
trained on its energies and forces can be checked on electrical observables it never saw.

Two sets are produced, one extended-XYZ file each, written frame by frame (``append=True``):

* `generate_periodic`: cubic boxes of 64 flexible water molecules (PME, 3D periodic), sampled by
  Langevin MD at several temperatures.
* `generate_clusters`: isolated clusters of whole molecules (16–32 by default) cut from the same
  kind of periodic MD, labelled with open boundaries (no cutoff), with Born effective charges
  and (optionally) the cluster polarizability.

Stored labels (eV, Å, e):

* ``atoms.info``: ``energy`` (eV), ``dipole`` (3, e·Å), ``total_charge`` (0.0), ``temperature`` (K
  of the MD that produced the geometry), ``source`` ("amoeba2018"); clusters also ``n_molecules``,
  ``bec_asr`` (max_ab |Σ_i Z*_i,ab|, e: the acoustic-sum-rule residual of the stored BEC) and,
  when computed, ``polarizability`` (9 values, row-major α_ab = k_e ∂μ_a/∂E_b, Å³, i.e. α/(4πε0)).
* ``atoms.arrays``: ``forces`` (eV/Å); clusters also ``BEC`` (N×9, row-major [a, b]),
  BEC[i, a, b] = Z*_i,ab = ∂μ_a/∂r_ib (e).
* Periodic frames carry ``pbc=True`` and the cell; clusters ``pbc=False`` and no cell.

Conventions.

* Atom order: O, H, H per molecule. Positions are written with every molecule whole: in periodic
  frames each O lies inside the cell and its H atoms sit at the minimum image next to it.
* Dipole: μ = Σ_i q_i r_i + Σ_i p_i + Σ_i u_i with the written positions r_i, the AMOEBA atomic
  charges q_i, the lab-frame permanent atomic dipoles p_i and the converged induced dipoles u_i
  (OpenMM `getMultipoleParameters`, `getLabFramePermanentDipoles`, `getInducedDipoles`). For a
  periodic cell this is the cell dipole of the whole-molecule representation (defined modulo the
  polarization quantum, which the whole-molecule convention fixes). For clusters it equals
  OpenMM's `getSystemMultipoleMoments` (tested).
* Units: OpenMM works in nm, kJ/mol, e. 1 kJ/mol = 1000 J / (N_A·e) eV with the exact SI-2019
  values of N_A and e, i.e. 0.010364269656262175 eV (`KJ_PER_MOL_IN_EV`); 1 nm = 10 Å.
* Model details: amoeba2018 water (flexible, no constraints); periodic labels with PME, a 6 Å
  real-space and vdW cutoff (the 64-molecule box is 12.4 Å wide) and AMOEBA's vdW long-range
  dispersion correction; clusters with no cutoff. Induced dipoles are converged to
  `LABEL_EPSILON` (OpenMM's RMS induced-dipole change, Debye) for every label; the MD that
  *samples* geometries uses the looser OpenMM defaults (1e-5 and PME tolerance 1e-4), which only
  affects which geometries are visited, not the labels.

Born effective charges are central finite differences of the total dipole (6N dipole
evaluations). The polarizability needs an external field, which OpenMM's AMOEBA does not offer;
it is applied here by two distant point charges ±Q at ∓D ê from the cluster centroid (a field
E = 2 k_e Q / D² along ê, uniform over the cluster to O((R/D)²) ≈ 1e-6 for D = 1e4 Å; both
charges have no polarizability, no vdW and no damping). The same probe gives an independent BEC
route through the Maxwell relation Z*_i,ab = ∂F_ib/∂E_a, used in the tests.

Resuming. A killed run is resumed by calling the function again with the same arguments: the
complete frames already in the file are counted (a partly written last frame is cut off) and the
generation continues with the next frame. After every frame the OpenMM state of the sampling MD
(positions, velocities, thermostat random state) is saved next to the output
(``<out>.ckpt.npz``); when it matches the frame count the continuation is the same trajectory
as an uninterrupted run (on the same machine and platform). Without it the MD restarts from the
last written frame (periodic set) or from the starting box (clusters) with fresh velocities drawn
from a seed derived from (seed, frame index) and a short re-equilibration, so the continuation is
deterministic given the file but not identical to an uninterrupted run. The temperature of frame
k follows from `n_configs` (equal consecutive blocks), and the checkpoint is used only when all
arguments match, so resume with the same `n_configs`; `stop_after` writes a run in chunks.
Periodic cells must be in OpenMM's reduced form (a along x, b in the xy plane); the shipped and
built boxes are cubic.

Frames whose labels are not finite, or whose largest force exceeds `max_force`, are rejected
(not written, logged); the MD is then restarted from the last accepted state with fresh
velocities.

Cost on one core (measured on the 2-core development machine; AMOEBA runs on OpenMM's reference
code path, single-threaded, so more threads do not help): one MD step of the 192-atom box with
mutual polarization ≈ 30 ms (sampling settings), one periodic label ≈ 0.3 s (two full
evaluations, energy/forces and induced dipoles, plus a cheap one for the permanent dipoles), one cluster label
with FD-BEC ≈ 0.6 s (16 molecules), 3 s (24), 6 s (32), the polarizability ≈ 0.02–0.4 s. With the
defaults `generate_periodic` needs ≈ 1.6 s per frame on an idle core (≈ 55–60 min for 2,000
frames); on a loaded machine 2.4–5 s per frame was observed. Context creation is ≈ 1 s (empty
AMOEBA forces, whose custom expressions take ~10 s each to compile, are removed).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from polarmace.units import COULOMB

from .amoeba_constants import DEFAULT_TEMPERATURES, KJ_PER_MOL_IN_EV, LABEL_EPSILON, SOURCE
from .amoeba_constants import PathLike as _PathLike
from .amoeba_sampler import _MDSettings, _Sampler, _seed, built_water_box, cut_cluster, water_box, whole_molecules
from .amoeba_system import AmoebaWater, _openmm, born_effective_charges
from .chunk_writer import append_frame, complete_frames, load_checkpoint, progress_bar, read_frame, save_checkpoint

__all__ = ["generate_periodic", "generate_clusters", "AmoebaWater", "born_effective_charges",
           "cut_cluster", "water_box", "built_water_box", "KJ_PER_MOL_IN_EV", "LABEL_EPSILON", "SOURCE"]

log = logging.getLogger(__name__)


def _complete_frames(path: Path, n_atoms: Optional[int] = None) -> int:
    """Complete frames of an output file (whole water molecules; a torn last frame is cut off)."""
    return complete_frames(path, n_atoms, atoms_per_molecule=3)


def _read_frame(path: Path, index: int):
    return read_frame(path, index, SOURCE)


def _write_frame(path: Path, positions: np.ndarray, cell: Optional[np.ndarray], info: Dict, arrays: Dict) -> None:
    """Append one water frame (OH2 per molecule; open when `cell` is None) with its labels."""
    from ase import Atoms

    n_molecules = len(positions) // 3
    atoms = Atoms("OH2" * n_molecules, positions=positions, cell=cell if cell is not None else np.zeros((3, 3)),
                  pbc=cell is not None)
    atoms.info.update(info)
    for key, value in arrays.items():
        atoms.arrays[key] = np.asarray(value, dtype=np.float64)
    append_frame(path, atoms)


def _labels_ok(labels: Dict[str, np.ndarray], max_force: float) -> bool:
    """Finite labels and no force component above `max_force` (eV/Å)."""
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in labels.values())
    return finite and float(np.abs(labels["forces"]).max()) <= max_force


def _check_count(n_configs: int) -> int:
    if isinstance(n_configs, bool) or int(n_configs) != n_configs or n_configs < 1:
        raise ValueError(f"n_configs must be a positive integer, got {n_configs!r}")
    return int(n_configs)


class _Driver:
    """Shared frame loop of both generators: MD sampling, equilibration, rejection, resume."""

    def __init__(self, out_path: _PathLike, n_configs: int, settings: _MDSettings, seed: int,
                 n_molecules: int, start: Optional[_PathLike], kind: str, frame_atoms: Optional[int],
                 max_rejects: int) -> None:
        settings.validate()
        self.path = Path(out_path)
        self.n_configs = _check_count(n_configs)
        self.settings = settings
        self.seed = int(seed)
        self.kind = kind
        self.max_rejects = int(max_rejects)
        self.schedule = settings.schedule(self.n_configs)
        self.box, self.cell = water_box(n_molecules, seed=self.seed, start=start)
        self.signature = repr((kind, self.seed, n_molecules, tuple(float(t) for t in settings.temperatures),
                               int(settings.sample_every), float(settings.dt_fs), float(settings.friction_per_ps),
                               self.n_configs))
        self.done = _complete_frames(self.path, frame_atoms)
        self.sampler: Optional[_Sampler] = None
        self.first_extra_steps = 0

    def open(self, restart_positions: Optional[np.ndarray]) -> None:
        """Build the MD at frame `self.done`: checkpoint, else `restart_positions`, else the box."""
        s = self.settings
        k = self.done
        state = load_checkpoint(self.path, k, self.signature) if k > 0 else None
        positions = self.box if (state is not None or restart_positions is None) else restart_positions
        self.sampler = _Sampler(positions, self.cell, s, _seed(self.seed, k, 1))
        if state is not None:
            self.sampler.restore(state)
            self.sampler.set_temperature(float(self.schedule[k]))
            return
        if restart_positions is None:
            self.sampler.minimize(s.minimize_iterations)
            # A restart from the starting box (no checkpoint) repeats the initial equilibration.
            self.first_extra_steps = s.initial_equilibration_steps if k > 0 else 0
        else:
            self.first_extra_steps = s.resume_equilibration_steps
        self.sampler.thermalize(float(self.schedule[k]), _seed(self.seed, k, 2))

    def steps_before(self, k: int, retry: bool) -> int:
        """MD steps to run before frame k: sampling interval plus any equilibration."""
        s = self.settings
        steps = s.sample_every
        if k == 0:
            steps += s.initial_equilibration_steps
        if k == 0 or self.schedule[k] != self.schedule[k - 1]:
            steps += s.equilibration_steps
        if retry:
            steps += max(s.resume_equilibration_steps, self.first_extra_steps if k == self.done else 0)
        elif k == self.done:
            steps += self.first_extra_steps
        return steps

    def run(self, label_frame, stop_after: Optional[int], progress: bool, desc: str) -> Path:
        """Loop over frames; `label_frame(k, md_positions) -> (positions, cell, info, arrays) or
        None` (None rejects the frame)."""
        openmm, _, _ = _openmm()
        end = self.n_configs if stop_after is None else min(self.n_configs, self.done + int(stop_after))
        if self.done >= end:
            return self.path
        last_good = self.sampler.checkpoint()
        rejects, retry = 0, False
        bar = progress_bar(self.n_configs, self.done, desc, progress)
        try:
            k = self.done
            while k < end:
                temperature = float(self.schedule[k])
                self.sampler.set_temperature(temperature)
                frame = None
                try:
                    self.sampler.step(self.steps_before(k, retry))
                    frame = label_frame(k, self.sampler.positions())
                except openmm.OpenMMException as err:
                    log.warning("frame %d: OpenMM failed (%s)", k, err)
                if frame is None:
                    rejects += 1
                    log.warning("frame %d rejected (%d so far); restarting the MD from the last accepted frame", k, rejects)
                    if rejects > self.max_rejects:
                        raise RuntimeError(f"{self.path}: more than {self.max_rejects} rejected frames; stopping")
                    self.sampler.restore(last_good)
                    self.sampler.thermalize(temperature, _seed(self.seed, k, 3, rejects))
                    retry = True
                    continue
                positions, cell, info, arrays = frame
                info.update(total_charge=0.0, temperature=temperature, source=SOURCE)
                _write_frame(self.path, positions, cell, info, arrays)
                last_good = self.sampler.checkpoint()
                save_checkpoint(self.path, k + 1, last_good, self.signature)
                retry = False
                k += 1
                bar.update(1)
                bar.set_postfix(T=temperature, rejected=rejects)
        finally:
            bar.close()
        return self.path


def _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                 initial_equilibration_steps, resume_equilibration_steps, minimize_iterations, cutoff,
                 threads) -> _MDSettings:
    return _MDSettings(temperatures=tuple(float(t) for t in temperatures), sample_every=int(sample_every),
                       dt_fs=float(dt_fs), friction_per_ps=float(friction_per_ps),
                       equilibration_steps=int(equilibration_steps),
                       initial_equilibration_steps=int(initial_equilibration_steps),
                       resume_equilibration_steps=int(resume_equilibration_steps),
                       minimize_iterations=int(minimize_iterations), cutoff=float(cutoff), threads=int(threads))


# --------------------------------------------------------------------------------------------
# Public generators
# --------------------------------------------------------------------------------------------
def generate_periodic(out_path: _PathLike, n_configs: int = 2000, n_molecules: int = 64,
                      temperatures: Sequence[float] = DEFAULT_TEMPERATURES, sample_every: int = 40,
                      dt_fs: float = 0.5, seed: int = 0, progress: bool = True, *,
                      friction_per_ps: float = 1.0, equilibration_steps: int = 1000,
                      initial_equilibration_steps: int = 2000, resume_equilibration_steps: int = 200,
                      minimize_iterations: int = 200, cutoff: float = 6.0, epsilon: float = LABEL_EPSILON,
                      ewald_tolerance: float = 1e-5, start: Optional[_PathLike] = None,
                      max_force: float = 50.0, max_rejects: int = 20, stop_after: Optional[int] = None,
                      threads: int = 1) -> Path:
    """Periodic boxes of flexible AMOEBA water, labelled with energy, forces and cell dipole.

    Langevin MD (time step `dt_fs` fs, friction `friction_per_ps` 1/ps) runs through
    `temperatures` (K) in equal consecutive blocks of frames; a frame is stored every
    `sample_every` steps. The run starts from `start` (an extxyz box of `n_molecules`
    molecules; default: a built 1 g/cm³ box), minimised for `minimize_iterations`, equilibrated
    `initial_equilibration_steps` steps, plus `equilibration_steps` at the start of every
    temperature block. Labels use PME with `cutoff` (Å) and `ewald_tolerance`, and induced dipoles
    converged to `epsilon` (Debye); see the module docstring for the stored keys and units.

    Calling again with the same arguments resumes a killed run (see the module docstring);
    `stop_after` writes at most that many new frames in this call. Frames with non-finite labels
    or a force above `max_force` (eV/Å) are rejected and the MD restarts from the last accepted
    frame (at most `max_rejects` times per call).

    Cost (one core, idle machine): ≈ 0.03 s per MD step + 0.3 s per label, i.e. ≈ 1.6 s per frame
    with the defaults, ≈ 55–60 min for 2,000 frames (longer on a loaded machine).

    Returns:
        the output path.
    """
    settings = _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                            initial_equilibration_steps, resume_equilibration_steps, minimize_iterations,
                            cutoff, threads)
    driver = _Driver(out_path, n_configs, settings, seed, int(n_molecules), start, "periodic",
                     3 * int(n_molecules), max_rejects)
    end = driver.n_configs if stop_after is None else min(driver.n_configs, driver.done + int(stop_after))
    if driver.done >= end:
        return driver.path
    restart = None
    if driver.done > 0:
        last = _read_frame(driver.path, -1)
        if not np.allclose(last.cell.array, driver.cell, atol=1e-6):
            raise ValueError(f"{driver.path}: the stored cell differs from the starting box")
        restart = last.positions
    driver.open(restart)
    engine = AmoebaWater(int(n_molecules), driver.cell, cutoff=cutoff, epsilon=epsilon,
                         ewald_tolerance=ewald_tolerance, threads=threads)

    def label_frame(k: int, md_positions: np.ndarray):
        positions = whole_molecules(md_positions, driver.cell)
        labels = engine.labels(positions)
        if not _labels_ok(labels, max_force):
            return None
        info = {"energy": labels["energy"], "dipole": labels["dipole"]}
        return positions, driver.cell, info, {"forces": labels["forces"]}

    return driver.run(label_frame, stop_after, progress, "AMOEBA water (periodic)")


def generate_clusters(out_path: _PathLike, n_configs: int = 200,
                      n_molecules: Union[int, Tuple[int, int]] = (16, 32), seed: int = 0,
                      fd_step: float = 1e-3, *, polarizability: bool = True, field: float = 0.05,
                      field_distance: float = 1.0e4, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                      sample_every: int = 100, dt_fs: float = 0.5, friction_per_ps: float = 1.0,
                      equilibration_steps: int = 1000, initial_equilibration_steps: int = 2000,
                      resume_equilibration_steps: int = 200, minimize_iterations: int = 200,
                      box_molecules: int = 64, cutoff: float = 6.0, epsilon: float = LABEL_EPSILON,
                      start: Optional[_PathLike] = None, max_force: float = 50.0, max_rejects: int = 20,
                      stop_after: Optional[int] = None, progress: bool = True, threads: int = 1) -> Path:
    """Isolated water clusters with energy, forces, dipole, BEC and polarizability.

    Geometries: Langevin MD of a periodic box of `box_molecules` molecules (same schedule and
    options as `generate_periodic`, one cluster every `sample_every` steps); each cluster takes a
    random molecule and its nearest neighbours (O–O minimum-image distance) up to a random size
    drawn uniformly from `n_molecules` = (min, max) inclusive (or a fixed int), whole molecules,
    centred on their centroid. Labels are evaluated with open boundaries (no cutoff), induced
    dipoles converged to `epsilon` (Debye):

    * BEC[i, a, b] = ∂μ_a/∂r_ib (e) by central differences of the total dipole, step `fd_step` Å
      (6N dipole evaluations); the acoustic-sum-rule residual max|Σ_i Z*_i| is stored as `bec_asr`.
    * with `polarizability`, α_ab = k_e ∂μ_a/∂E_b (Å³) at clamped nuclei by ±`field` (V/Å) applied
      through two probe charges at `field_distance` Å (6 extra evaluations).

    Cost (one core, idle machine): ≈ 0.03 s per MD step plus ≈ 1–3 s per 16–32-molecule cluster
    for the BEC, i.e. ≈ 5 s per cluster with the defaults.

    Returns:
        the output path.
    """
    lo, hi = (int(n_molecules), int(n_molecules)) if np.ndim(n_molecules) == 0 else tuple(int(v) for v in n_molecules)
    if not 1 <= lo <= hi <= box_molecules:
        raise ValueError(f"n_molecules must be 1 <= min <= max <= box_molecules={box_molecules}, got {n_molecules}")
    if not (math.isfinite(fd_step) and fd_step > 0):
        raise ValueError(f"fd_step must be positive (Å), got {fd_step}")
    settings = _md_settings(temperatures, sample_every, dt_fs, friction_per_ps, equilibration_steps,
                            initial_equilibration_steps, resume_equilibration_steps, minimize_iterations,
                            cutoff, threads)
    driver = _Driver(out_path, n_configs, settings, seed, int(box_molecules), start, "clusters", None, max_rejects)
    driver.signature = repr((driver.signature, lo, hi, float(fd_step), bool(polarizability)))
    end = driver.n_configs if stop_after is None else min(driver.n_configs, driver.done + int(stop_after))
    if driver.done >= end:
        return driver.path
    driver.open(None)
    engines: Dict[int, AmoebaWater] = {}
    probes: Dict[int, AmoebaWater] = {}

    def label_frame(k: int, md_positions: np.ndarray):
        rng = np.random.default_rng([driver.seed, k, 7])
        size = int(rng.integers(lo, hi + 1))
        centre = int(rng.integers(box_molecules))
        positions = cut_cluster(md_positions, driver.cell, centre, size)
        if size not in engines:
            engines[size] = AmoebaWater(size, None, epsilon=epsilon, threads=threads)
        labels = engines[size].labels(positions)
        labels["BEC"] = born_effective_charges(engines[size], positions, fd_step)
        if polarizability:
            if size not in probes:
                probes[size] = AmoebaWater(size, None, epsilon=epsilon, threads=threads,
                                           field_probe=(field, field_distance))
            labels["polarizability"] = probes[size].field_response(positions)[0] * COULOMB
        if not _labels_ok(labels, max_force):
            return None
        asr = float(np.abs(labels["BEC"].sum(axis=0)).max())
        if asr > 1e-3:
            log.warning("frame %d: BEC acoustic-sum-rule residual %.2e e", k, asr)
        info = {"energy": labels["energy"], "dipole": labels["dipole"], "n_molecules": size, "bec_asr": asr}
        if polarizability:
            info["polarizability"] = labels["polarizability"].reshape(9)
        arrays = {"forces": labels["forces"], "BEC": labels["BEC"].reshape(-1, 9)}
        return positions, None, info, arrays

    return driver.run(label_frame, stop_after, progress, "AMOEBA water (clusters)")

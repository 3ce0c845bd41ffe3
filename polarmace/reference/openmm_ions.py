"""Exactly known truth for the learned electrostatics: periodic NaCl rigid-ion and Drude melts.

Two classical models whose charges, Born effective charges and polarizabilities are known
exactly, evaluated with OpenMM (an independent code):

* **Rigid ions**: point charges ±1 e (`NonbondedForce`, Ewald with ewaldErrorTolerance 1e-10)
  plus the Born–Mayer–Huggins short-range potential with the Tosi–Fumi (1964) NaCl parameters
  (`CustomNonbondedForce`),
      U_ij(r) = A_ij exp(−r/ρ) − C_ij/r⁶ − D_ij/r⁸,   A_ij = c_ij b exp((σ_i + σ_j)/ρ),
  switched smoothly to zero between `IonModel.switch` (4.5 Å) and `IonModel.cutoff` (5.5 Å,
  also the real-space Coulomb cutoff; OpenMM's switch 1 − 10x³ + 15x⁴ − 6x⁵ keeps energy and
  forces consistent). No long-range dispersion correction. Truth: q = ±1 e, BEC = q·I, α = 0.
* **Drude ions**: the same plus a Drude particle of charge q_D on each polarizable ion (the core
  carries q − q_D), bound by a spring k_D (`DrudeForce`): α = k_e q_D²/k_D (Å³); `DRUDE` has
  α(Cl) = 3 Å³ and α(Na) = 0.3 Å³. Each core–Drude pair is excluded from Coulomb; BMH acts
  between cores only; no Thole or other damping. Labels are Born–Oppenheimer: the Drude
  positions are relaxed (cores fixed) until every Drude force is below 1e-9 eV/Å.

Ewald rather than PME: for 64-ion cells it is exact to the tolerance and ~10× cheaper than PME
at 1e-6 (7 ms vs 50 ms per evaluation). OpenMM's Ewald ignores off-diagonal box vectors, so the
shear components of the stress are taken from a PME copy (`IonEngine.shear_context`).

Sampling: Langevin MD of the rigid-ion model (OpenMM CPU platform, one thread; also for the
Drude set, see `IonSampler`) of cubic cells of 8·n³ ions at several temperatures and densities:
"crystal" conditions start from rock salt near its thermal lattice constant, "melt" conditions
are molten at `premelt_temperature` first and use the experimental liquid density. Labels are
computed separately on OpenMM's double-precision Reference platform at the sampled geometry
(ions wrapped into the cell, positions rounded to the 1e-6 Å written to file, so the labels
belong exactly to the written positions).

Stored labels (eV, Å, e), one extended-XYZ frame per structure (Drude particles are not atoms):
* info: ``energy``, ``stress`` (3×3, eV/Å³, ASE sign σ = (1/V) ∂E/∂ε, configurational part only,
  by central finite differences of the energy under strain), ``total_charge`` (0), ``temperature``
  (K of the sampling MD), ``phase`` ("melt" | "crystal"), ``density_scale`` (box length relative
  to the reference density), ``model`` ("rigid" | "drude"), ``chunk``, ``has_bec`` (whether BEC
  was computed, Drude), ``polarizability`` (Drude frames with BEC: 9 values, cell α_ab =
  k_e ∂μ_a/∂E_b, Å³), ``drude_residual`` (max |F| on the relaxed Drude particles, eV/Å).
* arrays: ``forces`` (eV/Å; at relaxed Drudes: core + Drude force, the total derivative),
  ``true_charges`` (core + Drude charge, e), ``true_polarizability`` (α_i, Å³), ``BEC`` (N×9,
  row-major BEC[i, a, b] = ∂μ_a/∂r_ib, e; rigid ions q_i·I exactly; Drude ions by finite field,
  Z*_i,ab = ∂F_ib/∂E_a, only on a seeded subset of frames, marked ``has_bec``),
  ``induced_dipoles`` (Drude: q_D·d_i, e·Å).

Units: OpenMM works in nm, kJ/mol, e; conversion only at the OpenMM boundary
(`KJ_PER_MOL_IN_EV`, `ANGSTROM_PER_NM`). OpenMM 8's Coulomb constant (138.93545764438198
kJ·nm/mol/e²) equals `polarmace.units.COULOMB` to 1e-16 after conversion.

Work is split into independent, seeded chunks (one trajectory at one condition each) written
atomically (`polarmace.reference.chunk_writer`), so a killed run resumes at the first missing
chunk and several worker processes give the same data as one (OpenMM's CPU platform with one
thread is deterministic).

Modules: `ions_system` (constants, `IonModel`, the OpenMM systems), `ions_labels` (`IonEngine`
and every label of a frame), `ions_sampler` (starting cells and the sampling MD) and this one,
the generator (`MeltPlan`, chunks, extended-XYZ files, `generate_melt`). The public names of
all four are importable from here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .chunk_writer import check_plan, run_chunks, write_text
from .ions_labels import IonEngine, bec_displacement, bec_field, label_frame, stress_fd
from .ions_sampler import IonSampler, _seed, box_length, rock_salt, wrap
from .ions_system import CHARGE, DRUDE, MASS, RIGID, TF_RHO, IonModel, bmh_parameters, build_system

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms

__all__ = ["IonModel", "RIGID", "DRUDE", "MeltPlan", "IonEngine", "IonSampler", "build_system",
           "rock_salt", "box_length", "wrap", "stress_fd", "bec_field", "bec_displacement", "label_frame",
           "generate_melt", "read_frames", "write_frames", "CHARGE", "MASS", "TF_RHO", "bmh_parameters"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Plan, chunks, files
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One sampling condition: temperature (K), phase ("melt" | "crystal") and box-length scale."""

    temperature: float
    phase: str
    scale: float


@dataclass(frozen=True)
class MeltPlan:
    """What to generate. Chunks (one trajectory each, `chunks_per_condition` per condition) are
    the unit of resumption; `frames` are split over them as evenly as possible."""

    model: IonModel = RIGID
    n_cells: int = 2                                    # 8·n³ ions: 2 → 64, 3 → 216
    melt_temperatures: Tuple[float, ...] = (1100.0, 1300.0, 1500.0)
    crystal_temperatures: Tuple[float, ...] = (800.0, 1000.0)
    scales: Tuple[float, ...] = (0.96, 1.0, 1.04)       # box length relative to the reference
    chunks_per_condition: int = 2
    frames: int = 1500
    sample_every: int = 250                             # MD steps between frames (0.5 ps)
    equilibration_steps: int = 2500
    premelt_steps: int = 2500
    premelt_temperature: float = 2500.0
    dt_fs: float = 2.0
    friction_per_ps: float = 2.0
    stress: bool = True
    bec_frames: int = 0                                 # Drude: seeded subset with field BEC
    field_step: float = 0.01                            # V/Å
    max_rejects: int = 20                               # per chunk (frames without a Drude minimum)
    seed: int = 0

    def conditions(self) -> List[Condition]:
        """The crystal conditions, then the melt ones, each temperature at every scale."""
        out = [Condition(t, "crystal", s) for t in self.crystal_temperatures for s in self.scales]
        return out + [Condition(t, "melt", s) for t in self.melt_temperatures for s in self.scales]

    def chunks(self) -> List[Tuple[Condition, int]]:
        """(condition, replica) of every chunk, in file order."""
        return [(c, r) for r in range(self.chunks_per_condition) for c in self.conditions()]

    def sizes(self) -> List[int]:
        """Frames per chunk, in file order (sum: `frames`)."""
        return [len(a) for a in np.array_split(np.arange(self.frames), len(self.chunks()))]

    def bec_subset(self) -> np.ndarray:
        """Sorted global frame indices that carry the (finite-field) BEC."""
        rng = np.random.default_rng([self.seed, 3])
        k = min(self.bec_frames, self.frames)
        return np.sort(rng.choice(self.frames, size=k, replace=False)) if k else np.zeros(0, int)


def _start(plan: MeltPlan, cond: Condition, rng: np.random.Generator):
    n_ions = 8 * plan.n_cells ** 3
    length = box_length(n_ions, cond.temperature, cond.phase) * cond.scale
    symbols, pos, cell = rock_salt(plan.n_cells, length / plan.n_cells)
    pos = pos + rng.normal(scale=0.02, size=pos.shape)
    return symbols, pos, cell


def _chunk_frames(plan: MeltPlan, index: int, threads: int = 1) -> List[Dict]:
    """Sample and label one chunk: a seeded trajectory at one condition."""
    cond, replica = plan.chunks()[index]
    size = plan.sizes()[index]
    first = int(np.sum(plan.sizes()[:index]))
    bec = set(plan.bec_subset().tolist())
    rng = np.random.default_rng([plan.seed, 1, index])
    symbols, pos, cell = _start(plan, cond, rng)
    hot = cond.phase == "melt"
    md = IonSampler(symbols, pos, cell, plan.premelt_temperature if hot else cond.temperature,
                    _seed(plan.seed, index, 2), plan.dt_fs, plan.friction_per_ps)
    if hot:
        md.step(plan.premelt_steps)
        md.set_temperature(cond.temperature)
    md.step(plan.equilibration_steps)
    engine = IonEngine(symbols, cell, plan.model, field=plan.model.polarizabilities != ())
    frames, rejected = [], 0
    while len(frames) < size:
        md.step(plan.sample_every)
        positions = np.round(wrap(md.positions(), cell), 6)
        k = len(frames)
        try:
            labels = label_frame(engine, positions, with_stress=plan.stress, with_bec=(first + k) in bec,
                                 field_step=plan.field_step)
        except RuntimeError as err:  # no Drude minimum at this geometry: sample the next one
            rejected += 1
            log.warning("chunk %d frame %d rejected (%s)", index, k, err)
            if rejected > plan.max_rejects:
                raise
            continue
        labels["info"].update(temperature=cond.temperature, phase=cond.phase, density_scale=cond.scale,
                              model=plan.model.name, chunk=index, replica=replica)
        frames.append({"symbols": symbols, "positions": positions, "cell": cell, **labels})
    return frames


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, str):
        return value
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return f"{float(arr):.12g}"
    return '"' + " ".join(f"{v:.12g}" for v in arr.reshape(-1)) + '"'


def _frame_text(frame: Dict) -> str:
    """One extended-XYZ frame, compact: positions %.6f, other floats %.10g (exact 0/±1 stay short)."""
    arrays = frame["arrays"]
    n = len(frame["symbols"])
    # + 0.0 turns −0.0 (e.g. −1·0 in q·I) into 0.0
    cols = [(name, np.asarray(a, dtype=np.float64).reshape(n, -1) + 0.0) for name, a in arrays.items()]
    props = "species:S:1:pos:R:3" + "".join(f":{name}:R:{a.shape[1]}" for name, a in cols)
    info = {"Lattice": _fmt(np.asarray(frame["cell"]).reshape(-1)), "Properties": props}
    info.update({k: _fmt(v) for k, v in frame["info"].items()})
    info["pbc"] = '"T T T"'
    lines = [str(n), " ".join(f"{k}={v}" for k, v in info.items())]
    for i, s in enumerate(frame["symbols"]):
        words = [s] + [f"{x:.6f}" for x in frame["positions"][i]]
        for _, a in cols:
            words += [f"{x:.10g}" for x in a[i]]
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def write_frames(path: Path, frames: Sequence[Dict]) -> None:
    """Write frames atomically (`chunk_writer.write_text`): the file exists only once it is complete."""
    write_text(Path(path), (_frame_text(frame) for frame in frames))


def read_frames(path: Path) -> List[Atoms]:
    """The frames of a file as ASE Atoms, labels back in info/arrays (not in a calculator)."""
    from ase.io import read

    out = []
    for atoms in read(str(path), index=":", format="extxyz"):
        if atoms.calc is not None:
            for key, value in atoms.calc.results.items():
                if key == "forces":
                    atoms.arrays[key] = np.asarray(value)
                elif key == "stress":
                    atoms.info[key] = _voigt_to_3x3(np.asarray(value))
                elif key != "free_energy":
                    atoms.info[key] = value
            atoms.calc = None
        out.append(atoms)
    return out


def _voigt_to_3x3(s: np.ndarray) -> np.ndarray:
    if s.size == 9:
        return s.reshape(3, 3)
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _run_chunk(job: Tuple[MeltPlan, int, Path]) -> int:
    plan, index, path = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    frames = _chunk_frames(plan, index)
    write_frames(path, frames)
    return len(frames)


def generate_melt(out_path: Path, plan: Optional[MeltPlan] = None, progress: bool = True,
                  workers: int = 1, stop_after: Optional[int] = None,
                  chunk_dir: Optional[Path] = None) -> Path:
    """Generate (or resume) one set: chunks in `chunk_dir` (default `<out>.chunks/`), then the
    concatenated `out_path`.

    `stop_after` computes at most that many missing chunks in this call (then returns without
    writing `out_path`): an interrupted run, for tests. Returns `out_path`.
    """
    plan = plan or MeltPlan()
    out_path = Path(out_path)
    chunk_dir = Path(chunk_dir) if chunk_dir is not None else out_path.with_name(out_path.name + ".chunks")
    chunk_dir.mkdir(parents=True, exist_ok=True)
    sizes = plan.sizes()
    paths = [chunk_dir / f"chunk_{c:03d}.extxyz" for c in range(len(sizes))]
    check_plan(chunk_dir, repr(plan))
    jobs = [(plan, c, paths[c]) for c in range(len(sizes))]
    if not run_chunks(paths, sizes, jobs, _run_chunk, f"NaCl {plan.model.name} melt", progress=progress,
                      workers=workers, stop_after=stop_after):
        return out_path
    frames = [f for s, p in zip(sizes, paths) if s > 0 for f in _split_frames(p.read_text())]
    write_text(out_path, frames)
    if plan.bec_frames:
        # the BEC subset as a test set, the rest as a training set
        stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
        test = [" has_bec=T " in f.split("\n", 2)[1] for f in frames]
        write_text(out_path.with_name(f"{stem}_test{out_path.suffix}"), [f for f, t in zip(frames, test) if t])
        write_text(out_path.with_name(f"{stem}_train{out_path.suffix}"), [f for f, t in zip(frames, test) if not t])
    log.info("%s: %d frames", out_path, plan.frames)
    return out_path


def _split_frames(text: str) -> List[str]:
    """The frames of an extended-XYZ text (each n + 2 lines)."""
    lines = text.splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        out.append("".join(lines[i:i + n + 2]))
        i += n + 2
    return out

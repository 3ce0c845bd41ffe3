"""Labelled structures and the readers of extended XYZ (through ASE) and n2p2 ``input.data``.

Internal units: Å, eV, e (stress eV/Å³ with ASE's sign convention, virials eV, dipole e·Å,
Born effective charges e). n2p2 files are in Bohr and Hartree by default and are converted on
reading. Every reader validates what it returns and raises `DataError` naming the file, the
frame and the problem.

Where labels are looked up (ASE moves some of them into a SinglePointCalculator on reading):
per-structure labels in ``atoms.info[key]`` then ``atoms.calc.results[key]``; per-atom labels in
``atoms.arrays[key]`` then ``atoms.calc.results[key]``. Key names come from `KeySpec`
(``config.data.keys``). ``initial_charges`` and per-atom charge columns are ignored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import LABEL_NAMES, KeysConfig
from ..errors import DataError
from ..units import BOHR, HARTREE

__all__ = [
    "DataError",
    "Configuration",
    "TOTAL_CHARGE_KEYS",
    "total_charge_of",
    "find_total_charge",
    "set_total_charge",
    "check_cell",
    "KeySpec",
    "LABEL_NAMES",
    "MIN_DISTANCE",
    "PER_ATOM_LABELS",
    "LABEL_SHAPES",
    "stack_label",
    "read_configurations",
    "configuration_from_atoms",
    "validate_configuration",
    "detect_format",
]

#: Atoms closer than this (Å), also across periodic images, are an error.
MIN_DISTANCE = 0.1
#: Atoms closer than this (Å) give a warning: no bond is this short, so the structure (or its
#: periodic images, when the cell is too small for it) overlaps and the energy is meaningless.
CLOSE_DISTANCE = 0.5
#: Info keys of a structure's total charge (e): polarmace's own, then ASE's.
TOTAL_CHARGE_KEYS = ("total_charge", "charge")
#: Neighbour-search radius of the overlap check (Å); binning at 0.1 Å would need ~L³/0.001 bins.
_OVERLAP_SEARCH = 0.75

#: Per-atom labels (the rest are per structure).
PER_ATOM_LABELS = ("forces", "bec")
#: Shape of each label (and of the external field) per structure, or per atom for PER_ATOM_LABELS.
LABEL_SHAPES = {"energy": (), "forces": (3,), "stress": (3, 3), "virials": (3, 3), "dipole": (3,), "bec": (3, 3),
                "external_field": (3,)}


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


@dataclass(eq=False)
class Configuration:
    """One structure with its labels (numpy arrays; a label is None when the data lacks it).

    Attributes:
        atomic_numbers: [N] int64.
        positions: [N, 3] Å.
        cell: [3, 3] Å, rows are lattice vectors (zeros for open structures).
        pbc: [3] bool.
        energy: eV.  forces: [N, 3] eV/Å.  stress: [3, 3] eV/Å³.  virials: [3, 3] eV.
        dipole: [3] e·Å.  bec: [N, 3, 3] e, bec[i, a, b] = ∂P_a/∂r_ib.
        total_charge: e.  weight: loss weight of the structure.  external_field: [3] V/Å or None.
        info: anything else the file carried for this structure (not used for training).
        total_charge_key: the info key the total charge was read from; None when the default was
            applied or the origin is unknown (an HDF5 set, a structure built in code).
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    virials: Optional[np.ndarray] = None
    dipole: Optional[np.ndarray] = None
    bec: Optional[np.ndarray] = None
    total_charge: float = 0.0
    weight: float = 1.0
    external_field: Optional[np.ndarray] = None
    info: Dict[str, Any] = field(default_factory=dict)
    total_charge_key: Optional[str] = None

    def __post_init__(self) -> None:
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.cell = np.asarray(self.cell, dtype=np.float64)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(-1)
        if self.energy is not None:
            self.energy = float(np.asarray(self.energy, dtype=np.float64).reshape(()))
        for name in ("forces", "stress", "virials", "dipole", "bec", "external_field"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64))
        if self.bec is not None and self.bec.ndim == 2 and self.bec.shape[1] == 9:
            self.bec = self.bec.reshape(-1, 3, 3)
        self.total_charge = float(self.total_charge)
        self.weight = float(self.weight)

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    def has(self, label: str) -> bool:
        """Whether the structure carries `label` (one of LABEL_NAMES)."""
        return getattr(self, label) is not None

    def to_atoms(self, keys: Any = None):
        """An ase.Atoms with the labels stored under the key names of `keys` (info/arrays),
        so that `read_configurations` on a written extxyz gives this configuration back."""
        import ase

        spec = KeySpec.from_config(keys)
        atoms = ase.Atoms(numbers=self.atomic_numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        atoms.info.update(self.info)
        for label in LABEL_NAMES:
            value = getattr(self, label)
            if value is None:
                continue
            if label in PER_ATOM_LABELS:
                atoms.arrays[spec.key(label)] = value.reshape(self.num_atoms, -1) if label == "bec" else value.copy()
            else:
                atoms.info[spec.key(label)] = value
        atoms.info[spec.keys.total_charge] = self.total_charge
        if self.weight != 1.0:
            atoms.info[spec.keys.weight] = self.weight
        if self.external_field is not None:
            atoms.info[spec.keys.external_field] = self.external_field.copy()
        return atoms


@dataclass(frozen=True)
class KeySpec:
    """Where labels live in the files (`keys`, a KeysConfig) and which must be present."""

    keys: KeysConfig = field(default_factory=KeysConfig)
    #: Labels (names from LABEL_NAMES) every structure must carry.
    required: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label in self.required:
            if label not in LABEL_NAMES:
                raise ValueError(f"unknown required label {label!r}; labels are {', '.join(LABEL_NAMES)}")
        object.__setattr__(self, "required", tuple(self.required))

    def key(self, label: str) -> str:
        """The file key of a label name (e.g. key('bec') -> 'BEC')."""
        return getattr(self.keys, label)

    @classmethod
    def from_config(cls, keys: Any = None, required: Optional[Sequence[str]] = None) -> "KeySpec":
        """From None (defaults), a KeySpec, KeysConfig, DataConfig, Config, or a mapping
        {label: key} (a mapping is checked like config.data.keys). `required` overrides the
        required labels (a DataConfig/Config brings its own `required_labels`)."""
        from ..config import Config, DataConfig

        req: Sequence[str] = ()
        if keys is None:
            spec_keys = KeysConfig()
        elif isinstance(keys, KeySpec):
            spec_keys, req = keys.keys, keys.required
        elif isinstance(keys, KeysConfig):
            spec_keys = keys
        elif isinstance(keys, Config):
            spec_keys, req = keys.data.keys, keys.data.required_labels
        elif isinstance(keys, DataConfig):
            spec_keys, req = keys.keys, keys.required_labels
        elif isinstance(keys, Mapping):
            spec_keys = Config.from_dict({"data": {"keys": dict(keys)}}).data.keys
        else:
            raise TypeError(f"cannot make a KeySpec from {type(keys).__name__}")
        return cls(keys=spec_keys, required=tuple(req if required is None else required))


def stack_label(configurations: Sequence["Configuration"], name: str) -> Tuple[np.ndarray, np.ndarray]:
    """A label of many structures as one array, zeros where a structure lacks it, and the
    per-structure bool mask. Per-atom labels are concatenated over atoms ([N_total, ...]),
    the others stacked ([B, ...])."""
    mask = np.array([getattr(c, name) is not None for c in configurations], dtype=bool)
    if name in PER_ATOM_LABELS:
        ptr = np.concatenate([[0], np.cumsum([c.num_atoms for c in configurations])])
        values = np.zeros((int(ptr[-1]),) + LABEL_SHAPES[name])
        for b in np.flatnonzero(mask):
            values[ptr[b]:ptr[b + 1]] = getattr(configurations[b], name)
    else:
        values = np.zeros((len(configurations),) + LABEL_SHAPES[name])
        for b in np.flatnonzero(mask):
            values[b] = getattr(configurations[b], name)
    return values, mask


# --------------------------------------------------------------------------------------------
# Total charge: one rule for every reader, the calculator, MD and the i-PI driver
# --------------------------------------------------------------------------------------------


def _info_value(atoms: Any, key: str) -> Any:
    """info[key] of an ase.Atoms or of an info mapping. (Not the calculator's results: a
    calculator's own output is no input; ASE's readers keep 'charge' in info.)"""
    return (atoms if isinstance(atoms, Mapping) else atoms.info).get(key)


def find_total_charge(atoms: Any, source: str = "structure",
                      key: str = "total_charge") -> Tuple[Optional[float], Optional[str]]:
    """(total charge in e, the info key it came from), or (None, None) when none is given.

    With the default `key` both TOTAL_CHARGE_KEYS are read; when both are present with
    different values that is a DataError naming `source`. A custom `key` (data.keys.total_charge)
    is the only key read.
    """
    keys = TOTAL_CHARGE_KEYS if key == TOTAL_CHARGE_KEYS[0] else (key,)
    found = [(k, _info_value(atoms, k)) for k in keys]
    found = [(k, _as_scalar(v, f"total charge ('{k}')", source)) for k, v in found if v is not None]
    if not found:
        return None, None
    if len({v for _, v in found}) > 1:
        given = " and ".join(f"{k} = {v:g}" for k, v in found)
        raise DataError(f"{source}: info has {given}: two different total charges; give one")
    return found[0][1] + 0.0, found[0][0]  # + 0.0: -0.0 -> 0.0


def total_charge_of(atoms: Any, default: float = 0.0, source: str = "structure",
                    key: str = "total_charge") -> float:
    """The total charge (e) of a structure: info 'total_charge' or 'charge' (the same value if
    both), else `default` (see `find_total_charge`). `atoms`: an ase.Atoms or an info mapping."""
    value, _ = find_total_charge(atoms, source, key)
    return float(default) + 0.0 if value is None else value


def set_total_charge(info: Dict[str, Any], value: float) -> None:
    """Store a total charge under 'total_charge' and drop 'charge', so that a structure (and
    every frame written from it) carries one value."""
    for key in TOTAL_CHARGE_KEYS[1:]:
        info.pop(key, None)
    info[TOTAL_CHARGE_KEYS[0]] = float(value)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_cell(cell: np.ndarray, pbc: np.ndarray, source: str = "structure",
               min_width: float = MIN_DISTANCE) -> None:
    """DataError unless every periodic direction has a lattice plane spacing >= `min_width` Å.

    Run before any neighbour search: a near-zero lattice vector (or a flat cell) asks for
    cutoff/width images along it, which does not finish; a singular cell has no inverse.
    """
    flags = [bool(f) for f in np.asarray(pbc, dtype=bool).reshape(-1)]
    periodic = [a for a in range(len(flags)) if flags[a]]
    if not periodic:
        return
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or not np.isfinite(cell).all():
        raise DataError(f"{source}: the cell must be 3x3 finite numbers, got {cell.tolist()}")
    rows = cell.tolist()
    for a, width in zip(periodic, _plane_spacings([rows[a] for a in periodic])):
        if not width >= min_width:
            what = ("is singular (zero or linearly dependent lattice vectors)" if not width > 1e-9
                    else "is too small: every atom overlaps its own periodic image")
            raise DataError(f"{source}: pbc is {flags} but the cell {what}; plane spacing along "
                            f"lattice vector {a} is {width:.3g} Å < {min_width} Å (cell "
                            f"{[[float(f'{x:.4g}') for x in row] for row in rows]})")


def _cross(u: List[float], v: List[float]) -> List[float]:
    return [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]


def _norm(u: List[float]) -> float:
    return math.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])


def _plane_spacings(vectors: List[List[float]]) -> List[float]:
    """Spacing of the lattice planes along each of 1-3 lattice vectors (rows), within their span.
    Closed forms in plain Python: this runs for every structure a neighbour list is built for
    (a few µs; numpy calls on 3x3 arrays cost ~10x more)."""
    if len(vectors) == 1:
        return [_norm(vectors[0])]
    if len(vectors) == 2:
        area = _norm(_cross(vectors[0], vectors[1]))
        return [area / max(_norm(vectors[1]), 1e-300), area / max(_norm(vectors[0]), 1e-300)]
    a, b, c = vectors
    bc, ca, ab = _cross(b, c), _cross(c, a), _cross(a, b)
    volume = abs(a[0] * bc[0] + a[1] * bc[1] + a[2] * bc[2])
    return [volume / max(_norm(f), 1e-300) for f in (bc, ca, ab)]


def _finite(name: str, value: Any, source: str, per_atom: bool = False) -> None:
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        where = ""
        if per_atom:
            where = f" (first at atom {int(np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0][0])})"
        raise DataError(f"{source}: {name} contains NaN or inf{where}")


def _shape(name: str, value: np.ndarray, shape: Tuple[int, ...], source: str) -> None:
    if value.shape != shape:
        raise DataError(f"{source}: {name} has shape {tuple(value.shape)}, expected {shape}")


def validate_configuration(config: Configuration, source: str = "structure",
                           required: Sequence[str] = (), min_distance: Optional[float] = MIN_DISTANCE) -> None:
    """Raise DataError (message starts with `source`) if the structure is unusable.

    Checks shapes, NaN/inf, element numbers, the cell of periodic directions, required labels
    and (unless `min_distance` is None) atoms closer than `min_distance` Å, periodic images
    included.
    """
    from ase.data import chemical_symbols

    n = config.num_atoms
    if n == 0:
        raise DataError(f"{source}: structure has no atoms")
    z = config.atomic_numbers
    bad = np.flatnonzero((z < 1) | (z >= len(chemical_symbols)))
    if len(bad):
        raise DataError(f"{source}: unknown element (atomic number {z[bad[0]]}, symbol "
                        f"{_symbol(int(z[bad[0]]))!r}) at atom {bad[0]}")
    _shape("positions", config.positions, (n, 3), source)
    _finite("positions", config.positions, source, per_atom=True)
    _shape("cell", config.cell, (3, 3), source)
    _finite("cell", config.cell, source)
    _shape("pbc", config.pbc, (3,), source)
    check_cell(config.cell, config.pbc, source)
    if config.energy is not None and not math.isfinite(config.energy):
        raise DataError(f"{source}: energy is {config.energy}")
    for name, shape in LABEL_SHAPES.items():
        value = getattr(config, name)
        if value is not None and name != "energy":
            _shape(name, value, ((n,) if name in PER_ATOM_LABELS else ()) + shape, source)
            _finite(name, value, source, per_atom=name in PER_ATOM_LABELS)
    if not math.isfinite(config.total_charge):
        raise DataError(f"{source}: total_charge is {config.total_charge}")
    if not math.isfinite(config.weight) or config.weight < 0:
        raise DataError(f"{source}: weight must be finite and >= 0, got {config.weight}")
    for label in required:
        if not config.has(label):
            raise DataError(f"{source}: required label '{label}' is missing")
    if min_distance is not None:
        _check_overlaps(config, source, float(min_distance))


def _check_overlaps(config: Configuration, source: str, min_distance: float) -> None:
    import torch

    from ..neighbours import neighbour_pairs

    pos = config.positions
    edge_index, shifts = neighbour_pairs(
        torch.from_numpy(pos), torch.from_numpy(config.cell)[None], torch.from_numpy(config.pbc)[None],
        torch.zeros(config.num_atoms, dtype=torch.long), max(min_distance, _OVERLAP_SEARCH))
    i, j = edge_index.numpy()
    shifts = shifts.numpy()
    d = np.linalg.norm(pos[j] - pos[i] + shifts @ config.cell, axis=1)
    problem = closest_pair_problem(config.atomic_numbers, i, j, shifts, d, min_distance)
    if problem:
        raise DataError(f"{source}: {problem}")
    problem = closest_pair_problem(config.atomic_numbers, i, j, shifts, d, CLOSE_DISTANCE)
    if problem:
        warnings.warn(f"{source}: {problem}", UserWarning, stacklevel=2)


def closest_pair_problem(numbers: np.ndarray, i: np.ndarray, j: np.ndarray, shifts: np.ndarray,
                         d: np.ndarray, limit: float) -> str:
    """A sentence about the closest pair (edge arrays i, j, shifts, distances d) when it is
    closer than `limit` Å, else "". Shared by the readers and the calculator."""
    close = np.flatnonzero(d < limit)
    if not len(close):
        return ""
    e = close[np.argmin(d[close])]
    a, b = int(i[e]), int(j[e])
    sa, sb = _symbol(int(numbers[a])), _symbol(int(numbers[b]))
    if a == b:
        return (f"atom {a} ({sa}) is {d[e]:.4f} Å from its own periodic image (< {limit} Å): "
                f"the cell is too small")
    across = np.any(shifts[e] != 0)
    hint = ("; the periodic images overlap: is the cell too small for the structure?" if across
            else ("; coincident atoms" if d[e] < MIN_DISTANCE else ""))
    return (f"overlapping atoms {min(a, b)} ({sa if a < b else sb}) and {max(a, b)} ({sb if a < b else sa}) "
            f"are {d[e]:.4f} Å apart{' across the periodic boundary' if across else ''} (< {limit} Å){hint}")


# --------------------------------------------------------------------------------------------
# ASE (extended XYZ and anything ase.io reads)
# --------------------------------------------------------------------------------------------


def _lookup(atoms, key: str, per_atom: bool) -> Any:
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    calc = atoms.calc
    results = getattr(calc, "results", None) if calc is not None else None
    if results and key in results:
        return results[key]
    return None


def _as_3x3(value: Any, name: str, source: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 9:
        return arr.reshape(3, 3)
    if arr.size == 6:  # Voigt order xx yy zz yz xz xy (ASE)
        xx, yy, zz, yz, xz, xy = arr.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{source}: {name} has {arr.size} values; expected 9 (3x3) or 6 (Voigt xx yy zz yz xz xy)")


def _as_scalar(value: Any, name: str, source: str) -> float:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: {name} is not a number: {value!r}") from None
    if arr.size != 1:
        raise DataError(f"{source}: {name} should be one number, got {arr.size} values")
    return float(arr.reshape(()))


def configuration_from_atoms(atoms, keys: Any = None, default_total_charge: float = 0.0,
                             source: str = "structure", min_distance: Optional[float] = MIN_DISTANCE) -> Configuration:
    """Convert an ase.Atoms (labels in info/arrays/calc as ASE stores them) and validate it."""
    spec = KeySpec.from_config(keys)
    k = spec.keys
    n = len(atoms)
    consumed = set()

    def get(label_key: str, per_atom: bool) -> Any:
        value = _lookup(atoms, label_key, per_atom)
        if value is not None and not per_atom:
            consumed.add(label_key)
        return value

    energy = get(k.energy, False)
    if energy is not None:
        energy = _as_scalar(energy, f"energy ('{k.energy}')", source)
    forces = get(k.forces, True)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise DataError(f"{source}: forces ('{k.forces}') have shape {forces.shape}, expected ({n}, 3)")
    stress = get(k.stress, False)
    if stress is not None:
        stress = _as_3x3(stress, f"stress ('{k.stress}')", source)
    virials = get(k.virials, False)
    if virials is not None:
        virials = _as_3x3(virials, f"virials ('{k.virials}')", source)
    dipole = get(k.dipole, False)
    if dipole is not None:
        dipole = np.asarray(dipole, dtype=np.float64).reshape(-1)
        if dipole.shape != (3,):
            raise DataError(f"{source}: dipole ('{k.dipole}') has {dipole.size} values, expected 3")
    bec = get(k.bec, True)
    if bec is not None:
        bec = np.asarray(bec, dtype=np.float64)
        if bec.size != n * 9:
            raise DataError(f"{source}: BEC ('{k.bec}') has shape {bec.shape}, expected ({n}, 9) or ({n}, 3, 3)")
        bec = bec.reshape(n, 3, 3)
    total_charge, charge_key = find_total_charge(atoms, source, k.total_charge)
    consumed.update(TOTAL_CHARGE_KEYS if k.total_charge == TOTAL_CHARGE_KEYS[0] else (k.total_charge,))
    if total_charge is None:
        total_charge = float(default_total_charge) + 0.0
    weight = get(k.weight, False)
    weight = 1.0 if weight is None else _as_scalar(weight, f"weight ('{k.weight}')", source)
    field_ = get(k.external_field, False)
    if field_ is not None:
        field_ = np.asarray(field_, dtype=np.float64).reshape(-1)
        if field_.shape != (3,):
            raise DataError(f"{source}: external field ('{k.external_field}') has {field_.size} values, expected 3")
    info = {key: value for key, value in atoms.info.items() if key not in consumed}
    config = Configuration(
        atomic_numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc,
        energy=energy, forces=forces, stress=stress, virials=virials, dipole=dipole, bec=bec,
        total_charge=total_charge, weight=weight, external_field=field_, info=info, total_charge_key=charge_key)
    validate_configuration(config, source, spec.required, min_distance)
    return config


def _read_ase(path: Path, spec: KeySpec, default_total_charge: float, index: Any, fmt: Optional[str],
              min_distance: Optional[float], bar: Any) -> List[Configuration]:
    import ase.io
    from ase.data import atomic_numbers

    where = (lambda i: f"{path}: frame {i}") if index in (None, ":") else (lambda i: f"{path}: frame {i} of selection {index!r}")
    frames = ase.io.iread(str(path), index=":" if index is None else index, format=fmt)
    out: List[Configuration] = []
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except KeyError as exc:
            key = exc.args[0] if exc.args else None
            if isinstance(key, str) and key not in atomic_numbers:
                raise DataError(f"{where(len(out))}: unknown element symbol {key!r}") from exc
            raise DataError(f"{where(len(out))}: cannot parse: KeyError {exc}") from exc
        except Exception as exc:  # the ASE readers raise many kinds; the message names file and frame
            raise DataError(f"{where(len(out))}: cannot parse: {exc}") from exc
        out.append(configuration_from_atoms(atoms, spec, default_total_charge, where(len(out)), min_distance))
        bar.update()
    return out


# --------------------------------------------------------------------------------------------
# n2p2 / RuNNer input.data
# --------------------------------------------------------------------------------------------


def _float(word: str) -> float:
    return float(word.replace("D", "E").replace("d", "e"))


def _select(items: List[Any], index: Any) -> List[Any]:
    if index is None or index == ":":
        return items
    if isinstance(index, str):
        from ase.io.formats import string2index

        index = string2index(index)
    if isinstance(index, int):
        return [items[index]]
    return items[index]


def _read_n2p2(path: Path, spec: KeySpec, default_total_charge: float, index: Any, units: str,
               min_distance: Optional[float], bar: Any) -> List[Configuration]:
    """n2p2 ``input.data``: begin / comment / lattice ×3 / atom x y z elem q n fx fy fz /
    energy / charge / end. `units`: "atomic" (Bohr, Hartree; converted) or "metal" (Å, eV)."""
    from ase.data import atomic_numbers

    if units == "atomic":
        length, energy_unit = BOHR, HARTREE
    elif units == "metal":
        length, energy_unit = 1.0, 1.0
    else:
        raise ValueError(f"n2p2 units must be 'atomic' (Bohr/Hartree) or 'metal' (Å/eV), got {units!r}")
    out: List[Configuration] = []
    frame: Optional[Dict[str, Any]] = None
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            words = line.split()
            if not words:
                continue
            tag = words[0].lower()
            here = f"{path}: line {lineno}"
            if tag == "begin":
                if frame is not None:
                    raise DataError(f"{here}: 'begin' before the 'end' of the structure started at line {frame['line']}")
                frame = {"line": lineno, "lattice": [], "atoms": [], "energy": None, "charge": None, "comment": None}
                continue
            if frame is None:
                raise DataError(f"{here}: {words[0]!r} outside a begin ... end block")
            where = f"{path}: frame {len(out)} (line {lineno})"
            try:
                if tag == "comment":
                    frame["comment"] = line.strip()[len(words[0]):].strip()
                elif tag == "lattice":
                    if len(words) < 4:
                        raise ValueError("a lattice line needs 3 numbers")
                    frame["lattice"].append([_float(w) for w in words[1:4]])
                elif tag == "atom":
                    if len(words) < 10:
                        raise ValueError(f"an atom line needs x y z element charge n fx fy fz (10 fields), got {len(words)}")
                    symbol = words[4]
                    if symbol not in atomic_numbers or atomic_numbers[symbol] == 0:
                        raise DataError(f"{where}: unknown element symbol {symbol!r}")
                    frame["atoms"].append((atomic_numbers[symbol], [_float(w) for w in words[1:4]],
                                           [_float(w) for w in words[7:10]]))
                elif tag == "energy":
                    frame["energy"] = _float(words[1])
                elif tag == "charge":
                    frame["charge"] = _float(words[1])
                elif tag == "end":
                    if len(frame["lattice"]) not in (0, 3):
                        raise ValueError(f"{len(frame['lattice'])} lattice lines; expected 3 or none")
                    if not frame["atoms"]:
                        raise ValueError("structure has no atoms")
                    numbers = np.array([a[0] for a in frame["atoms"]], dtype=np.int64)
                    positions = np.array([a[1] for a in frame["atoms"]]) * length
                    forces = np.array([a[2] for a in frame["atoms"]]) * (energy_unit / length)
                    periodic = len(frame["lattice"]) == 3
                    cell = np.array(frame["lattice"]) * length if periodic else np.zeros((3, 3))
                    info = {"comment": frame["comment"]} if frame["comment"] else {}
                    config = Configuration(
                        atomic_numbers=numbers, positions=positions, cell=cell, pbc=np.full(3, periodic),
                        energy=None if frame["energy"] is None else frame["energy"] * energy_unit, forces=forces,
                        total_charge=default_total_charge if frame["charge"] is None else frame["charge"],
                        info=info, total_charge_key=None if frame["charge"] is None else "charge")
                    out.append((config, f"{path}: frame {len(out)} (lines {frame['line']}-{lineno})"))
                    frame = None
                else:
                    raise ValueError(f"unknown keyword {words[0]!r}")
            except DataError:
                raise
            except (ValueError, IndexError) as exc:
                raise DataError(f"{where}: cannot parse {line.strip()!r}: {exc}") from exc
    if frame is not None:
        raise DataError(f"{path}: the structure started at line {frame['line']} has no 'end'")
    selected = _select(out, index)
    for config, source in selected:
        validate_configuration(config, source, spec.required, min_distance)
        bar.update()
    return [config for config, _ in selected]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def detect_format(path: Union[str, Path]) -> Optional[str]:
    """'n2p2' for input.data / *.data, 'hdf5' for .h5/.hdf5, 'extxyz' for .xyz/.extxyz,
    None otherwise (ASE guesses)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.name == "input.data" or suffix == ".data":
        return "n2p2"
    if suffix in (".h5", ".hdf5"):
        return "hdf5"
    if suffix in (".xyz", ".extxyz"):
        return "extxyz"
    return None


def read_configurations(path: Union[str, Path], keys: Any = None, default_total_charge: float = 0.0,
                        index: Any = ":", format: Optional[str] = None, required: Optional[Sequence[str]] = None,
                        min_distance: Optional[float] = MIN_DISTANCE, n2p2_units: str = "atomic",
                        progress: bool = False) -> List[Configuration]:
    """Read and validate every selected structure of a file.

    Args:
        path: extended XYZ (or anything ase.io reads), n2p2 ``input.data``, or a polarmace .h5.
        keys: where labels are stored: KeySpec, KeysConfig, DataConfig, Config or {label: key}.
        default_total_charge: total charge of structures whose file gives none.
        index: ASE-style selection (":" all, 0, "-1", "10:20", a slice).
        format: "extxyz", "n2p2", "hdf5" or any ase.io format; None = from the file name.
        required: labels every structure must carry (default: those of `keys`).
        min_distance: atoms closer than this (Å) are an error; None skips the check.
        n2p2_units: "atomic" (Bohr/Hartree, converted to Å/eV) or "metal" (already Å/eV).
        progress: show a tqdm bar of the structures read.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    spec = KeySpec.from_config(keys, required)
    fmt = format or detect_format(path)
    if fmt == "hdf5":
        from .hdf5 import HDF5Dataset

        dataset = HDF5Dataset(path)
        configs = _select([dataset[i] for i in range(len(dataset))], index)
        for i, config in enumerate(configs):
            validate_configuration(config, f"{path}: structure {i}", spec.required, min_distance=None)
    else:
        with tqdm(desc=f"reading {path.name}", unit="struct", disable=not progress) as bar:
            if fmt == "n2p2":
                configs = _read_n2p2(path, spec, default_total_charge, index, n2p2_units, min_distance, bar)
            else:
                configs = _read_ase(path, spec, default_total_charge, index, fmt, min_distance, bar)
    if not configs:
        raise DataError(f"{path}: no structures found" + ("" if index in (None, ":") else f" for index {index!r}"))
    return configs

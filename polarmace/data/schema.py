"""The data record and its rules: `Configuration`, the label names and shapes, where labels
live in files (`KeysConfig`, `KeySpec`), and the checks every reader applies (`DataError`).

No file I/O here and no import of the run config (`polarmace.config` imports from this
module): the readers (:mod:`.atoms` for extxyz and n2p2, :mod:`.hdf5`) depend on it alone.

Internal units: Å, eV, e (stress eV/Å³ with ASE's sign convention, virials eV, dipole e·Å,
Born effective charges e, external field V/Å).
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "DataError",
    "Configuration",
    "LABEL_NAMES",
    "PER_ATOM_LABELS",
    "LABEL_SHAPES",
    "MIN_DISTANCE",
    "CLOSE_DISTANCE",
    "TOTAL_CHARGE_KEYS",
    "KeysConfig",
    "KeySpec",
    "keys_from_mapping",
    "stack_label",
    "check_cell",
    "validate_configuration",
    "closest_pair_problem",
]

#: Label names a data set may carry (also the names of the loss terms and their weights).
LABEL_NAMES: Tuple[str, ...] = ("energy", "forces", "stress", "virials", "dipole", "bec")
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




@dataclass
class KeysConfig:
    """`data.keys:` where each label is stored in the files (atoms.info / arrays / calc)."""

    energy: str = "energy"
    forces: str = "forces"
    #: 3×3 or Voigt (6 or 9 values), eV/Å³, ASE sign convention.
    stress: str = "stress"
    #: 3×3 or 6/9 values, eV.
    virials: str = "virials"
    #: Total dipole, e·Å.
    dipole: str = "dipole"
    #: Born effective charges, 9 columns per atom (row-major: bec[i, a, b] = ∂P_a/∂r_ib).
    bec: str = "BEC"
    #: Per-structure total charge; with the default name, info `charge` is also accepted.
    total_charge: str = "total_charge"
    #: Per-structure loss weight (default 1).
    weight: str = "config_weight"
    #: Per-structure external field, V/Å (default 0).
    external_field: str = "external_field"

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name):
                raise ConfigError(f"invalid value for 'data.keys.{f.name}': must be a non-empty string")


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
        req: Sequence[str] = ()
        data = getattr(keys, "data", keys)  # a Config brings its data section
        if keys is None:
            spec_keys = KeysConfig()
        elif isinstance(keys, KeySpec):
            spec_keys, req = keys.keys, keys.required
        elif isinstance(keys, KeysConfig):
            spec_keys = keys
        elif isinstance(getattr(data, "keys", None), KeysConfig):  # a DataConfig (or a Config)
            spec_keys, req = data.keys, data.required_labels
        elif isinstance(keys, Mapping):
            spec_keys = keys_from_mapping(keys)
        else:
            raise TypeError(f"cannot make a KeySpec from {type(keys).__name__}")
        return cls(keys=spec_keys, required=tuple(req if required is None else required))




def keys_from_mapping(keys: Mapping[str, Any]) -> KeysConfig:
    """A KeysConfig from {label: key}, checked like ``data.keys`` of a config file."""
    names = [f.name for f in fields(KeysConfig)]
    for k, v in keys.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f"; did you mean 'data.keys.{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown key 'data.keys.{k}'{hint}")
        if not isinstance(v, str):
            raise ConfigError(f"invalid value for 'data.keys.{k}': expected a string, got {v!r} ({type(v).__name__})")
    return KeysConfig(**dict(keys))


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

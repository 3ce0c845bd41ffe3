"""The readers of extended XYZ (through ASE) and n2p2 ``input.data``, and the total-charge rule.

Every reader returns validated `Configuration` records (:mod:`.schema`) and raises `DataError`
naming the file, the frame and the problem. n2p2 files are in Bohr and Hartree by default and
are converted on reading. HDF5 sets are read by :mod:`.hdf5`; :func:`polarmace.data.sources.open_source`
picks the reader of a file.

Where labels are looked up (ASE moves some of them into a SinglePointCalculator on reading):
per-structure labels in ``atoms.info[key]`` then ``atoms.calc.results[key]``; per-atom labels in
``atoms.arrays[key]`` then ``atoms.calc.results[key]``. Key names come from `KeySpec`
(``config.data.keys``). ``initial_charges`` and per-atom charge columns are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from ..units import BOHR, HARTREE
from .schema import (MIN_DISTANCE, TOTAL_CHARGE_KEYS, Configuration, KeySpec,
                     validate_configuration)

__all__ = [
    "TOTAL_CHARGE_KEYS",
    "total_charge_of",
    "find_total_charge",
    "set_total_charge",
    "read_configurations",
    "configuration_from_atoms",
    "detect_format",
]

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
        path: extended XYZ (or anything ase.io reads) or n2p2 ``input.data``.
        keys: where labels are stored: KeySpec, KeysConfig, DataConfig, Config or {label: key}.
        default_total_charge: total charge of structures whose file gives none.
        index: ASE-style selection (":" all, 0, "-1", "10:20", a slice).
        format: "extxyz", "n2p2" or any ase.io format; None = from the file name.
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
        raise DataError(f"{path}: an HDF5 set is read with polarmace.data.sources.open_source "
                        "(or polarmace.data.hdf5.HDF5Dataset), not as a list of structures")
    with tqdm(desc=f"reading {path.name}", unit="struct", disable=not progress) as bar:
        if fmt == "n2p2":
            configs = _read_n2p2(path, spec, default_total_charge, index, n2p2_units, min_distance, bar)
        else:
            configs = _read_ase(path, spec, default_total_charge, index, fmt, min_distance, bar)
    if not configs:
        raise DataError(f"{path}: no structures found" + ("" if index in (None, ":") else f" for index {index!r}"))
    return configs

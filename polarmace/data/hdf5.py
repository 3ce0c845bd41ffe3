"""Training sets in HDF5 (h5py): write once with `write_dataset`, read lazily with `HDF5Dataset`.

Layout (format "polarmace-hdf5", version 1)::

    /                       attrs: format, format_version, statistics (JSON), polarmace_version
    /elements               [E] int64 atomic numbers (sorted)
    /atoms/atomic_numbers   [N_total] int64      concatenated over structures
    /atoms/positions        [N_total, 3] Å
    /atoms/forces           [N_total, 3] eV/Å     (only if some structure has forces; zeros elsewhere)
    /atoms/bec              [N_total, 3, 3] e     (only if some structure has BEC)
    /configs/ptr            [B+1] int64          atoms of structure b: ptr[b]:ptr[b+1]
    /configs/cell [B,3,3]  pbc [B,3]  total_charge [B]  weight [B]  info [B] (JSON strings)
    /configs/<label> and /configs/<label>_mask [B] bool for energy, stress, virials, dipole,
        external_field (only if some structure has it), and forces_mask / bec_mask [B].

Per-atom arrays are chunked and compressed; per-structure arrays (small) are read into memory
when the dataset is opened. Statistics (`polarmace.data.statistics.compute_statistics`) are
stored as JSON; the trainer uses them instead of recomputing when the training split is the whole
file with the same r_max and elements (`polarmace.training.datasets.training_statistics`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch.utils.data

from .schema import (
    LABEL_NAMES,
    PER_ATOM_LABELS,
    Configuration,
    DataError,
    check_cell,
    stack_label,
    validate_configuration,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "write_dataset", "HDF5Dataset"]

FORMAT = "polarmace-hdf5"
FORMAT_VERSION = 1

#: Per-structure arrays stored with a mask (only when some structure has them).
_PER_CONFIG = ("energy", "stress", "virials", "dipole", "external_field")
_ATOM_CHUNK = 2048
#: Rows read at a time when a whole set is validated.
_VALIDATE_ROWS = 1 << 20


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_dataset(path: Union[str, Path], configurations: Sequence[Configuration],
                  elements: Optional[Sequence[str]] = None, r_max: Optional[float] = None,
                  compression: Optional[str] = "lzf") -> Dict[str, Any]:
    """Write structures to an HDF5 training set and return its statistics.

    The file is written under a temporary name and renamed when complete, so an interrupted run
    never leaves a half-written set behind. With `r_max` (Å) the statistics of
    `polarmace.data.statistics.compute_statistics` (neighbours within r_max; `elements`, symbols,
    fixes the element list, which must contain every element of the data) are stored and
    returned; without it none ({}). `compression`: "lzf" (fast), "gzip" or None.
    """
    import h5py

    from .. import __version__

    path = Path(path)
    configurations = list(configurations)
    if not configurations:
        raise DataError(f"{path}: no structures to write")
    for i, c in enumerate(configurations):
        validate_configuration(c, f"structure {i}", min_distance=None)
    from .statistics import compute_statistics  # the writer only: reading a set needs the schema alone

    stats = compute_statistics(configurations, float(r_max), elements=elements, elements_key="elements") \
        if r_max is not None else {}
    present = sorted({int(z) for c in configurations for z in np.unique(c.atomic_numbers)})
    from ase.data import atomic_numbers as z_of

    ptr = np.concatenate([[0], np.cumsum([c.num_atoms for c in configurations])]).astype(np.int64)
    total = int(ptr[-1])
    opts = {"compression": compression} if compression else {}
    if compression == "gzip":
        opts["compression_opts"] = 4
        opts["shuffle"] = True
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["polarmace_version"] = __version__
            f.attrs["statistics"] = json.dumps(stats)
            zs = [z_of[s] for s in stats["elements"]] if stats else present
            f.create_dataset("elements", data=np.array(zs, dtype=np.int64))
            atoms = f.create_group("atoms")
            conf = f.create_group("configs")

            chunk = min(total, _ATOM_CHUNK)
            atom_arrays = {"atomic_numbers": np.concatenate([c.atomic_numbers for c in configurations]),
                           "positions": np.concatenate([c.positions for c in configurations])}
            for name in PER_ATOM_LABELS:
                values, mask = stack_label(configurations, name)
                conf.create_dataset(f"{name}_mask", data=mask)
                if mask.any():
                    atom_arrays[name] = values
            for name, values in atom_arrays.items():
                atoms.create_dataset(name, data=values, chunks=(chunk,) + values.shape[1:], **opts)
            conf.create_dataset("ptr", data=ptr)
            conf.create_dataset("cell", data=np.stack([c.cell for c in configurations]), **opts)
            conf.create_dataset("pbc", data=np.stack([c.pbc for c in configurations]).astype(bool))
            conf.create_dataset("total_charge", data=np.array([c.total_charge for c in configurations]))
            conf.create_dataset("weight", data=np.array([c.weight for c in configurations]))
            for name in _PER_CONFIG:
                values, mask = stack_label(configurations, name)
                if mask.any():
                    conf.create_dataset(name, data=values, **opts)
                    conf.create_dataset(f"{name}_mask", data=mask)
            info = [json.dumps(c.info, default=_json_default) for c in configurations]
            conf.create_dataset("info", data=info, dtype=h5py.string_dtype())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats


def _open(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated, corrupt or another format): {exc}") from exc


class HDF5Dataset(torch.utils.data.Dataset):
    """A polarmace HDF5 set as a torch Dataset of `Configuration` objects.

    The file is opened for each process on first access (not in __init__, whose handle is
    closed again), so the dataset can be pickled into DataLoader workers. Per-structure arrays
    are held in memory; per-atom arrays are read on access.

    Attributes: path, statistics (dict, see compute_statistics), elements (symbols),
    num_atoms ([B] int64).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = str(path)
        self._file = None
        self._pid: Optional[int] = None
        with _open(self.path) as f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt != FORMAT:
                raise DataError(f"{self.path}: not a polarmace dataset (format attribute {fmt!r}, expected "
                                f"{FORMAT!r}); convert the data with polarmace-prepare")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise DataError(f"{self.path}: dataset format version {version}, this polarmace reads version "
                                f"{FORMAT_VERSION}; re-create the file with polarmace-prepare")
            try:
                self.statistics: Dict[str, Any] = json.loads(f.attrs["statistics"])
                from ase.data import chemical_symbols

                self.elements: List[str] = [chemical_symbols[int(z)] for z in f["elements"][()]]
                self._configs = {name: ds[()] for name, ds in f["configs"].items()}
                self._per_atom = [name for name in PER_ATOM_LABELS if name in f["atoms"]]
                for name in ("atomic_numbers", "positions"):
                    f["atoms"][name].shape  # noqa: B018 - presence check
            except (KeyError, OSError, ValueError) as exc:
                raise DataError(f"{self.path}: corrupt polarmace dataset: {exc}") from exc
            for name in ("ptr", "cell", "pbc", "total_charge", "weight", "info"):
                if name not in self._configs:
                    raise DataError(f"{self.path}: corrupt polarmace dataset: missing configs/{name}")
            self._ptr = self._configs["ptr"].astype(np.int64)
            self._check_layout({name: f["atoms"][name].shape[0] for name in f["atoms"]})

    def _check_layout(self, atom_rows: Dict[str, int]) -> None:
        """DataError naming the array and the first structure it fails for, when the arrays do
        not fit together (a missing row would otherwise shift every later structure)."""
        ptr = self._ptr
        if ptr.ndim != 1 or len(ptr) < 2 or ptr[0] != 0:
            raise DataError(f"{self.path}: corrupt polarmace dataset: configs/ptr must start at 0 and "
                            f"hold one entry more than there are structures")
        sizes = np.diff(ptr)
        if (sizes < 1).any():
            raise DataError(f"{self.path}: structure {int(np.flatnonzero(sizes < 1)[0])}: no atoms "
                            f"(configs/ptr is not increasing)")
        for name, rows in atom_rows.items():
            if rows != ptr[-1]:
                first = int(np.searchsorted(ptr, min(rows, int(ptr[-1])), side="right") - 1)
                raise DataError(f"{self.path}: structure {min(first, len(sizes) - 1)}: atoms/{name} has {rows} "
                                f"rows for {int(ptr[-1])} atoms (missing or extra rows)")
        for name, values in self._configs.items():
            if name != "ptr" and len(values) != len(sizes):
                raise DataError(f"{self.path}: configs/{name} has {len(values)} entries for {len(sizes)} "
                                f"structures (missing or extra rows)")

    def validate(self, required: Sequence[str] = ()) -> None:
        """Check every structure (NaN/inf, elements, cells, labels, `required` labels) in bulk;
        DataError naming the file, the structure and the problem. Overlaps were checked when
        the file was written (polarmace-prepare)."""
        import h5py

        with h5py.File(self.path, "r") as f:
            for name in ["atomic_numbers", "positions"] + self._per_atom:
                values = f["atoms"][name]
                for start in range(0, values.shape[0], _VALIDATE_ROWS):
                    block = values[start:start + _VALIDATE_ROWS]
                    bad = self._bad_rows(name, block, start)
                    if len(bad):
                        self._report(int(np.searchsorted(self._ptr, bad[0], side="right") - 1))
        for name in ("cell", "total_charge", "weight") + tuple(n for n in _PER_CONFIG if n in self._configs):
            values = np.asarray(self._configs[name], dtype=np.float64).reshape(len(self), -1)
            mask = self._configs.get(f"{name}_mask", np.ones(len(self), dtype=bool)).astype(bool)
            bad = np.flatnonzero(mask & ~np.isfinite(values).all(axis=1))
            if len(bad):
                self._report(int(bad[0]))
        for label in required:
            missing = np.flatnonzero(~self.label_mask(label))
            if len(missing):
                raise DataError(f"{self.path}: structure {int(missing[0])}: required label '{label}' is missing")
        for index in np.flatnonzero(self._configs["pbc"].any(axis=1)):
            self._report(int(index), cell_only=True)

    def _bad_rows(self, name: str, block: np.ndarray, start: int) -> np.ndarray:
        """Atom rows (global indices) of `block` that cannot be right."""
        flat = block.reshape(block.shape[0], -1)
        if name == "atomic_numbers":
            from ase.data import chemical_symbols

            ok = (flat >= 1) & (flat < len(chemical_symbols))
        else:  # rows of structures without a per-atom label hold zeros, so NaN is always wrong
            ok = np.isfinite(flat)
        return start + np.flatnonzero(~ok.all(axis=1))

    def _report(self, index: int, cell_only: bool = False) -> None:
        """Raise the DataError that validating structure `index` gives (if any)."""
        source = f"{self.path}: structure {index}"
        if cell_only:
            check_cell(self._configs["cell"][index], self._configs["pbc"][index], source)
            return
        validate_configuration(self[index], source, min_distance=None)
        raise DataError(f"{source}: invalid values")  # pragma: no cover - validate names the problem

    @property
    def num_atoms(self) -> np.ndarray:
        return np.diff(self._ptr)

    def __len__(self) -> int:
        return len(self._ptr) - 1

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = _open(self.path)
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, index: int) -> Configuration:
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"structure {index} out of range for {n} structures in {self.path}")
        index %= n
        s, e = int(self._ptr[index]), int(self._ptr[index + 1])
        c = self._configs
        try:
            atoms = self._handle()["atoms"]
            per_atom = {name: atoms[name][s:e] if c[f"{name}_mask"][index] else None for name in self._per_atom}
            numbers, positions = atoms["atomic_numbers"][s:e], atoms["positions"][s:e]
        except (KeyError, OSError) as exc:
            raise DataError(f"{self.path}: cannot read structure {index} (corrupt file?): {exc}") from exc
        labels = {name: c[name][index] if name in c and c[f"{name}_mask"][index] else None for name in _PER_CONFIG}
        info = c["info"][index]
        config = Configuration(
            atomic_numbers=numbers, positions=positions, cell=c["cell"][index], pbc=c["pbc"][index],
            total_charge=c["total_charge"][index], weight=c["weight"][index],
            info=json.loads(info.decode() if isinstance(info, bytes) else info), **labels, **per_atom)
        # cheap (no overlap search), and a NaN never reaches a loss unnamed
        validate_configuration(config, f"{self.path}: structure {index}", min_distance=None)
        return config

    def atomic_numbers_present(self) -> List[int]:
        """The atomic numbers found in the set's atoms, sorted (read from the file in blocks)."""
        import h5py

        found: set = set()
        with h5py.File(self.path, "r") as f:
            values = f["atoms"]["atomic_numbers"]
            for start in range(0, values.shape[0], _VALIDATE_ROWS):
                found.update(int(z) for z in np.unique(values[start:start + _VALIDATE_ROWS]))
        return sorted(found)

    def label_mask(self, label: str) -> np.ndarray:
        """[B] bool: which structures carry `label` (one of LABEL_NAMES)."""
        if label not in LABEL_NAMES:
            raise ValueError(f"unknown label {label!r}; labels are {', '.join(LABEL_NAMES)}")
        mask = self._configs.get(f"{label}_mask")
        return np.zeros(len(self), dtype=bool) if mask is None else mask.astype(bool)

    def has_label(self, label: str) -> bool:
        """Whether any structure of the set carries `label`."""
        return bool(self.label_mask(label).any())

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
                self._pid = None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

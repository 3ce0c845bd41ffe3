"""The one format dispatcher: a data file (extxyz, n2p2 ``input.data``, polarmace .h5) as an
indexable set of `Configuration`, and index views of such a set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from .schema import Configuration

__all__ = ["Subset", "open_source"]


class Subset:
    """Indexable view ``source[indices[k]]`` (picklable, for DataLoader workers)."""

    def __init__(self, source: Sequence[Configuration], indices: Sequence[int]):
        self.source = source
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Configuration:
        return self.source[self.indices[k]]


def open_source(path: Union[str, Path], data: Any) -> Sequence[Configuration]:
    """An indexable data set: an HDF5Dataset (read lazily) for .h5/.hdf5, else the validated
    list of structures of the file.

    `data` is the ``data`` section (a DataConfig or its dict): `keys`, `default_total_charge`
    and `required_labels` are read from it. An HDF5 set is checked whole on opening (NaN,
    missing rows of a required label), so a bad row is named here and not in a loss.
    """
    from .atoms import read_configurations

    get = data.get if isinstance(data, Mapping) else (lambda k, d=None: getattr(data, k, d))
    required = list(get("required_labels") or [])
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        from .hdf5 import HDF5Dataset

        dataset = HDF5Dataset(path)
        dataset.validate(required)
        return dataset
    keys = get("keys")
    if keys is not None and not isinstance(keys, Mapping):
        import dataclasses

        keys = dataclasses.asdict(keys)
    return read_configurations(path, keys=dict(keys or {}) or None,
                               default_total_charge=float(get("default_total_charge", 0.0) or 0.0),
                               required=required)

"""Data: readers (extxyz, n2p2), HDF5 training sets, splits, and batching into graph dicts."""

from .atoms import (
    LABEL_NAMES,
    MIN_DISTANCE,
    Configuration,
    DataError,
    KeySpec,
    configuration_from_atoms,
    detect_format,
    read_configurations,
    validate_configuration,
)
from .graph import BatchSampler, collate, make_loader, mask_key
from .hdf5 import HDF5Dataset, compute_statistics, open_dataset, write_dataset
from .splits import load_split, save_split, split_indices

__all__ = [
    "LABEL_NAMES",
    "MIN_DISTANCE",
    "Configuration",
    "DataError",
    "KeySpec",
    "configuration_from_atoms",
    "detect_format",
    "read_configurations",
    "validate_configuration",
    "BatchSampler",
    "collate",
    "make_loader",
    "mask_key",
    "HDF5Dataset",
    "compute_statistics",
    "open_dataset",
    "write_dataset",
    "load_split",
    "save_split",
    "split_indices",
]

"""Data: the record type and its rules (schema), readers (extxyz, n2p2, HDF5), the one format
dispatcher (`open_source`), statistics, splits, and batching into graph dicts."""

from .atoms import configuration_from_atoms, detect_format, read_configurations
from .graph import BatchSampler, collate, mask_key
from .hdf5 import HDF5Dataset, write_dataset
from .schema import LABEL_NAMES, MIN_DISTANCE, Configuration, DataError, KeySpec, validate_configuration
from .sources import open_source
from .splits import load_split, save_split, split_indices
from .statistics import compute_statistics

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
    "mask_key",
    "HDF5Dataset",
    "compute_statistics",
    "open_source",
    "write_dataset",
    "load_split",
    "save_split",
    "split_indices",
]

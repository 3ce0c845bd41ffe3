"""The resumable output file of the AMOEBA water generators: count the complete extxyz frames
(cutting off a partly written last one), append frames, and keep the MD checkpoint that belongs
to exactly that many frames."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .amoeba_constants import SOURCE

log = logging.getLogger("polarmace.reference.amoeba_water")


# --------------------------------------------------------------------------------------------
# Output file: count / truncate / append / checkpoint
# --------------------------------------------------------------------------------------------
def _complete_frames(path: Path, n_atoms: Optional[int] = None) -> int:
    """Number of complete extxyz frames in `path`; a partly written last frame is cut off.

    Raises ValueError when a frame has the wrong atom count or a header is not a number.
    """
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")  # lines[:-1] end with a newline; lines[-1] is an unterminated tail
    terminated = len(lines) - 1
    i, count, end = 0, 0, 0
    while i < terminated:
        header = lines[i].strip()
        try:
            n = int(header)
        except ValueError:
            raise ValueError(f"{path}: line {i + 1} should hold an atom count, got {header[:40]!r}") from None
        if n_atoms is not None and n != n_atoms:
            raise ValueError(f"{path}: frame {count} has {n} atoms, expected {n_atoms} (different settings?)")
        if n <= 0 or n % 3:
            raise ValueError(f"{path}: frame {count} has {n} atoms, not whole water molecules")
        if i + n + 2 > terminated:
            break
        end += sum(len(line) + 1 for line in lines[i:i + n + 2])
        i += n + 2
        count += 1
    if end < len(data):
        log.warning("%s: removing a partly written last frame (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return count


def _read_frame(path: Path, index: int):
    import ase.io

    atoms = ase.io.read(str(path), index=index, format="extxyz")
    source = atoms.info.get("source")
    if source != SOURCE:
        raise ValueError(f"{path}: frames were not written by this generator (source={source!r})")
    return atoms


def _write_frame(path: Path, positions: np.ndarray, cell: Optional[np.ndarray], info: Dict, arrays: Dict) -> None:
    import ase.io
    from ase import Atoms

    n_molecules = len(positions) // 3
    atoms = Atoms("OH2" * n_molecules, positions=positions, cell=cell if cell is not None else np.zeros((3, 3)),
                  pbc=cell is not None)
    atoms.info.update(info)
    for key, value in arrays.items():
        atoms.arrays[key] = np.asarray(value, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), atoms, format="extxyz", append=True)


def _checkpoint_path(path: Path) -> Path:
    return path.with_name(path.name + ".ckpt.npz")


def _save_checkpoint(path: Path, frames: int, state: bytes, signature: str) -> None:
    target = _checkpoint_path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, frames=np.int64(frames), state=np.frombuffer(state, dtype=np.uint8),
                 signature=np.array(signature))
    os.replace(tmp, target)


def _load_checkpoint(path: Path, frames: int, signature: str) -> Optional[bytes]:
    """The saved MD state when it belongs to exactly `frames` frames of a run with `signature`."""
    target = _checkpoint_path(path)
    if not target.exists():
        return None
    with np.load(target) as data:
        if int(data["frames"]) != frames or str(data["signature"]) != signature:
            log.warning("%s does not match the %d frames in the file or the arguments; "
                        "restarting the MD from the file instead", target, frames)
            return None
        return data["state"].tobytes()


def _labels_ok(labels: Dict[str, np.ndarray], max_force: float) -> bool:
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in labels.values())
    return finite and float(np.abs(labels["forces"]).max()) <= max_force


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="frame", disable=not enabled)


def _check_count(n_configs: int) -> int:
    if isinstance(n_configs, bool) or int(n_configs) != n_configs or n_configs < 1:
        raise ValueError(f"n_configs must be a positive integer, got {n_configs!r}")
    return int(n_configs)

"""The resumable output of the reference generators (`scripts/make_reference_data.py`).

Two ways to be resumable, one module:

* Chunk sets (GFN2-xTB NaCl, `xtb_nacl`; OpenMM NaCl melts, `openmm_ions`): the work is split
  into independent, seeded chunks, each written to its own file atomically (`write_atomic`: a
  chunk file exists only once it is complete). `run_chunks` computes the missing ones, serially
  or on worker processes, so a killed run resumes at the first missing chunk and any number of
  workers gives the same files. `check_plan` keeps chunks of different plans out of one folder.
* Appended frame files (AMOEBA water, `amoeba_water`): frames are appended one at a time;
  `complete_frames` counts the complete extxyz frames (cutting off a partly written last one)
  and `save_checkpoint` / `load_checkpoint` keep the MD state that belongs to exactly that many
  frames next to the file (``<out>.ckpt.npz``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

__all__ = ["partial_path", "write_atomic", "write_text", "check_plan", "run_chunks", "progress_bar",
           "complete_frames", "append_frame", "read_frame", "checkpoint_path", "save_checkpoint",
           "load_checkpoint"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------
def partial_path(path: Path) -> Path:
    """The temporary sibling a file is written to before it is renamed: ``<name>.partial``."""
    return path.with_name(path.name + ".partial")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole file to a temporary sibling, which is then renamed to
    `path`: `path` exists only once it is complete (a stale or torn temporary is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    if tmp.exists():
        tmp.unlink()
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, parts: Iterable[str]) -> None:
    """Write the concatenated text `parts` (e.g. extxyz frames) to `path` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.writelines(parts)

    write_atomic(path, write)


# --------------------------------------------------------------------------------------------
# Chunk sets
# --------------------------------------------------------------------------------------------
def check_plan(folder: Path, text: str) -> None:
    """Refuse to mix chunks of different plans in one folder: `text` (the plan's repr) is kept
    in ``folder/plan.txt`` by the first run and must match in every later one."""
    sig = Path(folder) / "plan.txt"
    if sig.exists() and sig.read_text() != text:
        raise ValueError(f"{folder} holds chunks of a different plan; remove it or use another output")
    if not sig.exists():
        sig.write_text(text)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar counting frames (disabled: silent)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="frame", disable=not enabled)


def run_chunks(paths: Sequence[Path], sizes: Sequence[int], jobs: Sequence[Any], work: Callable[[Any], int],
               desc: str, progress: bool = True, workers: int = 1, stop_after: Optional[int] = None) -> bool:
    """Compute the missing chunks of a set and say whether the set is now complete.

    Chunk c is complete when `paths[c]` exists; `work(jobs[c])` computes it, writes it to
    `paths[c]` with `write_atomic` and returns its number of frames (`sizes[c]` is what the bar
    counts; chunks of size 0 are never computed). `work` must be a module-level function when
    `workers` > 1 (the pool spawns fresh interpreters). `stop_after` computes at most that many
    chunks in this call (an interrupted run, for tests).
    """
    todo = [jobs[c] for c in range(len(paths)) if sizes[c] > 0 and not Path(paths[c]).exists()]
    if stop_after is not None:
        todo = todo[: int(stop_after)]
    done = sum(s for s, p in zip(sizes, paths) if Path(p).exists())
    bar = progress_bar(int(sum(sizes)), done, desc, progress)
    try:
        if workers > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(work, todo):
                    bar.update(n)
        else:
            for job in todo:
                bar.update(work(job))
    finally:
        bar.close()
    return all(Path(p).exists() for s, p in zip(sizes, paths) if s > 0)


# --------------------------------------------------------------------------------------------
# Appended frame files: count / truncate / append / checkpoint
# --------------------------------------------------------------------------------------------
def complete_frames(path: Path, n_atoms: Optional[int] = None, atoms_per_molecule: int = 1) -> int:
    """Number of complete extxyz frames in `path`; a partly written last frame is cut off.

    Raises ValueError when a header is not a number, a frame has other than `n_atoms` atoms
    (when given) or a number of atoms that is not a multiple of `atoms_per_molecule`.
    """
    path = Path(path)
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
        if n <= 0 or n % atoms_per_molecule:
            raise ValueError(f"{path}: frame {count} has {n} atoms, not whole molecules of {atoms_per_molecule}")
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


def append_frame(path: Path, atoms) -> None:
    """Append one ase.Atoms frame to the extxyz file `path` (created with its folder)."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path), atoms, format="extxyz", append=True)


def read_frame(path: Path, index: int, source: str):
    """Frame `index` of `path`; ValueError unless its info ``source`` is `source` (the file was
    written by another generator)."""
    import ase.io

    atoms = ase.io.read(str(path), index=index, format="extxyz")
    found = atoms.info.get("source")
    if found != source:
        raise ValueError(f"{path}: frames were not written by this generator (source={found!r})")
    return atoms


def checkpoint_path(path: Path) -> Path:
    """Where the MD state of an appended frame file is kept: ``<out>.ckpt.npz``."""
    return path.with_name(path.name + ".ckpt.npz")


def save_checkpoint(path: Path, frames: int, state: bytes, signature: str) -> None:
    """Keep the MD `state` that belongs to the first `frames` frames of a run with `signature`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, frames=np.int64(frames), state=np.frombuffer(state, dtype=np.uint8),
                     signature=np.array(signature))

    write_atomic(checkpoint_path(path), write)


def load_checkpoint(path: Path, frames: int, signature: str) -> Optional[bytes]:
    """The saved MD state when it belongs to exactly `frames` frames of a run with `signature`."""
    target = checkpoint_path(path)
    if not target.exists():
        return None
    with np.load(target) as data:
        if int(data["frames"]) != frames or str(data["signature"]) != signature:
            log.warning("%s does not match the %d frames in the file or the arguments; "
                        "restarting the MD from the file instead", target, frames)
            return None
        return data["state"].tobytes()

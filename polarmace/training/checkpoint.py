"""Atomic, resumable checkpoints.

A checkpoint holds {model, optimizer, scheduler, EMA state, RNG states (torch, numpy, python,
cuda), epoch and step-in-epoch to resume at, best metric, history, resolved config, versions}.
Files are written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so a SIGKILL at any moment leaves either the previous or the
new checkpoint, never a truncated one. The newest ``keep`` checkpoints are kept.

File names: ``checkpoint-e{epoch:05d}-s{step:07d}.pt`` where (epoch, step) is the position to
resume at (step 0 = start of that epoch).
"""

from __future__ import annotations

import os
import platform
import random
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ModelFileError, output_error

_PATTERN = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


def versions() -> Dict[str, str]:
    import polarmace

    out = {"polarmace": getattr(polarmace, "__version__", "?"), "torch": torch.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    try:
        import e3nn  # noqa: F401

        out["e3nn"] = e3nn.__version__
    except ImportError:  # pragma: no cover - optional
        pass
    return out


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temporary file + fsync + os.replace: a kill never leaves a torn file.

    A failed write (no permission, not a directory, disk full) is an OutputError naming `path`
    (a full disk says "no space left on device", whatever torch.save reported)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = output_error(path, exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if error is not None:
            raise error from exc
        raise


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """torch.save to `path` atomically."""
    _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: os.PathLike) -> None:
    """Write `text` to `path` atomically."""
    _atomic_write(path, "w", lambda fh: fh.write(text))


class CheckpointHandler:
    """Saves, lists, prunes and loads the checkpoints of one run directory."""

    def __init__(self, directory: os.PathLike, keep: int = 3):
        self.directory = Path(directory)
        self.keep = max(int(keep), 1)

    def path_for(self, epoch: int, step: int) -> Path:
        return self.directory / f"checkpoint-e{epoch:05d}-s{step:07d}.pt"

    def list(self) -> List[Tuple[int, int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _PATTERN.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        found = self.list()
        return found[-1][2] if found else None

    def save(self, state: Dict[str, Any], epoch: int, step: int) -> Path:
        state = dict(state)
        state.setdefault("rng", rng_state())
        state.setdefault("versions", versions())
        state["epoch"], state["step"] = int(epoch), int(step)
        path = self.path_for(epoch, step)
        atomic_save(state, path)
        for _, _, old in self.list()[:-self.keep]:
            try:
                old.unlink()
            except FileNotFoundError:  # pragma: no cover
                pass
        return path

    def load(self, path: Optional[os.PathLike] = None, map_location: Any = "cpu") -> Dict[str, Any]:
        """Load `path` (default: the latest checkpoint). A corrupt file names itself."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # torch.load raises many kinds for a torn or foreign file
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelFileError(f"{path}: cannot read this checkpoint ({reason}); remove it to resume "
                                 f"from the one before") from exc

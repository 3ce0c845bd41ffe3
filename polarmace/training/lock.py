"""An exclusive lock on a run directory, so that two runs can never write the same files.

`RunLock(directory).acquire()` takes ``fcntl.flock`` on ``<directory>/.lock`` without waiting
and writes the holder (pid, host, start time, command) into it. A second process gets a
`RunLockedError` naming that holder. The kernel drops the lock when the holding process ends,
however it ends (a kill included), so a lock is never left stale; the file itself stays.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Union

from ..errors import OutputError, RunLockedError, output_error

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "RunExistsError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunExistsError(OutputError):
    """A new run was started in a directory that holds another run's checkpoints."""


class RunLock:
    """Exclusive, non-blocking lock of one run directory (see the module docstring)."""

    def __init__(self, directory: Union[str, Path], program: str = "polarmace") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.program = program
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError (held elsewhere) / OutputError (cannot write)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise (output_error(self.directory, exc) or exc) from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.directory} is in use by another run ({holder}); wait for it to "
                                     f"finish or choose another output.directory / output.name") from None
        self._fd = fd
        record = {"program": self.program, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            record = {}
        if not record:
            return "holder unknown"
        return (f"{record.get('program', '?')} pid {record.get('pid', '?')} on {record.get('host', '?')}, "
                f"started {record.get('started', '?')}")

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

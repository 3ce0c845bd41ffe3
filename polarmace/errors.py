"""The errors a user can fix: one base class, so that every CLI reports them the same way.

An `InputError` means the input was wrong (config, data, model file, device, output location),
not the code. Its message is one line that names the file, key, frame or setting. The command-
line tools print it as ``<prog>: error: <message>`` and exit with status 2 (see
`polarmace.cli.run_cli`); any other exception is a bug and keeps its traceback.

All are ValueErrors, so code that caught ValueError before keeps working.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["InputError", "ConfigError", "DataError", "ModelFileError", "DeviceError", "OutputError", "RunLockedError",
           "output_error", "resolve_device"]


class InputError(ValueError):
    """Bad user input; the message is one line naming the file, key, frame or setting."""


class ConfigError(InputError):
    """A configuration problem; the message names the dotted key."""


class DataError(InputError):
    """Bad input data; the message names the file, the frame and the problem."""


class ModelFileError(InputError):
    """A model file that is missing, truncated, of another kind, or not a polarmace model."""


class DeviceError(InputError):
    """A device that this torch build or machine does not have."""


class OutputError(InputError):
    """An output location that cannot be written (not a directory, no permission, disk full)."""


class RunLockedError(OutputError):
    """Another process holds the run directory."""


def _no_space(path: Path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) is full."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < 1024 * 1024
    except OSError:
        return False


def output_error(path: Union[str, Path], exc: BaseException) -> Optional[OutputError]:
    """An OutputError for a failed write of `path`, or None when `exc` is not an I/O problem.

    A full disk says "no space left on device" whatever the writer reported (torch.save, for
    one, reports it as ``inline_container.cc: unexpected pos``).
    """
    path = Path(path)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(exc, (OSError, RuntimeError)) and _no_space(path)):
        return OutputError(f"{path}: cannot write: no space left on device")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        where = exc.filename if exc.filename else path
        return OutputError(f"{where}: cannot write: {reason}")
    return None


def resolve_device(name: str, setting: str = "--device") -> Any:
    """torch.device(name), checked against this torch build and machine; a DeviceError naming
    `setting` (e.g. "training.device") when the device cannot be used."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{setting}: {name!r} is not a device (use cpu, cuda, cuda:0, ...): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support (torch " + torch.__version__ + ")"
                   if torch.version.cuda is None else "no CUDA device is visible")
            raise DeviceError(f"{setting}: {name!r} asked for, but {why}; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{setting}: {name!r} asked for, but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"{setting}: 'mps' asked for, but this machine or torch build has no MPS; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{setting}: device type {device.type!r} is not supported (use cpu or cuda)")
    return device

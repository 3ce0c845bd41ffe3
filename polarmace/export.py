"""TorchScript export of a PolarMACE model, and loading of either kind of model file.

`export_model(model, path)` scripts the model (`torch.jit.script`) and writes a TorchScript
archive that plain `torch.jit.load(path)` reads back **without importing polarmace** (only torch
is needed). The archive also carries a JSON metadata file, `polarmace.json` (read it with
`torch.jit.load(path, _extra_files={"polarmace.json": ""})`), holding r_max, the dtype, the
elements, eps_infty, whether electrostatics are on and the resolved config.

Calling the exported module
---------------------------
    out = module(graph, compute_forces: bool, compute_stress: bool, compute_bec: bool)

`graph` is a Dict[str, Tensor] (B structures, N atoms, E directed edges; float = the model's
dtype, see metadata "dtype"):

=================  ==========  =========  ======================================================
key                shape       dtype      meaning
=================  ==========  =========  ======================================================
positions          [N, 3]      float      Cartesian positions, Å
atomic_numbers     [N]         int64      Z of every atom (must be in metadata "elements")
batch              [N]         int64      structure index of every atom, sorted ascending
cell               [B, 3, 3]   float      rows are lattice vectors, Å (zeros when open)
pbc                [B, 3]      bool       periodic directions
edge_index         [2, E]      int64      row 0 centre i, row 1 neighbour j; all pairs with
                                          |r_ij| < r_max, both directions, periodic self-images
shifts             [E, 3]      float      integer lattice shifts: r_ij = r_j − r_i + shifts @ cell
total_charge       [B]         float      total charge, e (0 for neutral)
external_field     [B, 3]      float      external field, V/Å (open structures; 0 = none)
=================  ==========  =========  ======================================================

(`ptr` [B+1] and `num_atoms` [B], int64, are accepted and ignored.) The output is a
Dict[str, Tensor] as documented for `polarmace.model.PolarMACE.forward`: energy [B] eV,
node_energy [N] eV, forces [N,3] eV/Å, stress [B,3,3] eV/Å³ (ASE sign) and virials [B,3,3] eV
when compute_stress, and with electrostatics: charges [N] e, dipoles [N,3] e·Å, polarization
[B,3] e·Å, electrostatic_energy [B] eV, polarizability [B,3,3] Å³ (when the model has
polarizabilities), bec [N,3,3] e (when compute_bec).

The neighbour list is the caller's job (in Python: `polarmace.neighbours.neighbour_pairs`).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from polarmace.errors import ModelFileError

#: Name of the metadata file inside the TorchScript archive.
METADATA_NAME = "polarmace.json"
#: File suffixes treated as TorchScript without looking inside.
TORCHSCRIPT_SUFFIXES = (".ts", ".jit", ".torchscript")
#: Boolean attributes of PolarMACE that select branches of forward.
_FLAG_ATTRIBUTES = ("electrostatics_on", "use_charges", "use_dipoles", "use_quadrupoles",
                    "use_induced_charges", "use_induced_dipoles", "anisotropic",
                    "learned_total_charge")


class ExportError(RuntimeError):
    """Scripting the model failed; the message names the first frame inside polarmace."""


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters (float64 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.float64


def model_metadata(model: torch.nn.Module) -> Dict[str, Any]:
    """The metadata stored next to an exported model (JSON-serialisable)."""
    config = getattr(model, "config", {}) or {}
    dtype = model_dtype(model)
    return {
        "format": "polarmace-torchscript",
        "format_version": 1,
        "r_max": float(model.r_max),
        "dtype": str(dtype).replace("torch.", ""),
        "elements": list(config.get("model", {}).get("elements") or []),
        "eps_infty": float(getattr(model, "eps_infty", 0.0)),
        "electrostatics": bool(getattr(model, "electrostatics_on", False)),
        "config": json.loads(json.dumps(config, default=str)),
    }


def script_model(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """`torch.jit.script` of a copy of `model` in eval mode (the original is untouched)."""
    import copy

    clone = copy.deepcopy(model).eval()
    # Branch flags as TorchScript constants, so that branches of switched-off terms (whose
    # modules are nn.Identity placeholders) are not compiled.
    flags = [name for name in _FLAG_ATTRIBUTES if isinstance(getattr(clone, name, None), bool)]
    if flags:
        clone.__constants__ = sorted(set(getattr(clone, "__constants__", ())) | set(flags))
    for p in clone.parameters():
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(clone)
    except Exception as exc:  # scripting raises several types; re-raise with a short summary
        first = str(exc).strip().splitlines()
        summary = next((line for line in first if line.strip()), repr(exc))
        raise ExportError(f"torch.jit.script failed: {type(exc).__name__}: {summary}\n{exc}") from exc


def export_model(model: Union[torch.nn.Module, str, Path], path: Union[str, Path]) -> Path:
    """Script `model` (a PolarMACE or a path to a saved one) and write a TorchScript archive
    with `polarmace.json` metadata to `path`. Returns the path. Raises ExportError when the
    model cannot be scripted."""
    if isinstance(model, (str, Path)):
        from polarmace.model import PolarMACE

        model = PolarMACE.load(str(model))
    scripted = script_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(model_metadata(model))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: meta})
    except RuntimeError as exc:  # e.g. a @torch.jit.ignore'd Python call left in the graph
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise ExportError(f"torch.jit.save failed: {first}\n{exc}") from exc
    return path


def is_torchscript_file(path: Union[str, Path]) -> bool:
    """True for TorchScript archives (by suffix, or by the `code/` folder inside the zip)."""
    path = Path(path)
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _is_trainer_checkpoint(path: Path) -> bool:
    """Whether a torch zip archive holds a polarmace-train checkpoint (looked up in the pickle's
    bytes, never unpickled: a checkpoint needs weights_only=False)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            raw = archive.read(name) if name else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return False
    return all(key in raw for key in (b"optimizer", b"rng", b"history"))


def read_model_file(path: Union[str, Path], map_location: str = "cpu") -> Dict[str, Any]:
    """The dict written by `PolarMACE.save` (format_version, config, state_dict, dtype, versions).

    Raises ModelFileError naming the file when it is missing, empty, truncated, an exported
    TorchScript file, a polarmace-train checkpoint, or anything else that is not a model file.
    """
    path = Path(path)
    hint = "use the model file polarmace-train writes (<run directory>/<name>.model)"
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file, not a polarmace model; {hint}")
    if zipfile.is_zipfile(path) and is_torchscript_file(path):
        raise ModelFileError(f"{path}: an exported TorchScript model, which only the calculator, polarmace-md, "
                             f"polarmace-spectra and polarmace-driver read; {hint}")
    if _is_trainer_checkpoint(path):
        raise ModelFileError(f"{path}: a polarmace-train checkpoint (weights + optimizer state), not a model "
                             f"file; {hint}, or resume the run with --resume")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds (RuntimeError, EOFError, KeyError, ...)
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        reason = "truncated or corrupt" if zipped else "not a torch file"
        raise ModelFileError(f"{path}: cannot read the model file ({reason}: {first[:120]}); {hint}") from exc
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ModelFileError(f"{path}: holds no 'config'/'state_dict': not a polarmace model file; {hint}")
    return blob


def load_torchscript(path: Union[str, Path], map_location: str = "cpu") -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """(module, metadata) of an exported file; metadata is {} when the archive has none."""
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    raw = extra[METADATA_NAME]
    meta = json.loads(raw) if raw else {}
    if "r_max" not in meta and hasattr(module, "r_max"):
        meta["r_max"] = float(module.r_max)
    return module.eval(), meta


def load_any(path: Union[str, Path], map_location: str = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load a saved PolarMACE (`model.save`) or an exported TorchScript file.

    Returns (module, metadata) with metadata as in `model_metadata`."""
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such model file")
    if is_torchscript_file(path):
        try:
            return load_torchscript(path, map_location)
        except RuntimeError as exc:  # a torn archive
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelFileError(f"{path}: cannot read this TorchScript file ({first[:120]})") from exc
    from polarmace.model import PolarMACE

    model = PolarMACE.load(str(path), map_location=map_location)
    return model, model_metadata(model)

"""Export a mace-torch model to a neutral file that polarmace reads without MACE code.

Run it with the Python of an environment that has mace-torch (it pins e3nn 0.4.x):

    /path/to/mace-venv/bin/python scripts/export_mace_weights.py my.model -o my.mace.npz
    polarmace-import-mace my.mace.npz -o my.pt [--variant les]

The output is one NumPy .npz archive (read with allow_pickle=False): every tensor of the model's
state dict under its own name, and one member ``__meta__`` holding UTF-8 JSON with

* ``format`` / ``format_version``; mace, e3nn and torch versions; the model class;
* the hyper-parameters (r_max, atomic numbers, heads, radial basis, cutoff, interaction and
  readout classes, E0s, scale and shift, ...);
* ``modules``: for every submodule its class name and, for the e3nn pieces, what the weight layout
  depends on (irreps, instructions with their path weights, the normalisation constant of each
  normalised activation, the layer sizes of the radial MLPs);
* ``tensors``: the name, shape and dtype of every array, so that an incomplete file is refused
  before any weights are built.

Nothing is pickled; the script only reads the model (no MACE code is copied into polarmace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

FORMAT = "polarmace-mace-export"
FORMAT_VERSION = 1


def _irreps(x: Any) -> str:
    return str(x) if x is not None else ""


def _module_record(mod: Any) -> Dict[str, Any]:
    """What the weight layout of one submodule depends on (e3nn 0.4 attributes)."""
    rec: Dict[str, Any] = {"class": type(mod).__module__ + "." + type(mod).__name__}
    name = type(mod).__name__
    if hasattr(mod, "irreps_in") and hasattr(mod, "irreps_out") and hasattr(mod, "instructions") \
            and not hasattr(mod, "irreps_in1"):  # o3.Linear
        rec["irreps_in"] = _irreps(mod.irreps_in)
        rec["irreps_out"] = _irreps(mod.irreps_out)
        rec["instructions"] = [[int(i.i_in), int(i.i_out), list(map(int, i.path_shape)), float(i.path_weight)]
                               for i in mod.instructions]
        rec["biases"] = bool(getattr(mod, "biases", False)) if isinstance(getattr(mod, "biases", False), bool) \
            else any(bool(b) for b in mod.biases)
    if hasattr(mod, "irreps_in1") and hasattr(mod, "instructions"):  # o3.TensorProduct and subclasses
        rec["irreps_in1"] = _irreps(mod.irreps_in1)
        rec["irreps_in2"] = _irreps(mod.irreps_in2)
        rec["irreps_out"] = _irreps(mod.irreps_out)
        rec["instructions"] = [[int(i.i_in1), int(i.i_in2), int(i.i_out), str(i.connection_mode), bool(i.has_weight),
                                float(i.path_weight), list(map(int, i.path_shape))] for i in mod.instructions]
        rec["shared_weights"] = bool(getattr(mod, "shared_weights", True))
        rec["internal_weights"] = bool(getattr(mod, "internal_weights", True))
    if name == "normalize2mom":
        rec["cst"] = float(mod.cst)
        rec["is_id"] = bool(mod._is_id)  # pylint: disable=protected-access
        f = getattr(mod, "f", None)
        rec["f"] = getattr(f, "__name__", type(f).__name__)
    if name == "_Layer":  # e3nn FullyConnectedNet layer
        rec.update(h_in=int(mod.h_in), h_out=int(mod.h_out), var_in=float(mod.var_in), var_out=float(mod.var_out),
                   has_act=mod.act is not None)
    if name == "FullyConnectedNet":
        rec["hs"] = [int(h) for h in mod.hs]
    if name == "SphericalHarmonics":
        rec.update(irreps_out=_irreps(mod.irreps_out), normalize=bool(mod.normalize),
                   normalization=str(mod.normalization))
    if name == "Contraction":
        rec["correlation"] = int(mod.correlation)
        rec["num_features"] = int(mod.num_features)
        rec["coupling_irreps"] = _irreps(mod.coupling_irreps)
    if name == "SymmetricContraction":
        rec["irreps_in"] = _irreps(mod.irreps_in)
        rec["irreps_out"] = _irreps(mod.irreps_out)
    if name == "PolynomialCutoff":
        rec["p"] = float(mod.p)
        rec["r_max"] = float(mod.r_max)
    if name.endswith("InteractionBlock"):
        rec["avg_num_neighbors"] = float(mod.avg_num_neighbors)
        for key in ("node_feats_irreps", "target_irreps", "hidden_irreps", "edge_irreps", "node_attrs_irreps",
                    "edge_attrs_irreps", "edge_feats_irreps"):
            if hasattr(mod, key):
                rec[key] = _irreps(getattr(mod, key))
        rec["radial_MLP"] = [int(h) for h in getattr(mod, "radial_MLP", [])]
        rec["conv_fusion"] = bool(getattr(mod, "conv_fusion", False))
    if name == "EquivariantProductBasisBlock":
        rec["use_sc"] = bool(mod.use_sc)
        rec["use_agnostic_product"] = bool(getattr(mod, "use_agnostic_product", False))
    if name in ("NonLinearReadoutBlock", "LinearReadoutBlock"):
        rec["num_heads"] = int(getattr(mod, "num_heads", 1))
        if hasattr(mod, "hidden_irreps"):
            rec["hidden_irreps"] = _irreps(mod.hidden_irreps)
    if name == "RadialEmbeddingBlock":
        rec["apply_cutoff"] = bool(getattr(mod, "apply_cutoff", True))
        rec["distance_transform"] = type(mod.distance_transform).__name__ if hasattr(mod, "distance_transform") else None
        rec["basis"] = type(mod.bessel_fn).__name__
    if hasattr(mod, "cueq_config") and getattr(mod, "cueq_config", None) is not None:
        rec["cueq_enabled"] = bool(getattr(mod.cueq_config, "enabled", False))
    if hasattr(mod, "oeq_config") and getattr(mod, "oeq_config", None) is not None:
        rec["oeq_enabled"] = bool(getattr(mod.oeq_config, "enabled", True))
    return rec


def _tolist(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy().tolist()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).tolist()
    return x


def describe(model: Any) -> Dict[str, Any]:
    """The hyper-parameters and module records of a loaded mace-torch model (JSON-serialisable)."""
    import mace  # before e3nn: it makes e3nn 0.4's constants loadable under torch >= 2.6
    import e3nn
    import torch

    modules = {name: _module_record(mod) for name, mod in model.named_modules(remove_duplicate=False)}
    heads = list(getattr(model, "heads", None) or ["Default"])
    meta: Dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "versions": {"mace": str(getattr(mace, "__version__", "?")), "e3nn": str(e3nn.__version__),
                     "torch": str(torch.__version__)},
        "model_class": type(model).__name__,
        "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
        "r_max": float(model.r_max),
        "num_interactions": int(model.num_interactions),
        "heads": heads,
        "atomic_energies": _tolist(torch.atleast_2d(model.atomic_energies_fn.atomic_energies)),  # [heads, Z]
        "pair_repulsion": bool(hasattr(model, "pair_repulsion")),
        "joint_embedding": bool(hasattr(model, "joint_embedding")),
        "embedding_readout": bool(hasattr(model, "embedding_readout")),
        "use_so3": bool(getattr(model, "use_so3", False)),
        "use_reduced_cg": bool(getattr(model, "use_reduced_cg", False)),
        "use_agnostic_product": bool(getattr(model, "use_agnostic_product", False)),
        "use_last_readout_only": bool(getattr(model, "use_last_readout_only", False)),
        "edge_irreps": _irreps(getattr(model, "edge_irreps", None)),
        "apply_cutoff": bool(getattr(model, "apply_cutoff", True)),
        "num_readouts": len(model.readouts),
        "modules": modules,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if hasattr(model, "scale_shift"):
        meta["scale"] = _tolist(torch.atleast_1d(model.scale_shift.scale))
        meta["shift"] = _tolist(torch.atleast_1d(model.scale_shift.shift))
    return meta


def export(model: Any, path: Path) -> Dict[str, Any]:
    """Write `model` (a loaded mace-torch module) to `path` (.npz); returns the metadata."""
    meta = describe(model)
    arrays: Dict[str, np.ndarray] = {}
    listing: List[Dict[str, Any]] = []
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        if a.dtype == np.float32:
            a = a.astype(np.float64)  # exact; the importer works in float64
        arrays[name] = np.array(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        listing.append({"name": name, "shape": list(a.shape), "dtype": str(a.dtype)})
    if "__meta__" in arrays:
        raise ValueError("a state-dict entry is called __meta__")
    meta["tensors"] = listing
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, __meta__=blob, **arrays)
    tmp.replace(path)
    return meta


def load_mace_model(path: str) -> Any:
    """A mace-torch model file (a pickled module, as mace_run_train writes it) on the CPU."""
    import mace  # noqa: F401  (before e3nn, see describe)
    import torch

    model = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(model, dict) and "model" in model:
        model = model["model"]
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"{path}: not a MACE model file (found {type(model).__name__})")
    return model.cpu().eval()


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(prog="export_mace_weights.py", description=__doc__.split("\n")[0])
    p.add_argument("model", help="mace-torch model file (torch.save of the module, e.g. mace_run_train's .model)")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    args = p.parse_args(argv)
    meta = export(load_mace_model(args.model), Path(args.output))
    print(f"wrote {args.output}: {meta['model_class']} (mace {meta['versions']['mace']}), "
          f"{len(meta['tensors'])} tensors, elements {meta['atomic_numbers']}, heads {meta['heads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

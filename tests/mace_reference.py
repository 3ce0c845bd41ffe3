"""Run with the MACE environment's python (tests/unit/nn/test_mace_import.py does): build random mace-torch
models from JSON specs, save them (.model), export them with scripts/export_mace_weights.py and
evaluate energy, forces and stress with mace-torch itself on the structures of an extxyz file.

    python tests/mace_reference.py SPECS.json STRUCTURES.xyz OUTDIR

For every spec {"name": ..., hyper-parameters ...} it writes OUTDIR/<name>.model,
OUTDIR/<name>.npz (the export) and OUTDIR/<name>.ref.npz (energy [B], forces [N,3], stress
[B,3,3], per head when the model has several heads: keys energy_<head>, ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def build(spec: dict):
    from mace import modules  # first: it makes e3nn 0.4's constants loadable under torch >= 2.6
    from e3nn import o3

    torch.manual_seed(int(spec.get("seed", 0)))
    zs = [int(z) for z in spec["atomic_numbers"]]
    heads = spec.get("heads", ["Default"])
    nz, nh = len(zs), len(heads)
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    e0 = rng.normal(size=(nh, nz)) if nh > 1 else rng.normal(size=nz)
    first = "RealAgnosticResidualInteractionBlock" if spec.get("residual_first") else "RealAgnosticInteractionBlock"
    kwargs = dict(
        r_max=float(spec.get("r_max", 4.0)), num_bessel=int(spec.get("num_bessel", 8)),
        num_polynomial_cutoff=int(spec.get("num_polynomial_cutoff", 5)), max_ell=int(spec["max_ell"]),
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes[first],
        num_interactions=int(spec["num_interactions"]), num_elements=nz,
        hidden_irreps=o3.Irreps(spec["hidden_irreps"]), MLP_irreps=o3.Irreps(spec.get("MLP_irreps", "16x0e")),
        atomic_energies=e0, avg_num_neighbors=float(spec.get("avg_num_neighbors", 7.3)), atomic_numbers=zs,
        correlation=int(spec["correlation"]), gate=torch.nn.functional.silu,
        radial_MLP=list(spec.get("radial_MLP", [16, 16])), use_reduced_cg=bool(spec.get("use_reduced_cg", False)),
        heads=heads,
    )
    for key in ("pair_repulsion", "distance_transform", "radial_type", "use_last_readout_only", "use_agnostic_product"):
        if key in spec:
            kwargs[key] = spec[key]
    if spec.get("model", "ScaleShiftMACE") == "ScaleShiftMACE":
        scale = rng.uniform(0.5, 2.0, size=nh) if nh > 1 else float(rng.uniform(0.5, 2.0))
        shift = rng.normal(size=nh) if nh > 1 else float(rng.normal())
        model = modules.ScaleShiftMACE(atomic_inter_scale=scale, atomic_inter_shift=shift, **kwargs)
    else:
        model = modules.MACE(**kwargs)
    with torch.no_grad():  # random (not zero) product weights everywhere, also the ν = 1 ones
        for name, p in model.named_parameters():
            if "symmetric_contractions" in name and p.requires_grad:
                p.copy_(torch.randn_like(p) / max(p.shape[1], 1) ** 0.5)
    return model.double().eval()


def evaluate(model, frames, head: str) -> dict:
    from mace import data as mdata
    from mace.tools import AtomicNumberTable, torch_geometric

    table = AtomicNumberTable([int(z) for z in model.atomic_numbers.tolist()])
    heads = list(getattr(model, "heads", ["Default"]))
    configs = [mdata.config_from_atoms(a, head_name=head) for a in frames]
    ds = [mdata.AtomicData.from_config(c, z_table=table, cutoff=float(model.r_max), heads=heads) for c in configs]
    batch = torch_geometric.batch.Batch.from_data_list(ds)
    out = model(batch.to_dict(), training=False, compute_force=True, compute_stress=True)
    return {"energy": out["energy"].detach().numpy(), "forces": out["forces"].detach().numpy(),
            "stress": out["stress"].detach().numpy()}


def main() -> int:
    import ase.io
    from export_mace_weights import export

    torch.set_default_dtype(torch.float64)
    specs = json.loads(Path(sys.argv[1]).read_text())
    frames = ase.io.read(sys.argv[2], ":")
    out = Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        model = build(spec)
        torch.save(model, out / f"{spec['name']}.model")
        export(model, out / f"{spec['name']}.npz")
        ref = {}
        for head in spec.get("heads", ["Default"]):
            suffix = "" if len(spec.get("heads", ["Default"])) == 1 else f"_{head}"
            for k, v in evaluate(model, frames, head).items():
                ref[k + suffix] = v
        np.savez(out / f"{spec['name']}.ref.npz", **ref)
        print("built", spec["name"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

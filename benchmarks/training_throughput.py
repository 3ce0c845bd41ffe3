"""Training throughput: configurations per second and peak memory for one training epoch.

Data: 192-atom water-like cells made by perturbing ../shared/datasets/water_structures/liquid-64.xyz
(or --structure FILE), labelled by a cheap calculator (ASE EMT: energy, forces, stress). Each
(preset, variant) is measured in its own subprocess so that peak memory (max RSS on CPU,
torch.cuda.max_memory_allocated on GPU) belongs to that run alone. One warm-up step is excluded.

    python benchmarks/training_throughput.py                       # small + default, sr + uQiqiu
    python benchmarks/training_throughput.py --presets small --variants sr --configs 8
    python benchmarks/training_throughput.py --model-factory toy_model:build_toy_model  # (tests/ on path)

If `mace-torch` is importable (its own environment: --mace-python PATH), its throughput on the
same data at the same settings is measured too and the ratio printed (target: >= 2x MACE).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STRUCTURE = ROOT.parent / "shared" / "datasets" / "water_structures" / "liquid-64.xyz"

PRESETS = {
    # MACE default size
    "default": {"hidden_irreps": "128x0e+128x1o", "max_ell": 3, "correlation": 3, "num_interactions": 2,
                "r_max": 5.0, "num_bessel": 8, "radial_mlp": [64, 64, 64]},
    # a small CPU preset
    "small": {"hidden_irreps": "32x0e+32x1o", "max_ell": 2, "correlation": 2, "num_interactions": 2,
              "r_max": 4.5, "num_bessel": 8, "radial_mlp": [32, 32]},
}


def make_data(structure: Path, n: int, out: Path, seed: int = 0) -> Path:
    import ase.io
    import numpy as np
    from ase.calculators.emt import EMT

    base = ase.io.read(str(structure))
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = base.copy()
        a.positions += 0.05 * rng.standard_normal(a.positions.shape)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
        a.calc = None
        a.info["energy"], a.info["stress"] = e, s
        a.arrays["forces"] = f
        frames.append(a)
    ase.io.write(str(out), frames, format="extxyz")
    return out


def _import(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def measure(args) -> dict:
    """One (preset, variant) in this process: time one epoch of training steps."""
    import numpy as np
    import torch

    from polarmace.config import load_config
    from polarmace.training import distributed as ddp
    from polarmace.training.loss import WeightedLoss
    from polarmace.config import Config
    from polarmace.data.batching import epoch_batches, to_device
    from polarmace.data.graph import collate
    from polarmace.data.sources import open_source
    from polarmace.data.statistics import compute_statistics
    from polarmace.training.loop import train_step
    from polarmace.training.policy import build_optimizer

    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model_cfg = dict(PRESETS[args.preset])
    model_cfg["dtype"] = args.dtype
    cfg = load_config({"model": model_cfg, "long_range": {"variant": args.variant},
                       "data": {"train": args.data, "batch_size": args.batch_size},
                       "training": {"lr": 0.005, "device": args.device}}).to_dict()
    conf = Config.from_dict(cfg)
    data = open_source(args.data, conf.data)
    stats = compute_statistics(data, conf.model)
    cfg["model"].update(elements=stats["elements"], e0s=stats["e0s"], avg_num_neighbors=stats["avg_num_neighbors"])
    factory = _import(args.model_factory) if args.model_factory else _import("polarmace:build_model")
    model = factory(cfg, statistics=stats).to(device)
    loss_fn = WeightedLoss({"energy": 1.0, "forces": 100.0, "stress": 1.0})
    loss_fn.resolve(stats["labels"].keys(), log_active=False)
    opt = build_optimizer(model, conf.training)
    batches = epoch_batches(len(data), args.batch_size, 1, 0)
    graphs = [to_device(collate([data[i] for i in b], float(cfg["model"]["r_max"])), device, dtype)
              for b in batches]
    info = ddp.DistInfo()
    train_step(model, opt, loss_fn, graphs[0], info, 10.0, None, dtype, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for g in graphs:
        train_step(model, opt, loss_fn, g, info, 10.0, None, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_conf = sum(len(b) for b in batches)
    return {"preset": args.preset, "variant": args.variant, "configs": n_conf, "atoms_per_config": int(data[0].num_atoms),
            "batch_size": args.batch_size, "epoch_s": wall, "configs_per_s": n_conf / wall, "peak_mb": peak_mb,
            "parameters": int(sum(p.numel() for p in model.parameters())), "device": args.device, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "edges_per_config": float(np.mean([g["edge_index"].shape[1] for g in graphs]))
            / max(1.0, float(np.mean([len(b) for b in batches])))}


def measure_mace(args) -> dict:
    """mace-torch on the same data and settings (run with its own python via --mace-python)."""
    code = f"""
import json, time, resource, torch, ase.io, numpy as np
from mace import data as mdata, modules, tools
from mace.tools import torch_geometric
from e3nn import o3
torch.set_default_dtype(torch.{args.dtype})
p = {PRESETS[args.preset]!r}
frames = ase.io.read({args.data!r}, ":")
zs = sorted(set(int(z) for a in frames for z in a.numbers))
table = tools.AtomicNumberTable(zs)
configs = mdata.config_from_atoms_list(frames, key_specification=None) if False else [mdata.config_from_atoms(a) for a in frames]
ds = [mdata.AtomicData.from_config(c, z_table=table, cutoff=p["r_max"]) for c in configs]
loader = torch_geometric.dataloader.DataLoader(ds, batch_size={args.batch_size}, shuffle=False)
model = modules.ScaleShiftMACE(r_max=p["r_max"], num_bessel=p["num_bessel"], num_polynomial_cutoff=5, max_ell=p["max_ell"],
    interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
    interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
    num_interactions=p["num_interactions"], num_elements=len(zs), hidden_irreps=o3.Irreps(p["hidden_irreps"]),
    MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(zs)), avg_num_neighbors=40.0, atomic_numbers=zs,
    correlation=p["correlation"], gate=torch.nn.functional.silu, radial_MLP=p["radial_mlp"], atomic_inter_scale=1.0, atomic_inter_shift=0.0)
opt = torch.optim.Adam(model.parameters(), lr=0.005, amsgrad=True)
def step(b):
    opt.zero_grad()
    out = model(b.to_dict(), training=True, compute_force=True, compute_stress=True)
    loss = ((out["energy"] - b.energy) ** 2).mean() + 100 * ((out["forces"] - b.forces) ** 2).mean()
    loss.backward(); opt.step()
batches = list(loader)
step(batches[0])
t0 = time.perf_counter()
for b in batches: step(b)
wall = time.perf_counter() - t0
print("RESULT", json.dumps({{"configs_per_s": len(ds) / wall, "epoch_s": wall,
      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    python = args.mace_python or sys.executable
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--structure", type=Path, default=DEFAULT_STRUCTURE)
    p.add_argument("--configs", type=int, default=16, help="configurations in the epoch")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--presets", nargs="+", default=["small", "default"], choices=sorted(PRESETS))
    p.add_argument("--variants", nargs="+", default=["sr", "uQiqiu"])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-factory", default=None, help="module:function (default polarmace.build_model)")
    p.add_argument("--mace", action="store_true", help="also measure mace-torch when importable")
    p.add_argument("--mace-python", default=None, help="python of an environment with mace-torch")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    # internal: one measurement in this process
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(measure(args)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(args.structure, args.configs, Path(tmp) / "water.xyz")
        for preset in args.presets:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--single", "--data", str(data), "--preset", preset, "--variant", variant,
                       "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device]
                if args.model_factory:
                    cmd += ["--model-factory", args.model_factory]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                row = {"preset": preset, "variant": variant}
                for line in proc.stdout.splitlines():
                    if line.startswith("RESULT "):
                        row = json.loads(line[7:])
                if "configs_per_s" not in row:
                    row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                if args.mace and variant == "sr":
                    args.preset, args.data = preset, str(data)
                    row["mace"] = measure_mace(args)
                results.append(row)
                print(_line(row), flush=True)
    base = {r["preset"]: r for r in results if r.get("variant") == args.variants[0] and "configs_per_s" in r}
    print("\nratios (throughput relative to the first variant of the same preset; >1 = faster):")
    for r in results:
        if "configs_per_s" in r and r["preset"] in base:
            b = base[r["preset"]]
            line = (f"  {r['preset']:8s} {r['variant']:8s} {r['configs_per_s'] / b['configs_per_s']:.3f}x throughput, "
                    f"{r['peak_mb'] / b['peak_mb']:.3f}x peak memory")
            m = r.get("mace", {})
            if "configs_per_s" in m:
                line += f"; vs MACE {r['configs_per_s'] / m['configs_per_s']:.2f}x (target >= 2x)"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _line(r: dict) -> str:
    if "configs_per_s" not in r:
        return f"{r['preset']:8s} {r['variant']:8s} FAILED: {r.get('error')}"
    s = (f"{r['preset']:8s} {r['variant']:8s} {r['configs']} x {r['atoms_per_config']} atoms, batch {r['batch_size']}: "
         f"{r['configs_per_s']:.3f} configs/s ({r['epoch_s']:.1f} s/epoch), peak {r['peak_mb']:.0f} MB, "
         f"{r['parameters']} parameters, {r['edges_per_config']:.0f} edges/config, {r['threads']} threads")
    m = r.get("mace")
    if m:
        s += f" | MACE: {m.get('configs_per_s', float('nan')):.3f} configs/s" if "configs_per_s" in m else f" | MACE: {m}"
    return s


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput at equal work: polarmace against mace-torch, training steps on the same
data with the same loss terms, optimiser and clipping, CPU and wall time, interleaved.

Data: 192-atom water cells made by perturbing ../shared/datasets/water_structures/liquid-64.xyz
(or --structure FILE), labelled by ASE's EMT (energy, forces, stress), written to one extxyz.
Both sides read the real labels (MACE through a key specification) and run the same step:

    loss = mean_b((E_b − E_b^ref)/N_b)² + 100·mean|F − F^ref|² + 1·mean(σ − σ^ref)²
    backward (forces and stress inside the loss: second derivatives), clip_grad_norm 10, Adam (amsgrad)

with the same trunk (MACE's non-residual first block, as `mace_run_train --model MACE`, or the
residual one on both sides with --residual-first), `avg_num_neighbors` measured on the data
(edges per atom) for both, float64. Each measurement is a fresh subprocess (--warmup steps
excluded, then --steps timed steps: median wall and process CPU time per step, peak-minus-base
resident memory); the implementations alternate round by round (--rounds), with
OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads burn CPU on a loaded machine). On a shared,
loaded machine compare CPU times; wall times are printed too.

    python benchmarks/training_throughput.py --mace-python ../mace-venv/bin/python
    python benchmarks/training_throughput.py --presets small --variants sr les --steps 4 --rounds 1
    python benchmarks/training_throughput.py --mace-python PY --json benchmarks/results/training_throughput.json

Variants other than sr are measured on the polarmace side only (MACE has no electrostatics):
their ratio to sr is the cost of the long-range part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
WEIGHTS = {"energy": 1.0, "forces": 100.0, "stress": 1.0}
CLIP = 10.0
LR = 0.005


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


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2.0 ** 20


def _loss(energy, forces, stress, e_ref, f_ref, s_ref, n_atoms):
    le = (((energy - e_ref) / n_atoms) ** 2).mean()
    lf = ((forces - f_ref) ** 2).mean()
    ls = ((stress - s_ref) ** 2).mean()
    return WEIGHTS["energy"] * le + WEIGHTS["forces"] * lf + WEIGHTS["stress"] * ls


def _timed(step, batches, warmup: int, steps: int) -> dict:
    import resource

    base = _rss_mib()
    for k in range(warmup):
        step(batches[k % len(batches)])
    walls, cpus = [], []
    for k in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step(batches[(warmup + k) % len(batches)])
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open("/proc/loadavg") as fh:
        load = float(fh.read().split()[0])
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "wall_min_s": min(walls),
            "cpu_min_s": min(cpus), "peak_mib": peak, "base_mib": base, "peak_minus_base_mib": peak - base,
            "loadavg": load, "steps": steps, "warmup": warmup}


def measure_polarmace(args) -> dict:
    """polarmace training steps in this process."""
    import numpy as np
    import torch

    from polarmace import build_model
    from polarmace.config import load_config
    from polarmace.data.atoms import KeySpec, read_configurations
    from polarmace.data.graph import collate

    if args.tune_allocator:
        from polarmace.runtime import tune_allocator

        tune_allocator()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    p = PRESETS[args.preset]
    configs = read_configurations(args.data, KeySpec())
    graphs = [collate(configs[i:i + args.batch_size], p["r_max"]) for i in range(0, len(configs), args.batch_size)]
    edges = sum(int(g["edge_index"].shape[1]) for g in graphs)
    atoms = sum(int(g["positions"].shape[0]) for g in graphs)
    zs = sorted({int(z) for g in graphs for z in g["atomic_numbers"].tolist()})
    from ase.data import chemical_symbols

    model_cfg = dict(p, dtype="float64", elements=[chemical_symbols[z] for z in zs],
                     e0s={chemical_symbols[z]: 0.0 for z in zs}, avg_num_neighbors=edges / atoms,
                     residual_first_block=bool(args.residual_first))
    cfg = load_config({"model": model_cfg, "long_range": {"variant": args.variant}}).to_dict()
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=LR, amsgrad=True)

    def step(g):
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(dict(g), compute_forces=True, compute_stress=True)
        n = g["num_atoms"].to(out["energy"].dtype)
        loss = _loss(out["energy"], out["forces"], out["stress"], g["energy"], g["forces"], g["stress"], n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP)
        opt.step()

    res = _timed(step, graphs, args.warmup, args.steps)
    res.update(impl="polarmace", parameters=int(sum(q.numel() for q in model.parameters())),
               avg_num_neighbors=edges / atoms, edges_per_config=edges / len(configs),
               atoms_per_config=atoms / len(configs), labels_nonzero=bool(np.abs(configs[0].forces).max() > 0)
               if getattr(configs[0], "forces", None) is not None else None)
    return res


def measure_mace(args) -> dict:
    """mace-torch training steps in this process (run with the MACE environment's python)."""
    import mace.modules as modules  # before e3nn (e3nn 0.4 constants under torch >= 2.6)
    import ase.io
    import numpy as np
    import torch
    from e3nn import o3
    from mace import data as mdata
    from mace.tools import AtomicNumberTable, torch_geometric

    if args.tune_allocator:
        sys.path.insert(0, str(ROOT))
        from polarmace.runtime import tune_allocator  # plain ctypes: importable here

        tune_allocator()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    p = PRESETS[args.preset]
    frames = ase.io.read(args.data, ":")
    for a in frames:  # ASE reads energy/forces/stress into a single-point calculator: name them for MACE
        res = a.calc.results
        a.info["REF_energy"], a.info["REF_stress"], a.arrays["REF_forces"] = res["energy"], res["stress"], res["forces"]
        a.calc = None
    zs = sorted({int(z) for a in frames for z in a.numbers})
    table = AtomicNumberTable(zs)
    keys = mdata.KeySpecification(info_keys={"energy": "REF_energy", "stress": "REF_stress"},
                                  arrays_keys={"forces": "REF_forces"})
    configs = [mdata.config_from_atoms(a, key_specification=keys) for a in frames]
    ds = [mdata.AtomicData.from_config(c, z_table=table, cutoff=p["r_max"]) for c in configs]
    loader = torch_geometric.dataloader.DataLoader(ds, batch_size=args.batch_size, shuffle=False, drop_last=False)
    batches = [b.to_dict() for b in loader]
    edges = sum(int(b["edge_index"].shape[1]) for b in batches)
    atoms = sum(int(b["positions"].shape[0]) for b in batches)
    first = "RealAgnosticResidualInteractionBlock" if args.residual_first else "RealAgnosticInteractionBlock"
    model = modules.ScaleShiftMACE(
        r_max=p["r_max"], num_bessel=p["num_bessel"], num_polynomial_cutoff=5, max_ell=p["max_ell"],
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes[first], num_interactions=p["num_interactions"],
        num_elements=len(zs), hidden_irreps=o3.Irreps(p["hidden_irreps"]), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(zs)), avg_num_neighbors=edges / atoms, atomic_numbers=zs,
        correlation=p["correlation"], gate=torch.nn.functional.silu, radial_MLP=p["radial_mlp"],
        use_reduced_cg=False,  # mace_run_train's default
        atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=LR, amsgrad=True)
    labelled = float(np.abs(batches[0]["forces"].numpy()).max()) > 0 and float(batches[0]["energy"].abs().max()) > 0

    def step(b):
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(dict(b), training=True, compute_force=True, compute_stress=True)
        n = (b["ptr"][1:] - b["ptr"][:-1]).to(out["energy"].dtype)
        loss = _loss(out["energy"], out["forces"], out["stress"], b["energy"], b["forces"], b["stress"], n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP)
        opt.step()

    res = _timed(step, batches, args.warmup, args.steps)
    res.update(impl="mace-torch", parameters=int(sum(q.numel() for q in model.parameters())),
               avg_num_neighbors=edges / atoms, edges_per_config=edges / len(configs),
               atoms_per_config=atoms / len(configs), labels_nonzero=labelled)
    return res


def _run(python: str, impl: str, args, preset: str, variant: str, data: str) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--_single", impl, "--_data", data, "--_preset", preset,
           "--_variant", variant, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--residual-first"] if args.residual_first else []
    cmd += ["--tune-allocator"] if args.tune_allocator else []
    env = dict(os.environ, OMP_WAIT_POLICY=args.omp_wait_policy)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": impl, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["failed"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--structure", type=Path, default=DEFAULT_STRUCTURE)
    p.add_argument("--configs", type=int, default=16, help="configurations in the data set")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--presets", nargs="+", default=["small", "default"], choices=sorted(PRESETS))
    p.add_argument("--variants", nargs="+", default=["sr"], help="polarmace variants (sr is compared with MACE)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--residual-first", action="store_true", help="residual first block on both sides")
    p.add_argument("--tune-allocator", action="store_true",
                   help="polarmace.runtime.tune_allocator on both sides (the trainer tunes it by default)")
    p.add_argument("--omp-wait-policy", default="PASSIVE")
    p.add_argument("--mace-python", default=None, help="python of an environment with mace-torch")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_variant", default="sr", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._single:
        args.data, args.preset, args.variant = args._data, args._preset, args._variant
        res = measure_mace(args) if args._single == "mace" else measure_polarmace(args)
        res.update(preset=args.preset, variant=args.variant if args._single != "mace" else "sr",
                   batch_size=args.batch_size, threads=args.threads, residual_first=bool(args.residual_first),
                   tune_allocator=bool(args.tune_allocator))
        print("RESULT " + json.dumps(res))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(make_data(args.structure, args.configs, Path(tmp) / "water.xyz"))
        for rnd in range(args.rounds):
            for preset in args.presets:
                jobs = [("polarmace", sys.executable, v) for v in args.variants]
                if args.mace_python:
                    jobs.insert(1, ("mace", args.mace_python, "sr"))
                for impl, python, variant in jobs:
                    row = _run(python, impl, args, preset, variant, data)
                    row.update(round=rnd, preset=preset, variant=variant)
                    rows.append(row)
                    print(_line(row), flush=True)
    summary = _summary(rows, args)
    for line in summary["lines"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", "benchmarks/training_throughput.py"] + list(argv or sys.argv[1:])),
                                         "rows": rows, "summary": summary["ratios"]}, indent=1))
    return 0


def _med(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def _summary(rows, args) -> dict:
    lines = ["", "medians over rounds; ratios polarmace / mace-torch (< 1: polarmace cheaper)"]
    ratios = []
    for preset in args.presets:
        mine = [r for r in rows if r.get("preset") == preset and r.get("impl") == "polarmace" and "cpu_s" in r]
        mace = [r for r in rows if r.get("preset") == preset and r.get("impl") == "mace-torch" and "cpu_s" in r]
        sr = [r for r in mine if r["variant"] == "sr"]
        for variant in args.variants:
            v = [r for r in mine if r["variant"] == variant]
            if not v:
                continue
            entry = {"preset": preset, "variant": variant, "cpu_s_per_step": _med(v, "cpu_s"),
                     "wall_s_per_step": _med(v, "wall_s"), "peak_minus_base_mib": _med(v, "peak_minus_base_mib")}
            line = (f"  {preset:8s} {variant:7s} CPU {entry['cpu_s_per_step']:.3f} s/step, wall "
                    f"{entry['wall_s_per_step']:.3f} s/step, +{entry['peak_minus_base_mib']:.0f} MiB")
            if variant != "sr" and sr:
                entry["cpu_vs_sr"] = entry["cpu_s_per_step"] / _med(sr, "cpu_s")
                line += f"; {entry['cpu_vs_sr']:.2f}x the CPU time of sr"
            if variant == "sr" and mace:
                entry.update(mace_cpu_s_per_step=_med(mace, "cpu_s"), mace_wall_s_per_step=_med(mace, "wall_s"),
                             mace_peak_minus_base_mib=_med(mace, "peak_minus_base_mib"))
                entry["cpu_ratio"] = entry["cpu_s_per_step"] / entry["mace_cpu_s_per_step"]
                entry["wall_ratio"] = entry["wall_s_per_step"] / entry["mace_wall_s_per_step"]
                entry["memory_ratio"] = entry["peak_minus_base_mib"] / max(entry["mace_peak_minus_base_mib"], 1e-9)
                line += (f" | MACE CPU {entry['mace_cpu_s_per_step']:.3f} s/step, wall {entry['mace_wall_s_per_step']:.3f}"
                         f", +{entry['mace_peak_minus_base_mib']:.0f} MiB | CPU {entry['cpu_ratio']:.2f}x, "
                         f"wall {entry['wall_ratio']:.2f}x, memory {entry['memory_ratio']:.2f}x")
            ratios.append(entry)
            lines.append(line)
    return {"lines": lines, "ratios": ratios}


def _line(r: dict) -> str:
    head = f"round {r.get('round')} {r.get('preset', ''):8s} {r.get('impl', ''):10s} {r.get('variant', ''):7s}"
    if "error" in r:
        return head + f" FAILED: {r['error']}"
    return (head + f" CPU {r['cpu_s']:.3f} s/step (min {r['cpu_min_s']:.3f}), wall {r['wall_s']:.3f} s/step, "
            f"+{r['peak_minus_base_mib']:.0f} MiB, {r['parameters']} parameters, avg_num_neighbors "
            f"{r['avg_num_neighbors']:.1f}, labels {'yes' if r.get('labels_nonzero') else 'NO'}, load {r['loadavg']:.1f}")


if __name__ == "__main__":
    sys.exit(main())

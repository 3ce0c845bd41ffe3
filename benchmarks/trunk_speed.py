"""Speed and memory of the MACE trunk: energy + forces on liquid water (192 atoms) and its 2×2×2
tiling (1,536 atoms), MACE default settings (128x0e+128x1o, max_ell 3, ν = 3, 2 layers, r_max 5).

Every case runs in a fresh subprocess so that peak memory (ru_maxrss, which torch's own allocations
count in, unlike tracemalloc) belongs to that case alone; 'base MiB' is the resident size after
imports and model/graph construction, so peak − base is the working memory of energy + forces. Timings: median of --repeats calls after
--warmup calls; wall time and process CPU time (user + system, all threads; system time is mostly
page faults of fresh allocations). Parameters are frozen (requires_grad False) as in an MD
calculator; forces are −∂E/∂r through the edge vectors.

On a shared, loaded machine wall times swing by 10× between runs: compare CPU times, measured in
the same invocation (the implementations alternate case by case), with --threads 1 for the least
noise. OMP_WAIT_POLICY=PASSIVE is set for the cases by default: spinning OpenMP threads that wait
for a descheduled sibling burn seconds of CPU on such a machine.

    python benchmarks/trunk_speed.py                         # 192 and 1536 atoms, float64 and float32
    python benchmarks/trunk_speed.py --sizes 1 --dtypes float64 --repeats 5
    python benchmarks/trunk_speed.py --mace-python /path/to/venv/bin/python   # + mace-torch, same cases
    python benchmarks/trunk_speed.py --mace-python PY --allocator both --rounds 2 --json out.json

Each case runs with glibc's allocator as it is and tuned (polarmace.runtime.tune_allocator, as the
trainer and polarmace-md use it) on both sides (--allocator both, the default); the summary gives
the polarmace / mace-torch ratios of CPU time, wall time and peak-minus-base memory.

The optional mace-torch comparison runs the same script under another interpreter that has
mace-torch installed (it needs e3nn 0.4.x, hence a separate environment) and builds a MACE model
with the same hyper-parameters, as `mace_run_train --model MACE` builds it (ScaleShiftMACE, first block
RealAgnosticInteractionBlock, then RealAgnosticResidualInteractionBlock, unreduced coupling basis
use_reduced_cg=False — the command-line default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_XYZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets",
                           "water_structures", "liquid-64.xyz")


def _structure(xyz: str, tiling: int):
    import ase.io

    atoms = ase.io.read(xyz)
    if tiling > 1:
        atoms = atoms.repeat((tiling, tiling, tiling))
    return atoms


def _graph(atoms, dtype, r_max):
    import torch
    from polarmace.neighbours import neighbour_pairs

    pos = torch.tensor(atoms.positions, dtype=dtype)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)[None]
    pbc = torch.tensor(atoms.pbc)[None]
    batch = torch.zeros(len(atoms), dtype=torch.long)
    edge_index, shifts = neighbour_pairs(pos, cell, pbc, batch, r_max)
    return pos, cell, batch, edge_index, shifts


def _case_polarmace(args) -> dict:
    import torch
    from polarmace.neighbours import edge_vectors
    from polarmace.nn.trunk import MACETrunk

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    atoms = _structure(args.xyz, args.tiling)
    pos, cell, batch, edge_index, shifts = _graph(atoms, dtype, args.r_max)
    z = torch.tensor(atoms.numbers)
    avg = edge_index.shape[1] / len(atoms)
    trunk = MACETrunk(sorted(set(atoms.numbers.tolist())), r_max=args.r_max, hidden_irreps=args.hidden_irreps,
                      max_ell=args.max_ell, correlation=args.correlation, num_interactions=args.num_interactions,
                      avg_num_neighbors=avg, edge_chunk=args.edge_chunk,
                      low_memory=not args.keep_edge_products).to(dtype)
    for p in trunk.parameters():
        p.requires_grad_(False)
    if args.script:
        trunk = torch.jit.script(trunk)

    def step():
        p = pos.clone().requires_grad_(True)
        vec = edge_vectors(p, cell, batch, edge_index, shifts)
        _, node_energy = trunk(z, edge_index, vec)
        energy = node_energy.sum()
        (grad,) = torch.autograd.grad(energy, p)
        return float(energy), -grad

    return _time(step, args, len(atoms), edge_index.shape[1])


def _case_mace(args) -> dict:
    import inspect

    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    from polarmace.neighbours import edge_vectors  # noqa: F401  (same neighbour list)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    atoms = _structure(args.xyz, args.tiling)
    pos, cell, batch, edge_index, shifts = _graph(atoms, dtype, args.r_max)
    zs = sorted(set(atoms.numbers.tolist()))
    avg = edge_index.shape[1] / len(atoms)
    model = modules.ScaleShiftMACE(
        r_max=args.r_max, num_bessel=8, num_polynomial_cutoff=5, max_ell=args.max_ell,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=args.num_interactions, num_elements=len(zs), hidden_irreps=o3.Irreps(args.hidden_irreps),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(zs)), avg_num_neighbors=avg,
        atomic_numbers=zs, correlation=args.correlation, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        **({"use_reduced_cg": False} if "use_reduced_cg" in inspect.signature(modules.MACE.__init__).parameters else {}),
    ).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    index = {z: i for i, z in enumerate(zs)}
    one_hot = torch.nn.functional.one_hot(torch.tensor([index[z] for z in atoms.numbers]), len(zs)).to(dtype)
    data = {
        "positions": pos, "node_attrs": one_hot, "edge_index": edge_index,
        "shifts": shifts @ cell[0], "unit_shifts": shifts, "cell": cell[0], "batch": batch,
        "ptr": torch.tensor([0, len(atoms)]), "weight": torch.ones(1), "head": torch.zeros(1, dtype=torch.long),
    }

    def step():
        out = model(dict(data), training=False, compute_force=True)
        return float(out["energy"].sum()), out["forces"]

    return _time(step, args, len(atoms), edge_index.shape[1])


def _malloc_tune() -> None:
    """polarmace.runtime.tune_allocator (what the trainer and polarmace-md do): glibc keeps freed
    memory (no trimming, no mmap below 32 MiB), so a step does not page-fault its buffers in again.
    Plain ctypes, so the MACE environment imports it too (PYTHONPATH has the repository)."""
    from polarmace.runtime import tune_allocator

    if not tune_allocator():
        raise SystemExit("tune_allocator: not glibc here")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2.0 ** 20


def _time(step, args, n_atoms, n_edges) -> dict:
    import resource

    base = _rss_mib()  # after imports, model and graph construction
    for _ in range(args.warmup):
        step()
    walls, users, syss, faults = [], [], [], []
    for _ in range(args.repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        users.append(r1.ru_utime - r0.ru_utime)
        syss.append(r1.ru_stime - r0.ru_stime)
        faults.append(r1.ru_minflt - r0.ru_minflt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB (Linux)
    with open("/proc/loadavg") as fh:
        load = float(fh.read().split()[0])
    cpus = [u + s for u, s in zip(users, syss)]
    return {"atoms": n_atoms, "edges": n_edges, "wall_s": statistics.median(walls), "wall_min_s": min(walls),
            "cpu_s": statistics.median(cpus), "cpu_min_s": min(cpus), "user_s": statistics.median(users),
            "sys_s": statistics.median(syss), "minor_faults": int(statistics.median(faults)),
            "peak_mib": peak, "base_mib": base, "peak_minus_base_mib": peak - base, "loadavg": load,
            "threads": args.threads}


def _run_case(python: str, impl: str, args, tiling: int, dtype: str) -> dict:
    cmd = [python, os.path.abspath(__file__), "--_case", impl, "--_tiling", str(tiling), "--_dtype", dtype,
           "--xyz", args.xyz, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--hidden-irreps", args.hidden_irreps, "--max-ell", str(args.max_ell),
           "--correlation", str(args.correlation), "--num-interactions", str(args.num_interactions),
           "--r-max", str(args.r_max), "--edge-chunk", str(args.edge_chunk)] + (["--script"] if args.script else []) \
        + (["--malloc-tune"] if args.malloc_tune else []) \
        + (["--keep-edge-products"] if args.keep_edge_products else [])
    env = dict(os.environ)
    root = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    if impl == "mace":
        # e3nn 0.4.x (needed by mace-torch) loads its own constants with torch.load, which newer torch
        # refuses by default (weights_only); the file ships with the package
        env.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xyz", default=os.path.normpath(DEFAULT_XYZ), help="water box (extxyz)")
    ap.add_argument("--sizes", default="1,2", help="tilings per axis, comma separated (1 = 192 atoms, 2 = 1536)")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hidden-irreps", default="128x0e+128x1o")
    ap.add_argument("--max-ell", type=int, default=3)
    ap.add_argument("--correlation", type=int, default=3)
    ap.add_argument("--num-interactions", type=int, default=2)
    ap.add_argument("--r-max", type=float, default=5.0)
    ap.add_argument("--edge-chunk", type=int, default=16)
    ap.add_argument("--script", action="store_true", help="time the TorchScript-compiled trunk")
    ap.add_argument("--keep-edge-products", action="store_true",
                    help="MACETrunk(low_memory=False): keep per-edge products for the backward (faster, more memory)")
    ap.add_argument("--malloc-tune", action="store_true", help="same as --allocator tuned")
    ap.add_argument("--allocator", choices=["plain", "tuned", "both"], default="both",
                    help="glibc allocator as it is, tuned (polarmace.runtime.tune_allocator) on both sides, or both "
                         "settings in the same invocation (default)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every case")
    ap.add_argument("--thp", action="store_true",
                    help="THP_MEM_ALLOC_ENABLE=1 for both implementations: torch backs large CPU tensors with "
                         "transparent huge pages (far fewer page faults)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for the cases (PASSIVE: no spinning threads on a shared, loaded machine)")
    ap.add_argument("--mace-python", default=None, help="interpreter with mace-torch installed (optional)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_tiling", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_dtype", default="float64", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case:
        args.tiling, args.dtype = args._tiling, args._dtype
        if args.malloc_tune:
            _malloc_tune()
        result = _case_polarmace(args) if args._case == "polarmace" else _case_mace(args)
        print(json.dumps(result))
        return

    impls = [("polarmace", sys.executable)]
    if args.mace_python:
        impls.append(("mace-torch", args.mace_python))
    settings = {"plain": [False], "tuned": [True], "both": [False, True]}["tuned" if args.malloc_tune else args.allocator]
    rows = []
    for rnd in range(args.rounds):
        for tiling in [int(s) for s in args.sizes.split(",")]:
            for dtype in args.dtypes.split(","):
                for tuned in settings:
                    args.malloc_tune = tuned
                    for impl, python in impls:
                        res = _run_case(python, "polarmace" if impl == "polarmace" else "mace", args, tiling, dtype)
                        res.update({"impl": impl, "dtype": dtype, "tiling": tiling, "round": rnd,
                                    "allocator": "tuned" if tuned else "plain"})
                        rows.append(res)
                        _print_row(res)
    summary = _summary(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": "python benchmarks/trunk_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "rows": rows, "summary": summary}, fh, indent=1)


def _summary(rows: list) -> list:
    """Medians over rounds and polarmace / mace-torch ratios per (atoms, dtype, allocator)."""
    out = []
    keys = sorted({(r["tiling"], r["dtype"], r["allocator"]) for r in rows if "error" not in r})
    if keys:
        print("\nmedians over rounds; polarmace / mace-torch (< 1: polarmace cheaper)")
    for tiling, dtype, alloc in keys:
        sel = [r for r in rows if "error" not in r and (r["tiling"], r["dtype"], r["allocator"]) == (tiling, dtype, alloc)]
        entry = {"tiling": tiling, "dtype": dtype, "allocator": alloc}
        for impl in ("polarmace", "mace-torch"):
            mine = [r for r in sel if r["impl"] == impl]
            if mine:
                entry[impl] = {k: statistics.median([r[k] for r in mine])
                               for k in ("cpu_s", "wall_s", "peak_minus_base_mib", "minor_faults")}
                entry["atoms"] = mine[0]["atoms"]
        if "polarmace" in entry and "mace-torch" in entry:
            a, b = entry["polarmace"], entry["mace-torch"]
            entry["ratio"] = {k: a[k] / b[k] if b[k] else float("nan") for k in ("cpu_s", "wall_s", "peak_minus_base_mib")}
            print(f"  {entry['atoms']:>5} atoms {dtype:8s} allocator {alloc:6s}: CPU {a['cpu_s']:.3f} vs {b['cpu_s']:.3f} s "
                  f"({entry['ratio']['cpu_s']:.2f}x), wall {entry['ratio']['wall_s']:.2f}x, peak-minus-base "
                  f"{a['peak_minus_base_mib']:.0f} vs {b['peak_minus_base_mib']:.0f} MiB ({entry['ratio']['peak_minus_base_mib']:.2f}x)")
        out.append(entry)
    return out


_HEADER = False


def _print_row(r: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(f"{'impl':<11} {'alloc':<6} {'dtype':<8} {'atoms':>6} {'edges':>7} {'thr':>3} {'wall s':>8} {'min s':>8} {'cpu s':>8} "
              f"{'cpu min':>8} {'user s':>8} {'sys s':>7} {'minflt':>8} {'peak MiB':>9} {'base MiB':>9} {'load':>5}")
        _HEADER = True
    if "error" in r:
        print(f"{r['impl']:<11} {r['dtype']:<8} tiling {r['tiling']}: ERROR {r['error']}")
        return
    print(f"{r['impl']:<11} {r.get('allocator', ''):<6} {r['dtype']:<8} {r['atoms']:>6} {r['edges']:>7} {r['threads']:>3} {r['wall_s']:>8.3f} "
          f"{r['wall_min_s']:>8.3f} {r['cpu_s']:>8.3f} {r['cpu_min_s']:>8.3f} {r['user_s']:>8.3f} {r['sys_s']:>7.3f} "
          f"{r['minor_faults']:>8d} {r['peak_mib']:>9.0f} {r.get('base_mib', 0.0):>9.0f} {r['loadavg']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Generate the reference datasets of the accuracy benchmarks (resumable, seeded).

    python scripts/make_reference_data.py nacl  [--out data/reference]   # GFN2-xTB, tblite
    python scripts/make_reference_data.py water [--out data/reference]   # AMOEBA, OpenMM
    python scripts/make_reference_data.py melt  [--out data/reference]   # NaCl rigid ions, OpenMM
    python scripts/make_reference_data.py drude [--out data/reference]   # NaCl Drude ions, OpenMM
    python scripts/make_reference_data.py all

Rerunning the same command after an interruption continues where it stopped (work is done in
seeded chunks that are written atomically; an unfinished chunk is recomputed). Needs `pip install tblite` for
nacl and `openmm` for water, melt and drude. Single-threaded by default (OMP_NUM_THREADS=1) so two sets can be
generated side by side; set --threads to change that.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


#: The shared 64-molecule liquid water box (next to the repository), the default AMOEBA start.
LIQUID_64 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "water_structures" / "liquid-64.xyz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=("nacl", "water", "melt", "drude", "all"))
    p.add_argument("--out", type=Path, default=Path("data/reference"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    p.add_argument("--workers", type=int, default=1, help="processes for independent chunks")
    p.add_argument("--quick", action="store_true",
                   help="a tiny version of every set (minutes), for trying the pipeline")
    p.add_argument("--nacl-md-chunks", type=int, default=24, help="MD chunks of 100 frames")
    p.add_argument("--nacl-test-size", type=int, default=200)
    p.add_argument("--water-configs", type=int, default=None, help="periodic AMOEBA frames")
    p.add_argument("--water-clusters", type=int, default=None, help="AMOEBA clusters with BEC")
    p.add_argument("--water-start", type=Path, default=LIQUID_64,
                   help="starting 64-molecule water box (extxyz with cell); a built box when the file is absent")
    p.add_argument("--melt-frames", type=int, default=1500, help="rigid-ion NaCl melt frames")
    p.add_argument("--drude-frames", type=int, default=500, help="Drude NaCl melt frames")
    p.add_argument("--drude-bec-frames", type=int, default=100, help="Drude frames with finite-field BEC")
    p.add_argument("--ions-216", action="store_true", help="216-ion cells instead of 64 (melt, drude)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_nacl(args: argparse.Namespace) -> None:
    from polarmace.reference.xtb_nacl import NaClPlan, generate_nacl

    if args.quick:
        plan = NaClPlan(md_chunks=2, frames_per_chunk=10, equilibration_steps=10, distorted_chunks=1,
                        distorted_per_chunk=5, test_size=5, seed=args.seed)
    else:
        plan = NaClPlan(md_chunks=args.nacl_md_chunks, test_size=args.nacl_test_size, seed=args.seed)
    paths = generate_nacl(args.out, plan, progress=not args.no_progress, workers=args.workers)
    logging.info("NaCl xTB: %s", ", ".join(f"{k}={v}" for k, v in paths.items()))


def make_water(args: argparse.Namespace) -> None:
    from polarmace.reference import amoeba_water

    kw_p = {} if args.water_configs is None else {"n_configs": args.water_configs}
    kw_c = {} if args.water_clusters is None else {"n_configs": args.water_clusters}
    if args.quick:
        kw_p, kw_c = {"n_configs": 5}, {"n_configs": 2}
    if args.water_start.is_file():  # as before: the shared box when present, else a built one
        kw_p["start"] = kw_c["start"] = args.water_start
    periodic = amoeba_water.generate_periodic(args.out / "water_amoeba_periodic.extxyz",
                                              seed=args.seed, progress=not args.no_progress, **kw_p)
    clusters = amoeba_water.generate_clusters(args.out / "water_amoeba_clusters.extxyz",
                                              seed=args.seed, progress=not args.no_progress, **kw_c)
    logging.info("AMOEBA water: periodic=%s clusters=%s", periodic, clusters)


def _ions_plan(args: argparse.Namespace, model, frames: int, bec_frames: int):
    from polarmace.reference.openmm_ions import MeltPlan

    n_cells = 3 if args.ions_216 else 2
    if args.quick:
        return MeltPlan(model=model, n_cells=n_cells, chunks_per_condition=1, frames=15,
                        sample_every=50, equilibration_steps=200, premelt_steps=200,
                        bec_frames=min(bec_frames, 3), seed=args.seed)
    # 15 conditions (5 temperatures × 3 densities); two trajectories each for the rigid set
    chunks = 2 if model.polarizabilities == () else 1
    return MeltPlan(model=model, n_cells=n_cells, chunks_per_condition=chunks, frames=frames,
                    sample_every=200, bec_frames=bec_frames, seed=args.seed)


def make_ions(args: argparse.Namespace, kind: str) -> None:
    from polarmace.reference.openmm_ions import DRUDE, RIGID, generate_melt

    suffix = ("_216" if args.ions_216 else "") + ("_quick" if args.quick else "")
    if kind == "melt":
        plan = _ions_plan(args, RIGID, args.melt_frames, 0)
        out = args.out / f"nacl_melt_rigid{suffix}.extxyz"
    else:
        plan = _ions_plan(args, DRUDE, args.drude_frames, args.drude_bec_frames)
        out = args.out / f"nacl_melt_drude{suffix}.extxyz"
    path = generate_melt(out, plan, progress=not args.no_progress, workers=args.workers)
    logging.info("NaCl %s: %s (%d frames of %d ions)", kind, path, plan.frames, 8 * plan.n_cells ** 3)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.dataset in ("nacl", "all"):
        make_nacl(args)
    if args.dataset in ("water", "all"):
        make_water(args)
    for kind in ("melt", "drude"):
        if args.dataset in (kind, "all"):
            make_ions(args, kind)
    logging.info("done in %.1f min", (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

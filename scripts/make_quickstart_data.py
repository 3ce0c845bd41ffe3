#!/usr/bin/env python
"""Generate the quickstart dataset: periodic 64-ion NaCl rigid-ion cells (crystal at 800 and
1000 K, melt at 1100–1500 K, four densities each) labelled with OpenMM: Born–Mayer–Huggins
(Tosi–Fumi parameters) plus Ewald-summed ±1 e point charges.

The charges are identifiable here (periodic cells, long-range Coulomb everywhere), and the truth
is known exactly: true_charges ±1 e, BEC = q·I, true_polarizability 0; labels energy, forces and
stress. See polarmace/reference/openmm_ions.py. Seeded; about 3 minutes on one core.

    python scripts/make_quickstart_data.py -o configs/data/quickstart_nacl_melt.xyz --frames 200
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Box lengths relative to the reference density of each condition.
SCALES = (0.96, 0.98, 1.0, 1.03)


def plan(frames: int, seed: int):
    from polarmace.reference.openmm_ions import MeltPlan

    return MeltPlan(frames=frames, scales=SCALES, chunks_per_condition=1, sample_every=200, seed=seed)


def main(argv=None) -> None:
    from polarmace.reference.openmm_ions import generate_melt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="configs/data/quickstart_nacl_melt.xyz")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=1, help="processes for independent trajectories")
    args = parser.parse_args(argv)
    out = Path(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        path = generate_melt(Path(tmp) / out.name, plan(args.frames, args.seed), workers=args.workers,
                             chunk_dir=Path(tmp) / "chunks")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
    print(f"wrote {args.frames} frames to {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Electrical observables of one trained model on one labelled file (e.g. transfer tests).

    python benchmarks/evaluate_electrical.py --model runs/water_amoeba/water_amoeba.model \
        --data data/reference/water_amoeba_clusters.extxyz

Prints energy/force errors and, where the file has references, BEC MAE/R² after one global
sign, the acoustic-sum-rule residual, dipole and polarizability errors (the same metrics as
benchmarks/accuracy.py), and writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import evaluate_variant  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the metrics")
    args = p.parse_args(argv)
    import torch

    from polarmace.cli.eval import load_model

    torch.set_num_threads(args.threads)
    cfg = load_model(str(args.model)).config
    metrics = evaluate_variant(args.model, args.data, cfg, args.batch_size)
    for key, value in metrics.items():
        print(f"{key:32s} {value:.6g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

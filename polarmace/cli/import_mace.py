"""polarmace-import-mace: build a PolarMACE from a MACE model exported with scripts/export_mace_weights.py.

    /path/to/mace-venv/bin/python scripts/export_mace_weights.py my.model -o my.mace.npz
    polarmace-import-mace my.mace.npz -o model.pt [--variant les] [--head NAME] [--elements H O]

The trunk, E0s, scale and shift reproduce the MACE model (with --variant sr: the same energies,
forces and stress); other variants add latent multipoles at their small initial scale, ready for
fine-tuning (`model.init_from: model.pt` in a polarmace-train config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def parser() -> argparse.ArgumentParser:
    from polarmace.config import VARIANTS

    p = argparse.ArgumentParser(prog="polarmace-import-mace", description=__doc__.split("\n")[0])
    p.add_argument("export", help="file written by scripts/export_mace_weights.py (.npz)")
    p.add_argument("-o", "--output", required=True, help="polarmace model file to write")
    p.add_argument("--variant", default="sr", choices=sorted(VARIANTS),
                   help="long-range variant of the new model (default sr: the MACE model alone)")
    p.add_argument("--head", default=None, help="head to import from a multi-head MACE model")
    p.add_argument("--elements", nargs="+", default=None,
                   help="keep only these elements (default: every element of the MACE model)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh long-range heads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-import-mace", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    from polarmace.errors import output_error
    from polarmace.nn.mace_import import import_mace

    torch.manual_seed(int(args.seed))
    model = import_mace(args.export, variant=args.variant, head=args.head, elements=args.elements, dtype=args.dtype)
    output = Path(args.output)
    try:
        model.save(str(output))
    except (OSError, RuntimeError) as exc:
        error = output_error(output, exc)
        if error is None:
            raise
        raise error from exc
    m = model.config["model"]
    print(f"wrote {output}: {m['num_interactions']} layer(s) {m['hidden_irreps']}, max_ell {m['max_ell']}, "
          f"correlation {m['correlation']}, elements {' '.join(m['elements'])}, variant {args.variant}, "
          f"{'residual' if m['residual_first_block'] else 'plain'} first block, {m['readout']} last readout")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""polarmace-export: write a TorchScript file loadable with plain torch.jit.load.

    polarmace-export model.pt -o model.ts [--dtype float32]
    polarmace-export --lammps model.pt -o model.lmp.pt    # local module for LAMMPS fix polarmace

The input dictionary of the exported module is documented in polarmace.export; the LAMMPS
module (les models only) in polarmace.deploy.lammps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-export", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model file written by model.save / polarmace-train")
    p.add_argument("-o", "--output", default=None, help="output path (default: <model>.ts)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="convert the model before export (default: keep its dtype)")
    p.add_argument("--lammps", action="store_true",
                   help="write the local module that LAMMPS's fix polarmace runs (default output <model>.lmp.pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-export", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    from polarmace.errors import output_error
    from polarmace.export import ExportError, export_model
    from polarmace.model import PolarMACE

    model = PolarMACE.load(args.model)  # ModelFileError naming the file (TorchScript, checkpoint, torn, ...)
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    default_suffix = ".lmp.pt" if args.lammps else ".ts"
    output = Path(args.output) if args.output else Path(args.model).with_suffix(default_suffix)
    if output.resolve() == Path(args.model).resolve():
        from polarmace.config import ConfigError

        raise ConfigError(f"-o/--output {output} is the model file: it would be overwritten")
    try:
        if args.lammps:
            from polarmace.deploy.lammps import export_lammps

            export_lammps(model, output)  # InputError for variants the LAMMPS route lacks
        else:
            export_model(model, output)
    except ExportError as exc:
        print(f"polarmace-export: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as exc:
        raise output_error(output, exc) from exc
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

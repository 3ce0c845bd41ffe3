"""Write the inputs of examples/lammps/in.nacl: nacl.data (512-ion NaCl melt, the first
quickstart frame replicated 2x2x2), quickstart.lmp.pt (polarmace-export --lammps of the shipped
quickstart model) and the plugin (polarmace-lammps build); prints the lmp command line."""

from __future__ import annotations

from pathlib import Path

import ase.io

from polarmace.deploy.lammps import build_plugin, export_lammps, write_data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    atoms = ase.io.read(str(ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"), 0).repeat((2, 2, 2))
    write_data(atoms, HERE / "nacl.data", ["Na", "Cl"])
    export_lammps(ROOT / "benchmarks" / "results" / "quickstart" / "quickstart.model", HERE / "quickstart.lmp.pt")
    plugin = build_plugin()
    print(f"wrote {HERE / 'nacl.data'} ({len(atoms)} atoms) and {HERE / 'quickstart.lmp.pt'}")
    print(f"cd {HERE} && eval $(polarmace-lammps env) && mpiexec -n 2 lmp -in in.nacl -var plugin {plugin}")


if __name__ == "__main__":
    main()

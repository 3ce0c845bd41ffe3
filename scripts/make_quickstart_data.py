#!/usr/bin/env python
"""Generate the quickstart dataset: charged Na9Cl8+ clusters (total charge +1, open boundaries)
labelled with a classical rigid-ion model, Born–Mayer–Huggins (Tosi–Fumi parameters) plus
exact Coulomb between ±1 e point charges.

The labels are not DFT, but they carry real long-range physics (a net charge and 1/r forces),
which is what the quickstart shows: a short-range model cannot represent them, the latent-charge
model can. Sampling: Langevin MD at several temperatures (ASE) plus randomly distorted copies.

    python scripts/make_quickstart_data.py -o configs/data/quickstart_nacl.xyz --frames 240
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from tqdm import tqdm

from polarmace.electrostatics import Electrostatics

# Tosi & Fumi (1964) NaCl parameters, converted to eV and Å.
B = 0.338e-19 / 1.602176634e-19          # eV
RHO = 0.317                              # Å
SIGMA = {"Na": 1.170, "Cl": 1.585}       # Å
PAULING = {("Na", "Na"): 1.25, ("Na", "Cl"): 1.0, ("Cl", "Cl"): 0.75}
J_M6_TO_EV_A6 = 1e-79 / 1.602176634e-19 * 1e60   # 1e-79 J m^6 -> eV Å^6
J_M8_TO_EV_A8 = 1e-99 / 1.602176634e-19 * 1e80   # 1e-99 J m^8 -> eV Å^8
C6 = {("Na", "Na"): 1.68, ("Na", "Cl"): 11.2, ("Cl", "Cl"): 116.0}    # 1e-79 J m^6
C8 = {("Na", "Na"): 0.8, ("Na", "Cl"): 13.9, ("Cl", "Cl"): 233.0}     # 1e-99 J m^8
CHARGE = {"Na": 1.0, "Cl": -1.0}


def _pair(a: str, b: str) -> tuple:
    return (a, b) if (a, b) in PAULING else (b, a)


class RigidIonNaCl(Calculator):
    """Born–Mayer–Huggins + Coulomb (point charges ±1 e, open boundaries) for Na/Cl clusters."""

    implemented_properties = ["energy", "forces"]

    def __init__(self) -> None:
        super().__init__()
        self.coulomb = Electrostatics(sigma=0.0)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        symbols = self.atoms.get_chemical_symbols()
        pos = torch.tensor(self.atoms.positions, requires_grad=True)
        n = len(symbols)
        i, j = np.triu_indices(n, 1)
        keys = [_pair(symbols[a], symbols[b]) for a, b in zip(i, j)]
        amp = torch.tensor([PAULING[k] * B * math.exp((SIGMA[k[0]] + SIGMA[k[1]]) / RHO) for k in keys])
        c6 = torch.tensor([C6[k] * J_M6_TO_EV_A6 for k in keys])
        c8 = torch.tensor([C8[k] * J_M8_TO_EV_A8 for k in keys])
        r = (pos[torch.as_tensor(j)] - pos[torch.as_tensor(i)]).norm(dim=1)
        short = (amp * torch.exp(-r / RHO) - c6 / r ** 6 - c8 / r ** 8).sum()
        q = torch.tensor([CHARGE[s] for s in symbols])
        coul = self.coulomb(pos, torch.zeros(1, 3, 3), torch.tensor([[False] * 3]), q).energy.sum()
        energy = short + coul
        forces = -torch.autograd.grad(energy, pos)[0]
        self.results = {"energy": float(energy), "forces": forces.numpy()}


def na9cl8(spacing: float = 2.82) -> Atoms:
    """A 3×3×2 rock-salt block (9 Na, 9 Cl) with one corner Cl removed: Na9Cl8+."""
    symbols, positions = [], []
    for x in range(3):
        for y in range(3):
            for z in range(2):
                symbols.append("Na" if (x + y + z) % 2 == 0 else "Cl")
                positions.append([x * spacing, y * spacing, z * spacing])
    drop = next(k for k, s in enumerate(symbols) if s == "Cl")
    del symbols[drop], positions[drop]
    atoms = Atoms(symbols, positions=positions)
    atoms.center(vacuum=8.0)
    atoms.pbc = False
    return atoms


def sample(frames: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    temperatures = [300.0, 600.0, 900.0]
    per_md = int(0.75 * frames) // len(temperatures)
    bar = tqdm(total=frames, desc="labelling", unit="frame")
    for t in temperatures:
        atoms = na9cl8()
        atoms.calc = RigidIonNaCl()
        MaxwellBoltzmannDistribution(atoms, temperature_K=t, rng=rng)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=t, friction=0.02, rng=rng)
        dyn.run(200)  # equilibrate
        for _ in range(per_md):
            dyn.run(20)
            out.append(_labelled(atoms))
            bar.update()
    base = na9cl8()
    while len(out) < frames:
        atoms = base.copy()
        atoms.positions += rng.normal(0.0, 0.12, atoms.positions.shape)
        atoms.calc = RigidIonNaCl()
        out.append(_labelled(atoms))
        bar.update()
    bar.close()
    return out


def _labelled(atoms: Atoms) -> Atoms:
    frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions.copy(), pbc=False)
    frame.info["energy"] = float(atoms.get_potential_energy())
    frame.info["total_charge"] = 1.0
    frame.arrays["forces"] = atoms.get_forces().copy()
    return frame


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="configs/data/quickstart_nacl.xyz")
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    frames = sample(args.frames, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write(args.output, frames, format="extxyz")
    print(f"wrote {len(frames)} frames to {args.output}")


if __name__ == "__main__":
    main()

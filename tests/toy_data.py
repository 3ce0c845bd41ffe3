"""The toy data of the training tests: EMT-labelled Cu/Au cells and a run config for the toy model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml


def make_dataset(path: Path, n: int = 20, seed: int = 0) -> Path:
    """Rattled, strained 4-atom fcc Cu/Au cells labelled by ASE's EMT (energy, forces, stress)."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        if k % 2:
            a.numbers[rng.integers(4)] = 79
        a.set_cell(a.cell.array @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
        a.rattle(0.1, seed=k)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
        a.calc = None
        a.info["energy"] = e
        a.arrays["forces"] = f
        a.info["stress"] = s
        frames.append(a)
    ase.io.write(str(path), frames, format="extxyz")
    return path


def toy_config(data: Path, out: Path, **training) -> dict:
    """A two-epoch float64 run of the toy model on `data`, writing to `out`; `training` overrides."""
    tr = {"epochs": 2, "lr": 0.01, "seed": 3, "ema_decay": 0.9, "scheduler": "plateau",
          "loss_weights": {"energy": 1.0, "forces": 10.0, "stress": 1.0}}
    tr.update(training)
    return {"model": {"r_max": 4.0, "num_bessel": 6, "dtype": "float64"},
            "data": {"train": str(data), "batch_size": 4, "valid_fraction": 0.2, "test_fraction": 0.1},
            "training": tr,
            "output": {"directory": str(out), "name": "toy", "plots": True}}


def write_yaml(cfg: dict, path: Path) -> Path:
    """Write `cfg` as YAML to `path` and return the path."""
    path.write_text(yaml.safe_dump(cfg))
    return path

"""A random float64 `les` PolarMACE for H and O, and water molecules on a grid: the i-PI tests'
model and structures (tests/integration/test_driver.py, test_water_ir_trpmd.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from ase import Atoms

from polarmace.model import build_model


def tiny_model_file(path: Path, core_repulsion: Optional[Dict[str, float]] = None) -> Path:
    """A small random float64 `les` PolarMACE for H/O, saved with model.save; `core_repulsion`
    ({"O-H": Å, ...}) adds the ZBL wall, which keeps MD with random weights from collapsing."""
    cfg = {"model": {"elements": ["H", "O"], "e0s": {"H": -13.6, "O": -432.0},
                     "avg_num_neighbors": 6.0, "hidden_irreps": "4x0e+4x1o", "max_ell": 2,
                     "correlation": 2, "num_interactions": 1, "radial_mlp": [8, 8], "r_max": 3.0,
                     "dtype": "float64", "core_repulsion": core_repulsion},
           "long_range": {"variant": "les", "sigma": 1.0}}
    torch.manual_seed(7)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save(str(path))
    return path


def water_molecules(n: int, spacing: float, seed: int) -> Atoms:
    """n water molecules on a cubic grid `spacing` Å apart, random orientations."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    mol = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    pos, nums = [], []
    for k in range(n):
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        centre = spacing * (np.array(np.unravel_index(k, (side,) * 3)) + 0.5)
        pos.extend(centre + mol @ q.T)
        nums.extend([8, 1, 1])
    return Atoms(numbers=nums, positions=np.array(pos))

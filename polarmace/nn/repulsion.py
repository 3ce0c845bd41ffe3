"""Core repulsion: the ZBL screened nuclear repulsion, switched off smoothly at a pair cutoff.

A network trained on thermal configurations knows nothing about distances it never saw; its
energy there can fall without bound, and MD then pulls atoms onto each other. This analytic
pair term gives the potential the physical wall at short range:

    E_ij = k_e Z_i Z_j / r · φ(r / a_ij) · s(r / r_c,ij)

with the universal screening function of Ziegler, Biersack and Littmark (1985),
φ(x) = Σ_k c_k exp(−d_k x), a_ij = 0.8854 a_0 / (Z_i^0.23 + Z_j^0.23), and the quintic switch
s(t) = 1 − 10t³ + 15t⁴ − 6t⁵ (t ≤ 1; s = 0 beyond), whose value, slope and curvature vanish at
r_c. Below a pair's cutoff the wall is added; at and above it the term is exactly zero, so a
cutoff below every distance in the training data leaves the model unchanged there.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Union

import torch
from ase.data import atomic_numbers as ASE_NUMBERS
from ase.data import covalent_radii

from polarmace.errors import ConfigError
from polarmace.units import BOHR, COULOMB

#: ZBL universal screening function φ(x) = Σ c_k exp(−d_k x).
ZBL_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)
#: Screening length prefactor 0.8854·a_0, Å.
ZBL_LENGTH = 0.8854 * BOHR


def pair_key(a: str, b: str) -> str:
    """The canonical "A-B" key of an element pair (alphabetical, so "O-H" and "H-O" agree)."""
    return "-".join(sorted((a, b)))


def pair_cutoffs(elements: Sequence[str], spec: Union[str, Mapping[str, float]]) -> Dict[str, float]:
    """{"A-B": r_c in Å} for every pair of `elements`: the sum of the covalent radii (ASE's), or
    the value given in `spec` for the pairs it names ("O-H" and "H-O" are the same pair)."""
    out = {pair_key(a, b): float(covalent_radii[ASE_NUMBERS[a]] + covalent_radii[ASE_NUMBERS[b]])
           for i, a in enumerate(elements) for b in elements[i:]}
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            a, _, b = key.partition("-")
            out[pair_key(a, b)] = float(value)
    return out


def zbl_screening(x: torch.Tensor) -> torch.Tensor:
    """The ZBL universal screening function φ(x), x = r / a (dimensionless), any shape."""
    c = torch.tensor(ZBL_COEFFICIENTS, dtype=x.dtype, device=x.device)
    d = torch.tensor(ZBL_EXPONENTS, dtype=x.dtype, device=x.device)
    return (c * torch.exp(-x[..., None] * d)).sum(-1)


def zbl_energy(r: torch.Tensor, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
    """Unswitched ZBL pair energy (eV) at distance r (Å) of nuclei with charges z_i, z_j."""
    a = ZBL_LENGTH / (z_i ** 0.23 + z_j ** 0.23)
    return COULOMB * z_i * z_j / r * zbl_screening(r / a)


def quintic_switch(t: torch.Tensor) -> torch.Tensor:
    """1 − 10t³ + 15t⁴ − 6t⁵ on [0, 1], 0 beyond: value, slope and curvature vanish at t = 1."""
    t = t.clamp(max=1.0)
    return 1.0 - t ** 3 * (10.0 - 15.0 * t + 6.0 * t * t)


class CoreRepulsion(torch.nn.Module):
    """Per-atom ZBL core repulsion energies [N] (eV) from the model's edges.

    `elements`: the model's chemical symbols in species order; `cutoffs`: {"A-B": r_c Å} for
    every pair (`pair_cutoffs`). Every r_c must not exceed the graph cutoff, so that every pair
    inside it is an edge.
    """

    def __init__(self, elements: Sequence[str], cutoffs: Mapping[str, float], r_max: float) -> None:
        super().__init__()
        n = len(elements)
        # per ordered pair (i·n + j): cutoff r_c, screening length a and k_e·Z_i·Z_j, so that the
        # forward gathers once per edge (a float64 model keeps the cutoffs as given)
        table = torch.zeros(3, n * n, dtype=torch.float64)
        for i, a in enumerate(elements):
            for j, b in enumerate(elements):
                key = pair_key(a, b)
                if key not in cutoffs:
                    raise ConfigError(f"model.core_repulsion: no cutoff for the pair {key}")
                rc = float(cutoffs[key])
                if not 0.0 < rc <= r_max:
                    raise ConfigError(f"model.core_repulsion: cutoff {rc:.3f} Å of {key} must be in "
                                      f"(0, r_max = {r_max}]; set it explicitly, e.g. {{{key}: 1.0}}")
                za, zb = float(ASE_NUMBERS[a]), float(ASE_NUMBERS[b])
                table[:, i * n + j] = torch.tensor([rc, ZBL_LENGTH / (za ** 0.23 + zb ** 0.23),
                                                    COULOMB * za * zb], dtype=torch.float64)
        # derived from the config on every build, so not part of the saved weights
        self.register_buffer("pair_table", table, persistent=False)
        self.register_buffer("screening", torch.tensor([ZBL_COEFFICIENTS, ZBL_EXPONENTS], dtype=torch.float64),
                             persistent=False)
        self.num_elements = n

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """species [N] (model element index), edge_index [2, E] (row 0 the receiver i, row 1 the
        sender j; both directions of every pair), lengths [E] Å -> node energies [N] eV: half of
        each pair's energy to its receiver, so an atom's energy needs only its own edges."""
        receiver = edge_index[0]
        pair = species.index_select(0, receiver) * self.num_elements + species.index_select(0, edge_index[1])
        rc, a, kzz = self.pair_table.to(lengths.dtype).index_select(1, pair).unbind(0)
        r = lengths.clamp(min=1e-6)  # a coincident pair (which the calculator refuses) is not a NaN
        c, d = self.screening.to(lengths.dtype).unbind(0)
        phi = torch.exp((r / a)[:, None] * -d) @ c  # φ(r/a): one exp of [E, 4], as zbl_screening
        # the switch is exactly 0 (value and slope) for r >= r_c: no mask needed
        e = kzz / r * phi * quintic_switch(r / rc)
        node = torch.zeros(species.shape[0], dtype=lengths.dtype, device=lengths.device)
        return node.index_add(0, receiver, 0.5 * e)

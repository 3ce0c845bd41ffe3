"""Radial part of the edge features: Bessel basis × polynomial envelope, and the radial MLP.

    b_n(r) = sqrt(2 / r_max) · sin(n π r / r_max) / r,              n = 1 … num_bessel
    u(x)   = 1 − (p+1)(p+2)/2 · x^p + p(p+2) · x^{p+1} − p(p+1)/2 · x^{p+2},   x = r / r_max < 1
             (0 for x ≥ 1; u, u' and u'' vanish at r_max)
    radial features = b_n(r) · u(r)

RadialMLP: bias-free fully connected net with SiLU normalised to unit second moment and
weights N(0, 1) scaled by 1/sqrt(fan_in) at run time (e3nn's FullyConnectedNet convention). Being
bias-free, it maps zero features (r ≥ r_max) to exactly zero weights, which keeps the cutoff
smooth and lets padded edge slots contribute nothing.
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
from torch import nn


def _silu_second_moment_normaliser() -> float:
    """1 / sqrt(E[silu(z)²]) for z ~ N(0, 1) (Gauss–Hermite quadrature)."""
    x, w = np.polynomial.hermite_e.hermegauss(200)
    silu = x / (1.0 + np.exp(-x))
    return float(1.0 / math.sqrt((w * silu ** 2).sum() / math.sqrt(2.0 * math.pi)))


SILU_NORM = _silu_second_moment_normaliser()


class BesselBasis(nn.Module):
    def __init__(self, r_max: float, num_basis: int = 8):
        super().__init__()
        self.r_max = float(r_max)
        self.num_basis = int(num_basis)
        self.register_buffer("freqs", torch.arange(1, num_basis + 1, dtype=torch.float64) * math.pi / r_max)
        self.prefactor = math.sqrt(2.0 / r_max)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # r [E, 1] -> [E, num_basis]
        return self.prefactor * torch.sin(r * self.freqs.to(r.dtype)) / r


class PolynomialCutoff(nn.Module):
    def __init__(self, r_max: float, p: int = 5):
        super().__init__()
        self.r_max = float(r_max)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.r_max
        xp = torch.pow(x, p)
        u = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * xp + p * (p + 2.0) * xp * x - p * (p + 1.0) / 2.0 * xp * x * x
        return u * (x < 1.0).to(r.dtype)


class RadialEmbedding(nn.Module):
    """lengths [E, 1] -> Bessel(r) · envelope(r)  [E, num_bessel]."""

    def __init__(self, r_max: float, num_bessel: int = 8, num_polynomial_cutoff: int = 5):
        super().__init__()
        self.bessel = BesselBasis(r_max, num_bessel)
        self.cutoff = PolynomialCutoff(r_max, num_polynomial_cutoff)
        self.out_dim = int(num_bessel)

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.bessel(lengths) * self.cutoff(lengths)


class RadialMLP(nn.Module):
    """Bias-free MLP [in] + hidden + [out] with normalised SiLU between layers (none after the last).

    `hidden(x)` returns the last hidden activation h [E, hidden[-1]]; the output is
    h @ last_weight / sqrt(hidden[-1]) — the interaction blocks use this linear last layer to
    contract the weights into the tensor product without materialising all of them.
    """

    def __init__(self, sizes: List[int]):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("RadialMLP needs at least input and output sizes")
        self.sizes = [int(s) for s in sizes]
        self.hidden_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(sizes[i], sizes[i + 1])) for i in range(len(sizes) - 2)])
        self.last_weight = nn.Parameter(torch.randn(sizes[-2], sizes[-1]))
        self.act_norm = SILU_NORM
        self.last_scale = 1.0 / math.sqrt(sizes[-2])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.hidden_weights:
            x = torch.nn.functional.silu(x @ w * (1.0 / math.sqrt(w.shape[0]))) * self.act_norm
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x) @ self.last_weight * self.last_scale

"""Readouts: per-layer energy readouts (MACE) and a generic equivariant readout for multipoles.

Energy readouts work on the trunk's internal scalars [N, 1, C]:
  LinearReadout     x0 @ w / sqrt(C)                                        (layers < last)
  NonLinearReadout  silu~(x0 @ W1 / sqrt(C)) @ w2 / sqrt(hidden), hidden 16   (last layer)
(silu~ = SiLU normalised to unit second moment, as e3nn.)

EquivariantReadout works on e3nn's flat layout ([N, irreps.dim], mul-major inside each irrep
block) and maps node features to any requested irreps, times an output scale:
  * irreps present in the input: equivariant linear map (e3nn o3.Linear semantics);
  * irreps absent from the input (e.g. 2e from 0e+1o features): a channel-wise quadratic term —
    two linear projections of the input to `hidden` channels of each input irrep type, coupled
    by Clebsch–Gordan (e.g. 1o ⊗ 1o -> 2e is the traceless symmetric outer product of two
    vectors), then mixed linearly to the output multiplicity.
Usage: charges "1x0e" (scale 0.1), dipoles "1x1o" (0.1), quadrupoles "1x2e" (0.1), κ "1x0e" and
α "1x0e" or "1x0e+1x2e" (0.01). Positivity (κ, α) is the caller's business.
"""


import math
from typing import List, Tuple

import torch
from e3nn import o3
from torch import nn

from .radial import SILU_NORM


class LinearReadout(nn.Module):
    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_channels))
        self.scale = 1.0 / math.sqrt(num_channels)

    def forward(self, scalars: torch.Tensor) -> torch.Tensor:  # [N, 1, C] -> [N]
        return torch.matmul(scalars[:, 0, :], self.weight) * self.scale


class NonLinearReadout(nn.Module):
    def __init__(self, num_channels: int, hidden: int = 16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_channels, hidden))
        self.w2 = nn.Parameter(torch.randn(hidden))
        self.s1 = 1.0 / math.sqrt(num_channels)
        self.s2 = 1.0 / math.sqrt(hidden)
        self.act_norm = SILU_NORM

    def forward(self, scalars: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(torch.matmul(scalars[:, 0, :], self.w1) * self.s1) * self.act_norm
        return torch.matmul(h, self.w2) * self.s2


def _coupled(a: torch.Tensor, b: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
    """Σ_ab a[n,u,a] b[n,u,b] cg[a,b,m] -> [N, u, m]. As a batched outer product and one matrix
    product: torch.einsum takes broadcast products and small-axis sums here, whose double
    backward costs 2× (the 1o⊗1o→2e quadrupole readout, 256 atoms × 16 channels: 6.2 → 3.0 ms
    for a force-trained step, one thread)."""
    n, u, da = a.shape
    db = b.shape[2]
    outer = torch.bmm(a.reshape(n * u, da, 1), b.reshape(n * u, 1, db))
    return torch.mm(outer.reshape(n * u, da * db), cg.reshape(da * db, -1)).view(n, u, -1)


class EquivariantReadout(nn.Module):
    """Node features (e3nn flat layout, `irreps_in`) -> `irreps_out` (flat layout) × `scale`."""

    in_mul: List[int]
    in_l: List[int]
    in_start: List[int]
    lin_src: List[List[int]]
    lin_off: List[int]
    lin_fan: List[int]
    out_mul: List[int]
    out_l: List[int]
    type_l: List[int]
    type_blocks: List[List[int]]
    type_fan: List[int]
    need_types: List[int]
    quad_a: List[List[int]]
    quad_b: List[List[int]]
    quad_cg: List[List[int]]
    is_scalar: List[int]

    def __init__(self, irreps_in, irreps_out, scale: float = 1.0, hidden: int = 16, bias: bool = False):
        super().__init__()
        irreps_in = o3.Irreps(irreps_in)
        irreps_out = o3.Irreps(irreps_out)
        self.irreps_in = irreps_in
        self.irreps_out = irreps_out
        self.out_scale = float(scale)
        self.hidden = int(hidden)
        in_blocks: List[Tuple[int, int, int, int]] = []  # (mul, l, p, start)
        for mul_ir, sl in zip(irreps_in, irreps_in.slices()):
            in_blocks.append((mul_ir.mul, mul_ir.ir.l, mul_ir.ir.p, sl.start))
        self.in_mul = [b[0] for b in in_blocks]
        self.in_l = [b[1] for b in in_blocks]
        self.in_start = [b[3] for b in in_blocks]
        in_types: List[Tuple[int, int]] = []
        for _, l, p, _ in in_blocks:
            if (l, p) not in in_types:
                in_types.append((l, p))
        # linear part: for each output block, the input blocks of the same irrep
        lin_src: List[List[int]] = []
        lin_off: List[int] = []
        lin_fan: List[int] = []
        total = 0
        # quadratic part: hidden projections of every input type (left and right)
        quad_pairs: List[List[Tuple[int, int, int]]] = []  # per output block: (type a, type b, cg index)
        cgs: List[torch.Tensor] = []
        need_types: List[int] = []
        for mul_ir in irreps_out:
            key = (mul_ir.ir.l, mul_ir.ir.p)
            src = [i for i, b in enumerate(in_blocks) if (b[1], b[2]) == key]
            lin_src.append(src)
            lin_off.append(total)
            fan = sum(in_blocks[i][0] for i in src)
            lin_fan.append(fan)
            total += fan * mul_ir.mul
            pairs: List[Tuple[int, int, int]] = []
            if not src:
                for ta in range(len(in_types)):
                    for tb in range(ta, len(in_types)):
                        (la, pa), (lb, pb) = in_types[ta], in_types[tb]
                        if pa * pb == key[1] and abs(la - lb) <= key[0] <= la + lb:
                            pairs.append((ta, tb, len(cgs)))
                            cgs.append(o3.wigner_3j(la, lb, key[0], dtype=torch.float64) * math.sqrt(2 * key[0] + 1))
                            for t in (ta, tb):
                                if t not in need_types:
                                    need_types.append(t)
                if not pairs:
                    raise ValueError(f"cannot build {mul_ir.ir} from input irreps {irreps_in}")
            quad_pairs.append(pairs)
        self.lin_src = lin_src
        self.lin_off = lin_off
        self.lin_fan = lin_fan
        self.out_mul = [mi.mul for mi in irreps_out]
        self.out_l = [mi.ir.l for mi in irreps_out]
        self.lin_weight = nn.Parameter(torch.randn(max(total, 1)))
        # hidden projections (left, right) for the needed input types
        self.type_l = [t[0] for t in in_types]
        self.type_blocks = [[i for i, b in enumerate(in_blocks) if (b[1], b[2]) == t] for t in in_types]
        self.type_fan = [sum(in_blocks[i][0] for i in blocks) for blocks in self.type_blocks]
        self.need_types = sorted(need_types)
        self.proj = nn.ParameterList([nn.Parameter(torch.randn(2, self.type_fan[t], hidden)) if t in need_types
                                      else nn.Parameter(torch.zeros(2, 1, 1)) for t in range(len(in_types))])
        self.quad_a = [[p[0] for p in pairs] for pairs in quad_pairs]
        self.quad_b = [[p[1] for p in pairs] for pairs in quad_pairs]
        self.quad_cg = [[p[2] for p in pairs] for pairs in quad_pairs]
        maxd = max([c.shape[0] for c in cgs] + [1])
        maxo = max([c.shape[2] for c in cgs] + [1])
        cg_buf = torch.zeros(max(len(cgs), 1), maxd, maxd, maxo, dtype=torch.float64)
        for k, c in enumerate(cgs):
            cg_buf[k, : c.shape[0], : c.shape[1], : c.shape[2]] = c
        self.register_buffer("cg", cg_buf)
        self.quad_weight = nn.ParameterList([nn.Parameter(torch.randn(len(pairs) * hidden, mi.mul))
                                             for pairs, mi in zip(quad_pairs, irreps_out)])
        self.has_bias = bool(bias)
        nscalar = sum(mi.mul for mi in irreps_out if mi.ir.l == 0 and mi.ir.p == 1)
        self.bias = nn.Parameter(torch.zeros(max(nscalar, 1)))
        self.is_scalar = [1 if (mi.ir.l == 0 and mi.ir.p == 1) else 0 for mi in irreps_out]

    def _block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        d = 2 * self.in_l[i] + 1
        return x.narrow(1, self.in_start[i], self.in_mul[i] * d).reshape(x.shape[0], self.in_mul[i], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # hidden projections of the needed types: [N, hidden, 2l+1] (left, right)
        hl: List[torch.Tensor] = []
        hr: List[torch.Tensor] = []
        for t, proj in enumerate(self.proj):
            if t in self.need_types:
                parts: List[torch.Tensor] = []
                for i in self.type_blocks[t]:
                    parts.append(self._block(x, i))
                xt = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [N, fan, d]
                s = 1.0 / math.sqrt(self.type_fan[t])
                hl.append(torch.einsum("nud,uv->nvd", xt, proj[0]) * s)
                hr.append(torch.einsum("nud,uv->nvd", xt, proj[1]) * s)
            else:
                hl.append(x.new_zeros(1, 1, 1))
                hr.append(x.new_zeros(1, 1, 1))
        outs: List[torch.Tensor] = []
        bias_off = 0
        for k, qw in enumerate(self.quad_weight):
            mul = self.out_mul[k]
            d = 2 * self.out_l[k] + 1
            src = self.lin_src[k]
            if len(src) > 0:
                parts = []
                for i in src:
                    parts.append(self._block(x, i))
                xs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                fan = self.lin_fan[k]
                w = self.lin_weight.narrow(0, self.lin_off[k], fan * mul).view(fan, mul)
                y = torch.einsum("nud,uv->nvd", xs, w) * (1.0 / math.sqrt(fan))
            else:
                terms: List[torch.Tensor] = []
                for j in range(len(self.quad_a[k])):
                    a = hl[self.quad_a[k][j]]
                    b = hr[self.quad_b[k][j]]
                    cg = self.cg[self.quad_cg[k][j]].narrow(0, 0, a.shape[2]).narrow(1, 0, b.shape[2]).narrow(2, 0, d).to(a.dtype)
                    terms.append(_coupled(a, b, cg))
                q = terms[0] if len(terms) == 1 else torch.cat(terms, dim=1)
                y = torch.einsum("nud,uv->nvd", q, qw) * (1.0 / math.sqrt(qw.shape[0]))
            if self.has_bias and self.is_scalar[k] == 1:
                y = y + self.bias.narrow(0, bias_off, mul)[None, :, None]
            if self.is_scalar[k] == 1:
                bias_off += mul
            outs.append(y.reshape(n, mul * d))
        return torch.cat(outs, dim=1) * self.out_scale

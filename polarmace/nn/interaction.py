"""Interaction blocks: channel-wise ("uvu") tensor-product message passing, written for CPU speed.

Feature layout inside the trunk: a list of tensors, one per irrep (l, p) of the layer, each
[N, 2l+1, C] (component-major, channel-last; e3nn's real basis and component order inside l).

Message of one layer (MACE):   A_i = Linear( Σ_{j∈N(i)} Σ_paths R_path(r_ij) ⊙ CG_path(x_j ⊗ Y(r̂_ij)) ) / avg_num_neighbors
where x = Linear_up(h), the paths are all (l1, l2) -> l3 with l3 in the target irreps
(0e, 1o, 2e, … up to max_ell, C channels), CG_path = sqrt(2 l3 + 1) · wigner_3j(l1, l2, l3)
(e3nn "component" normalisation; one output slot per path, so the path normalisation is 1), and
R(r) = RadialMLP(Bessel · envelope) gives one weight per path and channel.

Two exact reorganisations make it fast and light on memory (both are checked against e3nn's
o3.TensorProduct in tests/unit/nn/test_nn.py):

* First layer (FirstInteraction): x_j depends only on the sender's element and the last layer of
  the radial MLP is linear, so Σ_j R_l(r_ij)_c x_{z_j,c} Y_l(r̂_ij) =
  Σ_z x_{z,c} Σ_h W_l[h, c] G[i, z, l, h] with G[i, z] = Σ_{j∈N(i), z_j = z} Y(r̂_ij) ⊗ h(r_ij):
  no per-edge, per-channel tensor at all.
* Other layers (Interaction): edges are sorted by receiver and cut into chunks of `chunk` slots
  (padded with dummy edges beyond r_max whose radial weights are exactly zero); the sum over the
  edges of a chunk and over m1 is one batched GEMM  out[chunk] = M_pathᵀ · (R_path ⊙ x_j), with
  M_path[e] = Σ_m2 CG[m1, m2, m3] Y_m2(r̂_e) channel-independent. No [E, C, Σ(2l3+1)] tensor is
  ever formed, and in eager mode the per-path [E, d1, C] products are recomputed in the backward
  rather than kept (custom autograd function, double-differentiable; TorchScript uses plain ops).
"""



import math
from typing import List, Tuple

import torch
from e3nn import o3
from torch import nn

from .radial import RadialMLP

IrrepKey = Tuple[int, int]  # (l, p)


def irrep_name(l: int, p: int) -> str:
    return f"{l}{'e' if p == 1 else 'o'}"


class ChannelLinear(nn.Module):
    """Equivariant linear map between lists of [N, 2l+1, C_in] features (e3nn o3.Linear semantics).

    `irreps_in` lists the (l, p) of each input tensor (repetitions allowed, each with C_in
    channels); every output irrep is Σ over the inputs with the same (l, p) of x @ W / sqrt(fan_in),
    W ~ N(0, 1). Outputs with no matching input are zero.
    """

    def __init__(self, irreps_in: List[IrrepKey], irreps_out: List[IrrepKey], c_in: int, c_out: int):
        super().__init__()
        self.c_in = int(c_in)
        self.c_out = int(c_out)
        self.dims_out: List[int] = [2 * l + 1 for l, _ in irreps_out]
        sources: List[List[int]] = []
        offsets: List[int] = []
        fan: List[int] = []
        total = 0
        for key in irreps_out:
            src = [i for i, k in enumerate(irreps_in) if k == key]
            sources.append(src)
            offsets.append(total)
            fan.append(len(src) * c_in)
            total += len(src) * c_in * c_out
        self.sources = sources
        self.offsets = offsets
        self.fan = fan
        self.weight = nn.Parameter(torch.randn(max(total, 1)))

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        n = xs[0].shape[0]
        outs: List[torch.Tensor] = []
        for k in range(len(self.sources)):
            src = self.sources[k]
            if len(src) == 0:
                outs.append(xs[0].new_zeros(n, self.dims_out[k], self.c_out))
                continue
            fan = self.fan[k]
            w = self.weight.narrow(0, self.offsets[k], fan * self.c_out).view(fan, self.c_out)
            if len(src) == 1:
                x = xs[src[0]]
            else:
                parts: List[torch.Tensor] = []
                for i in src:
                    parts.append(xs[i])
                x = torch.cat(parts, dim=2)
            outs.append(torch.matmul(x, w) * (1.0 / math.sqrt(fan)))
        return outs


class ElementLinear(nn.Module):
    """Element-dependent equivariant linear map (MACE's skip tensor product with the one-hot
    element attributes): out_l = x_l @ W[z, l] / sqrt(C_in · num_elements).

    Nodes must be sorted by element, `counts[e]` of element e in a row.
    """

    sources: List[int]
    dims_out: List[int]

    def __init__(self, irreps_in: List[IrrepKey], irreps_out: List[IrrepKey], c_in: int, c_out: int,
                 num_elements: int):
        super().__init__()
        self.c_in = int(c_in)
        self.c_out = int(c_out)
        self.num_elements = int(num_elements)
        src: List[int] = []
        for key in irreps_out:
            src.append(irreps_in.index(key) if key in irreps_in else -1)
        self.sources = src
        self.dims_out: List[int] = [2 * l + 1 for l, _ in irreps_out]
        self.weight = nn.Parameter(torch.randn(num_elements, len(irreps_out), c_in, c_out))
        self.scale = 1.0 / math.sqrt(c_in * num_elements)

    def forward(self, xs: List[torch.Tensor], counts: List[int]) -> List[torch.Tensor]:
        n = xs[0].shape[0]
        outs: List[torch.Tensor] = []
        for k in range(len(self.sources)):
            s = self.sources[k]
            if s < 0:
                outs.append(xs[0].new_zeros(n, self.dims_out[k], self.c_out))
                continue
            parts: List[torch.Tensor] = []
            groups = torch.split(xs[s], counts, dim=0)
            for e in range(len(counts)):
                if counts[e] > 0:
                    parts.append(torch.matmul(groups[e], self.weight[e, k]))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            outs.append(out * self.scale)
        return outs


def target_irreps(max_ell: int) -> List[IrrepKey]:
    """Irreps of the atomic basis A: 0e, 1o, 2e, … (natural parity) up to max_ell."""
    return [(l, (-1) ** l) for l in range(max_ell + 1)]


def tp_paths(irreps_in: List[IrrepKey], max_ell: int) -> List[Tuple[int, int, int, int]]:
    """Channel-wise paths (i_in, l2, l3, p3): x[i_in] ⊗ Y_l2 -> (l3, p3), l3 in the target irreps.

    Order: by input irrep, then l2, then l3 (the order of e3nn's instructions in the tests).
    """
    targets = target_irreps(max_ell)
    paths = []
    for i, (l1, p1) in enumerate(irreps_in):
        for l2 in range(max_ell + 1):
            p2 = (-1) ** l2
            for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                if (l3, p1 * p2) in targets:
                    paths.append((i, l2, l3, p1 * p2))
    return paths


def _path_message_plain(h: torch.Tensor, w: torch.Tensor, xj: torch.Tensor, m: torch.Tensor,
                        nchunks: int, chunk: int) -> torch.Tensor:
    """out[k] = M[k]ᵀ · ((h @ w) ⊙ x_j) summed over the slots of chunk k: [chunks, d3, C].

    h [S, H] radial hidden features, w [H, C] last-layer weights of this path, xj [S, d1, C]
    sender features, m [S, d1·d3] the Y-contracted Clebsch–Gordan matrices of this path.
    """
    d1 = xj.shape[1]
    c = xj.shape[2]
    d3 = m.shape[1] // d1
    r = torch.matmul(h, w)  # [S, C]
    a = r[:, None, :] * xj  # [S, d1, C]
    mt = m.view(nchunks, chunk * d1, d3).transpose(1, 2)
    return torch.bmm(mt, a.view(nchunks, chunk * d1, c))


class _PathMessage(torch.autograd.Function):
    """Same map as _path_message_plain, but keeps only the (shared) inputs for the backward and
    recomputes the per-edge, per-channel products there: the saved memory of an interaction drops
    from Σ_paths (1 + d1)·S·C to the inputs. The backward is written with differentiable ops, so
    double backward (force terms in a training loss) works."""

    @staticmethod
    def forward(ctx, h, w, xj, m, nchunks: int, chunk: int):  # type: ignore[override]
        ctx.save_for_backward(h, w, xj, m)
        ctx.nchunks = nchunks
        ctx.chunk = chunk
        with torch.no_grad():
            return _path_message_plain(h, w, xj, m, nchunks, chunk)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        h, w, xj, m = ctx.saved_tensors
        nchunks, chunk = ctx.nchunks, ctx.chunk
        d1 = xj.shape[1]
        c = xj.shape[2]
        d3 = m.shape[1] // d1
        r = torch.matmul(h, w)
        grad_h = grad_w = grad_xj = grad_m = None
        mv = m.view(nchunks, chunk * d1, d3)
        if ctx.needs_input_grad[3]:
            a = (r[:, None, :] * xj).view(nchunks, chunk * d1, c)
            grad_m = torch.bmm(a, grad_out.transpose(1, 2)).reshape(m.shape)  # [chunks, K·d1, d3]
        grad_a = torch.bmm(mv, grad_out).view(xj.shape)  # [S, d1, C]
        if ctx.needs_input_grad[2]:
            grad_xj = grad_a * r[:, None, :]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_r = (grad_a * xj).sum(1)  # [S, C]
            if ctx.needs_input_grad[0]:
                grad_h = torch.matmul(grad_r, w.t())
            if ctx.needs_input_grad[1]:
                grad_w = torch.matmul(h.t(), grad_r)
        return grad_h, grad_w, grad_xj, grad_m, None, None


@torch.jit.unused
def _path_message_recompute(h: torch.Tensor, w: torch.Tensor, xj: torch.Tensor, m: torch.Tensor,
                            nchunks: int, chunk: int) -> torch.Tensor:
    return _PathMessage.apply(h, w, xj, m, nchunks, chunk)


def path_message(h: torch.Tensor, w: torch.Tensor, xj: torch.Tensor, m: torch.Tensor, nchunks: int,
                 chunk: int, recompute: bool = True) -> torch.Tensor:
    """Chunked channel-wise tensor-product message of one path (see _path_message_plain).

    In eager mode with `recompute`, a custom autograd function that saves only its inputs (less
    memory, identical values and derivatives); under TorchScript the plain ops.
    """
    if recompute and not torch.jit.is_scripting():
        return _path_message_recompute(h, w, xj, m, nchunks, chunk)
    return _path_message_plain(h, w, xj, m, nchunks, chunk)


class FirstInteraction(nn.Module):
    """Layer-1 interaction for element-only node features.

    A = ElementLinear( Linear( Σ_j R(r_ij) ⊙ x_{z_j} ⊗ Y(r̂_ij) ) / avg_num_neighbors )
    with x_z = Linear_up(embedding_z) (scalars only: paths 0e ⊗ Y_l -> l): MACE's non-residual
    first block. With `residual` the element linear is left out (MACE's residual first block; the
    trunk then adds the self-connection of the embedding after the product).
    """

    def __init__(self, num_elements: int, num_channels: int, max_ell: int, radial_sizes: List[int],
                 avg_num_neighbors: float, residual: bool = False):
        super().__init__()
        self.residual = bool(residual)
        c = int(num_channels)
        self.num_elements = int(num_elements)
        self.num_channels = c
        self.max_ell = int(max_ell)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.linear_up = ChannelLinear([(0, 1)], [(0, 1)], c, c)
        self.num_paths = max_ell + 1
        self.radial = RadialMLP(list(radial_sizes) + [self.num_paths * c])
        targets = target_irreps(max_ell)
        self.linear = ChannelLinear(targets, targets, c, c)
        self.skip = ElementLinear(targets, [] if self.residual else targets, c, c, num_elements)

    def forward(self, embedding_table: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor,
                sender_element: torch.Tensor, chunk_node: torch.Tensor, chunk: int, num_nodes: int,
                counts: List[int]) -> List[torch.Tensor]:
        c = self.num_channels
        nz = self.num_elements
        x = self.linear_up([embedding_table[:, None, :]])[0][:, 0, :]  # [Z, C]
        h = self.radial.hidden(radial)  # [S, H]
        nh = h.shape[1]
        ns = h.shape[0]
        if nz > 1:
            onehot = torch.nn.functional.one_hot(sender_element, nz).to(h.dtype)  # [S, Z]
            hz = (onehot[:, :, None] * h[:, None, :]).reshape(ns, nz * nh)
        else:
            hz = h
        nchunks = chunk_node.shape[0]
        nsh = sh.shape[1]
        # G[i, m, z, h] = Σ_{j ∈ N(i), z_j = z} Y_m(r̂_ij) h(r_ij): one GEMM per chunk of edges
        gc = torch.bmm(sh.view(nchunks, chunk, nsh).transpose(1, 2), hz.view(nchunks, chunk, nz * nh))
        g = torch.zeros(num_nodes, nsh, nz * nh, dtype=gc.dtype, device=gc.device)
        g = g.index_add(0, chunk_node, gc).view(num_nodes, nsh, nz, nh)
        w = self.radial.last_weight * (self.radial.last_scale / self.avg_num_neighbors)
        msgs: List[torch.Tensor] = []
        for l in range(self.max_ell + 1):
            t = torch.matmul(g.narrow(1, l * l, 2 * l + 1), w.narrow(1, l * c, c))  # [N, 2l+1, Z, C]
            msgs.append((t * x[None, None, :, :]).sum(2))  # [N, 2l+1, C]
        if self.residual:
            return self.linear(msgs)
        return self.skip(self.linear(msgs), counts)


class Interaction(nn.Module):
    """Residual interaction block (MACE's RealAgnosticResidualInteractionBlock).

    Returns (A, sc): A on the target irreps (0e … max_ell, C channels) and the self-connection
    sc = ElementLinear(h) on `irreps_sc` (the irreps the product block outputs).
    """

    def __init__(self, irreps_in: List[IrrepKey], irreps_sc: List[IrrepKey], num_elements: int,
                 num_channels: int, max_ell: int, radial_sizes: List[int], avg_num_neighbors: float):
        super().__init__()
        c = int(num_channels)
        self.num_channels = c
        self.max_ell = int(max_ell)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.irreps_in = list(irreps_in)
        self.linear_up = ChannelLinear(self.irreps_in, self.irreps_in, c, c)
        paths = tp_paths(self.irreps_in, max_ell)
        self.paths = paths
        self.num_paths = len(paths)
        self.path_input: List[int] = [p[0] for p in paths]
        self.path_l2: List[int] = [p[1] for p in paths]
        self.path_d1: List[int] = [2 * self.irreps_in[p[0]][0] + 1 for p in paths]
        self.path_d3: List[int] = [2 * p[2] + 1 for p in paths]
        # per path: CG·sqrt(2 l3 + 1) reshaped to [2l2+1, (2l1+1)(2l3+1)] so that
        # M_path[e, m1, m3] = Σ_m2 Y[e, m2] CG[m1, m2, m3]
        cg_list = []
        for (i, l2, l3, _) in paths:
            l1 = self.irreps_in[i][0]
            w = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)
            cg_list.append(w.permute(1, 0, 2).reshape(2 * l2 + 1, -1))
        width = max(t.shape[1] for t in cg_list)
        cg = torch.zeros(len(paths), 2 * max_ell + 1, width, dtype=torch.float64)
        for k, t in enumerate(cg_list):
            cg[k, : t.shape[0], : t.shape[1]] = t
        self.register_buffer("cg", cg)  # float64; cast to the input dtype at run time
        self.radial = RadialMLP(list(radial_sizes) + [self.num_paths * c])
        mid = [(p[2], p[3]) for p in paths]
        self.linear = ChannelLinear(mid, target_irreps(max_ell), c, c)
        self.skip = ElementLinear(self.irreps_in, list(irreps_sc), c, c, num_elements)
        # eager mode: recompute the per-edge products in the backward instead of keeping them
        self.recompute = True

    def forward(self, xs: List[torch.Tensor], sh: torch.Tensor, radial: torch.Tensor,
                sender: torch.Tensor, chunk_node: torch.Tensor, chunk: int, num_nodes: int,
                counts: List[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        c = self.num_channels
        sc = self.skip(xs, counts)
        xu = self.linear_up(xs)
        xj: List[torch.Tensor] = []
        for x in xu:
            xj.append(x.index_select(0, sender))  # [S, d1, C]
        h = self.radial.hidden(radial)  # [S, H]
        w = self.radial.last_weight * (self.radial.last_scale / self.avg_num_neighbors)
        nchunks = chunk_node.shape[0]
        mids: List[torch.Tensor] = []
        for k in range(self.num_paths):
            d1 = self.path_d1[k]
            d3 = self.path_d3[k]
            l2 = self.path_l2[k]
            cgk = self.cg[k].narrow(0, 0, 2 * l2 + 1).narrow(1, 0, d1 * d3).to(sh.dtype)
            m = torch.matmul(sh.narrow(1, l2 * l2, 2 * l2 + 1), cgk)  # [S, d1*d3]
            out = path_message(h, w.narrow(1, k * c, c), xj[self.path_input[k]], m, nchunks, chunk,
                               self.recompute)  # [chunks, d3, C]
            node = torch.zeros(num_nodes, d3, c, dtype=out.dtype, device=out.device)
            mids.append(node.index_add(0, chunk_node, out))
        return self.linear(mids), sc

"""MACETrunk: the MACE equivariant message-passing network (energy contributions + node features).

    trunk = MACETrunk(elements=[1, 8], r_max=5.0, avg_num_neighbors=50.0)   # MACE defaults
    node_features, node_energy = trunk(atomic_numbers, edge_index, vectors)

Inputs: atomic_numbers [N] (int), edge_index [2, E] (row 0 receiver/centre i, row 1 sender/
neighbour j), vectors [E, 3] = r_j − r_i (+ shift) in Å; batch is accepted and ignored (message
passing is local). Outputs, in the atom order of the input:

* node_features [N, trunk.node_features_irreps.dim] in e3nn's flat layout (irrep blocks in order,
  mul-major inside a block): the concatenation of every layer's output features. With the MACE
  defaults (hidden 128x0e+128x1o, 2 layers, last layer scalars only) that is
  "128x0e+128x1o" (layer 1) + "128x0e" (layer 2). Use `trunk.node_features_irreps` and
  `trunk.layer_irreps` rather than hard-coding it.
* node_energy [N]: Σ over layers of the per-layer readouts (linear, last layer an MLP), without
  E0 and without scale/shift (the model adds those).

The trunk does not differentiate: forces/stress come from the caller's single autograd call
through `vectors` (twice differentiable: force terms in a loss backpropagate to the weights).
Scriptable with torch.jit.script; float32 and float64: convert the module with .to(dtype) /
.double() / .float(). Precomputed constants (Clebsch–Gordan, coupling basis, Bessel frequencies)
are built in float64 and cast to the input dtype at run time, so a trunk built under a float32
default dtype is still exact after .double() (but .float() followed by .double() rounds them).

Structure (per layer t):  h⁰ = embedding(z)
  A^t = Interaction(h^{t−1})            (layer 1: FirstInteraction, no self-connection)
  h^t = Linear(SymmetricContraction(A^t, z)) + ElementLinear(h^{t−1})  (t = 1: no residual unless
        residual_first)
  E_i += Readout^t(h^t scalars)
Internally nodes are sorted by element and edges by receiver (chunks of `edge_chunk` slots).

MACE variants: `residual_first` (False: MACE's non-residual first block, A¹ = ElementLinear(Linear(
msg)); True: the residual first block of `mace_run_train --model ScaleShiftMACE`, A¹ = Linear(msg)
and h¹ = Linear(SymmetricContraction(A¹)) + ElementLinear(h⁰)); `last_readout` ("mlp": SiLU MLP
with `readout_mlp_hidden` units, polarmace's choice for every depth; "linear": a linear readout,
which is MACE's only readout when num_interactions = 1).

Options beyond MACE's hyper-parameters: `last_layer_scalars_only` (MACE: True; False keeps the
hidden irreps in the last layer too, e.g. for dipole readouts that see both layers),
`edge_chunk` (edge slots per GEMM, 16), `low_memory` (eager mode: recompute the per-edge,
per-channel products in the backward instead of keeping them — about a third less memory for
energy + forces at some extra CPU time; no effect under TorchScript).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from e3nn import o3
from torch import nn

from .embedding import ElementEmbedding, ElementMapping
from .interaction import ChannelLinear, ElementLinear, FirstInteraction, Interaction
from .product import SymmetricContraction
from .radial import RadialEmbedding
from .readouts import LinearReadout, NonLinearReadout


class ProductBlock(nn.Module):
    """h = Linear(SymmetricContraction(A)) (+ self-connection added by the caller)."""

    def __init__(self, max_ell: int, correlation: int, irreps_out: List[Tuple[int, int]],
                 num_elements: int, num_channels: int):
        super().__init__()
        ir = o3.Irreps([(1, (l, p)) for l, p in irreps_out])
        self.contraction = SymmetricContraction(max_ell, correlation, ir, num_elements, num_channels)
        self.linear = ChannelLinear(list(irreps_out), list(irreps_out), num_channels, num_channels)
        self.dims: List[int] = [2 * l + 1 for l, _ in irreps_out]
        self.num_channels = num_channels

    def forward(self, a: List[torch.Tensor], counts: List[int]) -> List[torch.Tensor]:
        x = torch.cat(a, dim=1)  # [N, d, C]
        xc = x.permute(2, 0, 1).contiguous()  # [C, N, d]
        b = self.contraction(xc, counts)  # [C, N, out_dim]
        b = b.permute(1, 2, 0)  # [N, out_dim, C]
        outs: List[torch.Tensor] = []
        for x in torch.split(b, self.dims, dim=1):
            outs.append(x)
        return self.linear(outs)


def _parse_hidden(hidden_irreps) -> Tuple[int, List[Tuple[int, int]]]:
    irreps = o3.Irreps(hidden_irreps).simplify()
    irreps = o3.Irreps(sorted(irreps, key=lambda mi: (mi.ir.l, -mi.ir.p)))  # 0e first
    muls = {mi.mul for mi in irreps}
    if len(muls) != 1:
        raise ValueError(f"hidden_irreps must have one multiplicity for every irrep (got {irreps})")
    keys = [(mi.ir.l, mi.ir.p) for mi in irreps]
    if (0, 1) not in keys:
        raise ValueError("hidden_irreps must contain scalars (0e)")
    if len(set(keys)) != len(keys):
        raise ValueError(f"hidden_irreps lists an irrep twice: {irreps}")
    return muls.pop(), keys


class MACETrunk(nn.Module):
    def __init__(
        self,
        elements: Sequence[int],
        r_max: float = 5.0,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        max_ell: int = 3,
        hidden_irreps: Union[str, o3.Irreps] = "128x0e+128x1o",
        num_interactions: int = 2,
        correlation: Union[int, Sequence[int]] = 3,
        radial_mlp: Sequence[int] = (64, 64, 64),
        avg_num_neighbors: float = 1.0,
        last_layer_scalars_only: bool = True,
        readout_mlp_hidden: int = 16,
        edge_chunk: int = 16,
        low_memory: bool = True,
        residual_first: bool = False,
        last_readout: str = "mlp",
    ):
        super().__init__()
        if last_readout not in ("mlp", "linear"):
            raise ValueError(f"last_readout must be 'mlp' or 'linear', got {last_readout!r}")
        self.residual_first = bool(residual_first)
        self.last_readout = str(last_readout)
        if num_interactions < 1:
            raise ValueError("num_interactions must be >= 1")
        elements = [int(z) for z in elements]
        self.elements = elements
        self.num_elements = len(elements)
        self.r_max = float(r_max)
        self.max_ell = int(max_ell)
        self.num_interactions = int(num_interactions)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.edge_chunk = int(edge_chunk)
        if isinstance(correlation, int):
            correlation = [correlation] * num_interactions
        correlation = [int(c) for c in correlation]
        if len(correlation) != num_interactions:
            raise ValueError("correlation must be an int or one value per interaction")
        self.correlation = correlation
        c, hidden = _parse_hidden(hidden_irreps)
        self.num_channels = c
        self.hidden_irreps = o3.Irreps([(c, (l, p)) for l, p in hidden])
        self.mapping = ElementMapping(elements)
        self.embedding = ElementEmbedding(self.num_elements, c)
        self.radial_embedding = RadialEmbedding(r_max, num_bessel, num_polynomial_cutoff)
        self.spherical_harmonics = o3.SphericalHarmonics(
            o3.Irreps.spherical_harmonics(max_ell), normalize=True, normalization="component")
        radial_sizes = [num_bessel] + [int(s) for s in radial_mlp]

        layer_out: List[List[Tuple[int, int]]] = []
        for t in range(num_interactions):
            last = t == num_interactions - 1
            layer_out.append([(0, 1)] if (last and last_layer_scalars_only) else list(hidden))
        self.layer_keys = layer_out
        self.first = FirstInteraction(self.num_elements, c, max_ell, radial_sizes, avg_num_neighbors,
                                      residual=self.residual_first)
        # residual first block: self-connection of the embedding (0e only); an empty list otherwise,
        # so that the state dict of a non-residual trunk is unchanged
        self.first_skip = nn.ModuleList(
            [ElementLinear([(0, 1)], layer_out[0], c, c, self.num_elements)] if self.residual_first else [])
        interactions = []
        for t in range(1, num_interactions):
            interactions.append(Interaction(layer_out[t - 1], layer_out[t], self.num_elements, c, max_ell,
                                            radial_sizes, avg_num_neighbors))
        for block in interactions:
            block.recompute = bool(low_memory)
        self.interactions = nn.ModuleList(interactions)
        products = [ProductBlock(max_ell, correlation[t], layer_out[t], self.num_elements, c)
                    for t in range(num_interactions)]
        readouts = []
        for t in range(num_interactions):
            if t == num_interactions - 1 and self.last_readout == "mlp":
                readouts.append(NonLinearReadout(c, readout_mlp_hidden))
            else:
                readouts.append(LinearReadout(c))
        self.first_product = products[0]
        self.first_readout = readouts[0]
        self.products = nn.ModuleList(products[1:])
        self.readouts = nn.ModuleList(readouts[1:])
        self.layer_irreps = [o3.Irreps([(c, (l, p)) for l, p in keys]) for keys in layer_out]
        self.node_features_irreps = o3.Irreps(sum((list(ir) for ir in self.layer_irreps), []))

    # ------------------------------------------------------------------------------------------
    def num_edge_chunks(self, receiver_degree: torch.Tensor) -> int:
        """Chunks of the padded edge layout, Σ_i ceil(deg_i / edge_chunk), from the edges per
        centre atom [N] (a host tensor: no device sync)."""
        k0 = self.edge_chunk
        return int(torch.div(receiver_degree + (k0 - 1), k0, rounding_mode="floor").sum())

    def _edge_layout(self, receiver: torch.Tensor, sender: torch.Tensor, num_nodes: int,
                     num_chunks: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunked, receiver-sorted edge slots.

        Returns (order, slot, chunk_node, sender_pad): edge order[e'] goes to slot[e'] of the
        padded layout [num_chunks * chunk]; chunk_node[k] is the receiver of chunk k; sender_pad the
        sender of every slot (0 for padding). `num_chunks` (see `num_edge_chunks`) given, the
        layout's size is known on the host and building it needs no device sync.
        """
        k0 = self.edge_chunk
        order = torch.argsort(receiver, stable=True)
        recv = receiver.index_select(0, order)
        # scatter-add rather than bincount: bincount's output size depends on the data
        deg = torch.zeros(num_nodes, dtype=recv.dtype, device=recv.device).index_add_(
            0, recv, torch.ones_like(recv))
        nch = torch.div(deg + (k0 - 1), k0, rounding_mode="floor")
        first_chunk = torch.cumsum(nch, 0) - nch
        first_edge = torch.cumsum(deg, 0) - deg
        rank = torch.arange(recv.shape[0], device=recv.device) - first_edge.index_select(0, recv)
        slot = (first_chunk.index_select(0, recv) + torch.div(rank, k0, rounding_mode="floor")) * k0 + rank % k0
        chunk_node = torch.repeat_interleave(torch.arange(num_nodes, device=recv.device), nch,
                                             output_size=num_chunks)
        if chunk_node.shape[0] == 0:  # no edges at all: one empty chunk
            chunk_node = torch.zeros(1, dtype=torch.long, device=recv.device)
        nslots = chunk_node.shape[0] * k0
        sender_pad = torch.zeros(nslots, dtype=torch.long, device=recv.device)
        sender_pad = sender_pad.index_copy(0, slot, sender.index_select(0, order))
        return order, slot, chunk_node, sender_pad

    def forward(self, atomic_numbers: torch.Tensor, edge_index: torch.Tensor, vectors: torch.Tensor,
                batch: Optional[torch.Tensor] = None, element_counts: Optional[List[int]] = None,
                num_chunks: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Node features [N, F] and node energies [N] (before scale and shift).

        `element_counts` (atoms of each model element, in `elements` order) and `num_chunks`
        (`num_edge_chunks` of the edges per centre atom) are host-side facts of the batch; given
        both, the atomic numbers are taken as already validated and the forward pass reads
        nothing back from the device. Without them they are computed here (device syncs).
        """
        n = atomic_numbers.shape[0]
        if element_counts is None:
            elem = self.mapping(atomic_numbers)
            counts: List[int] = torch.bincount(elem, minlength=self.num_elements).tolist()
        else:
            elem = self.mapping.table.index_select(0, atomic_numbers.long())
            counts = element_counts
        perm = torch.argsort(elem, stable=True)  # sorted position -> original atom
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=perm.device)
        elem_sorted = elem.index_select(0, perm)
        receiver = inv.index_select(0, edge_index[0])
        sender = inv.index_select(0, edge_index[1])
        if num_chunks is not None and num_chunks == 0:
            num_chunks = None  # no edges: _edge_layout's one empty chunk
        order, slot, chunk_node, sender_pad = self._edge_layout(receiver, sender, n, num_chunks)
        nslots = sender_pad.shape[0]
        # padded vectors: dummy slots sit at 2 r_max (radial features and weights exactly zero)
        fill = torch.zeros(nslots, 3, dtype=vectors.dtype, device=vectors.device)
        fill[:, 2] = 2.0 * self.r_max
        vec = fill.index_copy(0, slot, vectors.index_select(0, order))
        lengths = torch.linalg.norm(vec, dim=1, keepdim=True)
        sh = self.spherical_harmonics(vec)
        radial = self.radial_embedding(lengths)
        k0 = self.edge_chunk

        feats_out: List[torch.Tensor] = []
        energy = vectors.new_zeros(n)
        # layer 1
        a = self.first(self.embedding.table(), sh, radial, elem_sorted.index_select(0, sender_pad),
                       chunk_node, k0, n, counts)
        h = self.first_product(a, counts)
        for skip in self.first_skip:
            h0 = self.embedding.table().index_select(0, elem_sorted)[:, None, :]  # [N, 1, C]
            h = [x + y for x, y in zip(h, skip([h0], counts))]
        energy = energy + self.first_readout(h[0])
        for x in h:
            feats_out.append(x.transpose(1, 2).reshape(n, -1))
        for interaction, product, readout in zip(self.interactions, self.products, self.readouts):
            a, sc = interaction(h, sh, radial, sender_pad, chunk_node, k0, n, counts)
            hb = product(a, counts)
            h = [x + y for x, y in zip(hb, sc)]
            energy = energy + readout(h[0])
            for x in h:
                feats_out.append(x.transpose(1, 2).reshape(n, -1))
        feats = torch.cat(feats_out, dim=1)
        return feats.index_select(0, inv), energy.index_select(0, inv)

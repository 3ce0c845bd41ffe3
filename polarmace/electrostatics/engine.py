"""The `Electrostatics` module: energy, potentials, fields and linear response of
Gaussian-smeared multipoles for batches of periodic, slab and open structures (SPEC §2–§4).

Conventions (see kernels.py): the pair kernel is k_e·erf(r/(√2σ))/r; sources carry charges q,
dipoles μ and traceless second moments Θ. For periodic cells the k = 0 term is dropped, so a net
charge Q sits on a uniform neutralising background; the energy includes that background's
interaction with the short-range part of the split kernel, −(π k_e Q²/2V)(1/β² − 1/a²), which
makes it independent of the Ewald splitting parameter β (a = 1/(√2σ)). With σ > 0 the default
split is β = a: the real-space part vanishes and the reciprocal sum, truncated where its Gaussian
has decayed to `accuracy`, is the whole answer. Point multipoles (σ = 0) use a real-space part
over a neighbour list.

Slabs (pbc = [T, T, F], a padded 3D cell) add the Yeh–Berkowitz correction with its
charged-system generalisation (Ballenegger, Arnold & Cerdà 2009):
    E_YB = (2π k_e/V) [M_z² − Q Σ_i (q_i z_i² + 2 μ_iz z_i) − Q² L_z²/12]
with z along the slab normal and L_z the cell height along it.

External field E_ext (V/Å): for open structures it couples to everything through the external
potential −E_ext·r (charges, induced charges) and the field (dipoles, induced dipoles), so
−∂E/∂E_ext is the total dipole. For periodic structures it is NOT coupled in the energy (the
position operator is not periodic): apply it through Born effective charges instead
(`observables.born_effective_charges`), which is not conservative.
"""

import contextlib
import math
from typing import Iterator, NamedTuple, Optional, Tuple

import torch

from polarmace.units import COULOMB
from polarmace.electrostatics.validation import check_cell, validate_inputs, validate_shapes
from polarmace.electrostatics.response import induced_charges, induced_dipoles, segment_sum
from polarmace.electrostatics import charge_ewald, kernels, direct, ewald, pme


#: Gaussian widths σ (Å) at or above this use β = 1/(√2σ): the reciprocal sum alone is converged
#: and cheapest there. Narrower Gaussians split the sum like point charges.
RECIPROCAL_ONLY_SIGMA = 0.8


class ElectrostaticsResult(NamedTuple):
    """What `Electrostatics.forward` returns (per structure [B], per atom [N])."""

    energy: torch.Tensor                     # [B] eV, total (permanent + response + field)
    potential: torch.Tensor                  # [N] V, from all other permanent multipoles
    field: torch.Tensor                      # [N,3] V/Å, likewise (external field not included)
    induced_charges: Optional[torch.Tensor]  # [N] e
    induced_dipoles: Optional[torch.Tensor]  # [N,3] e·Å
    permanent_energy: torch.Tensor           # [B] eV, multipole–multipole energy
    response_energy: torch.Tensor            # [B] eV, induced charges + induced dipoles
    charges: torch.Tensor                    # [N] e, permanent charges after the total-charge constraint


def _reindex(mask_structures: torch.Tensor, batch: torch.Tensor,
             atom_index: torch.Tensor) -> torch.Tensor:
    """New contiguous structure indices for the atoms of a subset of structures."""
    new_id = torch.cumsum(mask_structures.long(), 0) - 1
    return new_id[batch[atom_index]]


class Electrostatics(torch.nn.Module):
    """Electrostatics of Gaussian-smeared multipoles, batched, differentiable twice.

    Args:
        sigma: Gaussian width σ in Å (0 = point multipoles).
        method: "auto" (direct sums for open structures, Ewald for small periodic cells, PME for
            large ones), "ewald", "pme" or "direct" (open structures only).
        accuracy: relative truncation error of the reciprocal (and real-space) sums.
        kspace: "converged" (default) or "les": the original method's truncated k-set
            |k| ≤ 2π/dl, reciprocal only, kept to reproduce published models (not converged at
            σ = 1 and discontinuous under strain).
        dl: k-space resolution in Å for kspace="les".
        remove_self_interaction: if False the Gaussian self-energy of every multipole is added.
        splitting: Ewald β in 1/Å (None: β = 1/(√2σ), reciprocal only, for σ ≥ 0.8 Å; else
            from real_space_cutoff, with a real-space part).
        real_space_cutoff: Å, for point multipoles (σ = 0) or an explicit β < a.
        pme_order: B-spline order of the particle mesh (0 = automatic: 8, or 10 with
            quadrupoles in sparse or very large cells, where order 8 needs a much finer mesh).
        pme_threshold: "auto" switches to PME above this many atoms in a periodic structure.
        charge_conservation: induced charges conserve the total charge; None = only where a
            total_charge is given.
    """

    def __init__(self, sigma: float = 1.0, method: str = "auto", accuracy: float = 1e-6,
                 kspace: str = "converged", dl: float = 2.0, remove_self_interaction: bool = True,
                 splitting: Optional[float] = None, real_space_cutoff: float = 9.0,
                 pme_order: int = 0, pme_threshold: int = 100,
                 charge_conservation: Optional[bool] = None) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"Electrostatics: sigma must be >= 0, got {sigma}")
        if method not in ("auto", "ewald", "pme", "direct"):
            raise ValueError(f"Electrostatics: unknown method {method!r}; "
                             "choose 'auto', 'ewald', 'pme' or 'direct'")
        if kspace not in ("converged", "les"):
            raise ValueError(f"Electrostatics: unknown kspace {kspace!r}; choose 'converged' or 'les'")
        if not 0.0 < accuracy < 1.0:
            raise ValueError(f"Electrostatics: accuracy must lie in (0, 1), got {accuracy}")
        if sigma == 0.0 and not remove_self_interaction:
            raise ValueError("Electrostatics: point multipoles (sigma=0) have an infinite "
                             "self-energy; use remove_self_interaction=True")
        if kspace == "les" and sigma == 0.0:
            raise ValueError("Electrostatics: kspace='les' is a reciprocal-only sum and needs sigma > 0")
        if kspace == "les" and method == "pme":
            raise ValueError("Electrostatics: kspace='les' uses the explicit k-set; use method='ewald' or 'auto'")
        self.sigma = float(sigma)
        self.method = method
        self.accuracy = float(accuracy)
        self.kspace = kspace
        self.dl = float(dl)
        self.remove_self_interaction = remove_self_interaction
        self.pme_order = int(pme_order)
        self.pme_threshold = int(pme_threshold)
        self.charge_conservation = charge_conservation
        self.real_space_cutoff = float(real_space_cutoff)
        self.coulomb = COULOMB  # attribute: TorchScript cannot read module-level floats
        self.reciprocal_only_sigma = RECIPROCAL_ONLY_SIGMA
        # Gaussian exponent of the full kernel (∞ for point multipoles, stored as 0 = "none").
        self.a = 1.0 / (math.sqrt(2.0) * sigma) if sigma > 0 else 0.0
        if splitting is not None and sigma > 0 and splitting > self.a:
            raise ValueError(f"Electrostatics: splitting β={splitting} must be <= 1/(√2σ)={self.a:.6f}")
        self.splitting = float(splitting) if splitting is not None else 0.0
        # settings for charges only; _split() adapts them to the highest multipole of a call
        self.beta, self.kmax, self.needs_real_space = self._split(0)
        self.taper_width = 1.1

    @torch.jit.unused
    def _neighbour_list(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                        batch: torch.Tensor, cutoff: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Real-space pairs (matscipy; Python only: point multipoles are not exportable)."""
        from polarmace.neighbours import neighbour_pairs
        return neighbour_pairs(positions, cell, pbc, batch, cutoff)

    def _split(self, order: int) -> Tuple[float, float, bool]:
        """(β, kmax, needs_real_space) for sources up to multipole `order` (0 q, 1 μ, 2 Θ).

        The truncated terms behave like x^order·e^(−x) (x = k²/4β² in k-space, β²r² in real
        space): higher multipoles carry extra powers of k or r, so x solves
        x − order·ln x = ln(1/accuracy) and the relative error stays at `accuracy`.
        """
        x = -math.log(self.accuracy)
        target = x
        for _ in range(50):
            x = target + order * math.log(max(x, 1.0))
        if self.kspace == "les":
            beta = self.a
        elif self.splitting > 0:
            beta = self.splitting
        elif self.sigma >= self.reciprocal_only_sigma:
            beta = self.a
        else:
            # The k-space cost of β = a grows like 1/σ³; below ~0.8 Å a real-space part with
            # the point-charge β is cheaper (σ = 0.5 Å, 64 ions: 5× for E, F and the double
            # backward) at the same accuracy.
            beta = min(self.a, math.sqrt(x) / self.real_space_cutoff) if self.sigma > 0 \
                else math.sqrt(x) / self.real_space_cutoff
        needs_real_space = self.sigma == 0.0 or beta < self.a * (1.0 - 1e-12)
        return beta, 2.0 * beta * math.sqrt(x), needs_real_space

    def _real_space_cutoff(self, beta: float, order: int) -> float:
        """Cut-off (Å) where the erfc(βr)-type real-space terms fall below the accuracy."""
        x = -math.log(self.accuracy)
        target = x
        for _ in range(50):
            x = target + order * math.log(max(x, 1.0))
        return math.sqrt(x) / beta

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, method={self.method!r}, accuracy={self.accuracy}, "
                f"kspace={self.kspace!r}, beta={self.beta:.4f}")

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                charges: torch.Tensor, dipoles: Optional[torch.Tensor] = None,
                quadrupoles: Optional[torch.Tensor] = None, kappa: Optional[torch.Tensor] = None,
                alpha: Optional[torch.Tensor] = None, batch: Optional[torch.Tensor] = None,
                external_field: Optional[torch.Tensor] = None,
                total_charge: Optional[torch.Tensor] = None,
                compute_fields: bool = True, host_cell: Optional[torch.Tensor] = None,
                host_pbc: Optional[torch.Tensor] = None,
                host_num_atoms: Optional[torch.Tensor] = None) -> ElectrostaticsResult:
        """Energy [B] eV, potential [N] V, field [N,3] V/Å and induced multipoles.

        positions [N,3] Å; cell [B,3,3] Å (rows = lattice vectors); pbc [B,3] bool;
        charges [N] e; dipoles [N,3] e·Å; quadrupoles [N,3,3] e·Å² traceless; kappa [N] e/V;
        alpha [N] or [N,3,3] e·Å²/V; batch [N] structure index (sorted);
        external_field [B,3] V/Å; total_charge [B] e (charges are shifted uniformly to match).
        compute_fields=False (no kappa, no alpha): the energy only, from the structure factor
        or the mesh charge of 3D-periodic batches (about half the cost, less in training);
        potential and field then come back EMPTY ([0] and [0,3]).

        host_cell [B,3,3], host_pbc [B,3] and host_num_atoms [B], CPU copies of cell, pbc and
        the atoms per structure, let every choice (route, mesh, k-vectors, spline order) be made
        on the host: with all three given, the caller vouches that batch is sorted and the
        sources finite (the model's are), the geometry is checked on the host copies, and the
        call reads nothing back from an accelerator. Without them they are copied once here.
        """
        if batch is None:
            batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        if host_cell is not None and host_pbc is not None and host_num_atoms is not None:
            validate_shapes(positions, cell, pbc, charges, dipoles, quadrupoles, kappa, alpha, batch,
                            external_field, total_charge)
            hcell = host_cell.detach().to(torch.float64)
            hpbc = host_pbc
            hsizes = host_num_atoms
            check_cell(hcell, hpbc)
        else:
            validate_inputs(positions, cell, pbc, charges, dipoles, quadrupoles, kappa, alpha, batch,
                            external_field, total_charge)
            hcell = cell.detach().to(device="cpu", dtype=torch.float64)
            hpbc = pbc.cpu()
            hsizes = torch.bincount(batch.cpu(), minlength=cell.shape[0])
        num_structures = cell.shape[0]
        q = charges
        if total_charge is not None:
            counts = segment_sum(torch.ones_like(q), batch, num_structures).clamp(min=1.0)
            excess = (total_charge - segment_sum(q, batch, num_structures)) / counts
            q = q + excess[batch]
        if (not compute_fields and kappa is None and alpha is None
                and self._energy_route(positions, hpbc, dipoles, quadrupoles)):
            energy = self._periodic_energy(positions, cell, batch, q, dipoles, quadrupoles, hcell,
                                           hsizes)
            if not self.remove_self_interaction:
                energy = energy + self._gaussian_self_energy(q, dipoles, quadrupoles, batch,
                                                             num_structures)
            return ElectrostaticsResult(energy, positions.new_zeros(0), positions.new_zeros(0, 3),
                                        None, None, energy, torch.zeros_like(energy), q)
        need_gradient = quadrupoles is not None
        phi, field, gradient = self._site_fields(positions, cell, pbc, batch, q, dipoles,
                                                 quadrupoles, need_gradient, hcell, hpbc, hsizes)
        permanent = segment_sum(kernels.site_energy(q, dipoles, quadrupoles, phi, field, gradient),
                                batch, num_structures)
        if not self.remove_self_interaction:
            permanent = permanent + self._gaussian_self_energy(q, dipoles, quadrupoles, batch,
                                                               num_structures)
        energy = permanent
        # total potential and field seen by the response: add the external field (open only)
        phi_total = phi
        field_total = field
        if external_field is not None:
            open_structure = (~pbc.any(dim=1)).to(positions.dtype)
            e_ext = external_field * open_structure.unsqueeze(-1)          # [B,3]
            phi_ext = -(e_ext[batch] * positions).sum(-1)                   # [N]
            phi_total = phi + phi_ext
            field_total = field + e_ext[batch]
            coupling = q * phi_ext
            if dipoles is not None:
                coupling = coupling - (dipoles * e_ext[batch]).sum(-1)
            energy = energy + segment_sum(coupling, batch, num_structures)
        response = torch.zeros_like(permanent)
        dq: Optional[torch.Tensor] = None
        dmu: Optional[torch.Tensor] = None
        if kappa is not None:
            if self.charge_conservation is None:
                conserve = torch.zeros(num_structures, dtype=torch.bool, device=q.device)
                if total_charge is not None:
                    conserve = torch.ones_like(conserve)
            else:
                conserve = torch.full((num_structures,), bool(self.charge_conservation),
                                      dtype=torch.bool, device=q.device)
            dq, e_q = induced_charges(phi_total, kappa, batch, num_structures, conserve)
            response = response + e_q
        if alpha is not None:
            dmu, e_mu = induced_dipoles(field_total, alpha, batch, num_structures)
            response = response + e_mu
        energy = energy + response
        return ElectrostaticsResult(energy, phi, field, dq, dmu, permanent, response, q)

    # ------------------------------------------------------------------ site fields
    def _site_fields(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                     batch: torch.Tensor, q: torch.Tensor, mu: Optional[torch.Tensor],
                     theta: Optional[torch.Tensor], need_gradient: bool, hcell: torch.Tensor,
                     hpbc: torch.Tensor, hsizes: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """φ, E, ∇E at every site from all other multipoles, routing open and periodic sets
        (hcell, hpbc, hsizes: host copies of cell, pbc and the atoms per structure)."""
        host_open = ~hpbc.any(dim=1)
        if bool(host_open.all()):
            return direct.open_site_fields(positions, batch, q, mu, theta, self.sigma, need_gradient)
        if not bool(host_open.any()):
            return self._periodic_site_fields(positions, cell, pbc, batch, q, mu, theta,
                                              need_gradient, hcell, hpbc, hsizes)
        open_s = host_open.to(pbc.device)
        open_atoms = open_s[batch]
        n = positions.shape[0]
        phi = positions.new_zeros(n)
        field = positions.new_zeros(n, 3)
        gradient: Optional[torch.Tensor] = None
        if need_gradient:
            gradient = positions.new_zeros(n, 3, 3)
        for use_open in [True, False]:
            smask = open_s if use_open else ~open_s
            idx = (open_atoms if use_open else ~open_atoms).nonzero().squeeze(1)
            sub_batch = _reindex(smask, batch, idx)
            sub_mu = mu[idx] if mu is not None else None
            sub_theta = theta[idx] if theta is not None else None
            if use_open:
                p, f, g = direct.open_site_fields(positions[idx], sub_batch, q[idx], sub_mu,
                                                  sub_theta, self.sigma, need_gradient)
            else:
                hmask = ~host_open
                p, f, g = self._periodic_site_fields(positions[idx], cell[smask], pbc[smask],
                                                     sub_batch, q[idx], sub_mu, sub_theta,
                                                     need_gradient, hcell[hmask], hpbc[hmask],
                                                     hsizes[hmask])
            phi = phi.index_copy(0, idx, p)
            field = field.index_copy(0, idx, f)
            if gradient is not None and g is not None:
                gradient = gradient.index_copy(0, idx, g)
        return phi, field, gradient

    def _use_pme(self, hcell: torch.Tensor, hsizes: torch.Tensor, kmax: float) -> bool:
        """PME rather than the k-sum: method pme, or auto above the size threshold or where the
        mesh is cheaper (one rule for the energy route and the site fields)."""
        if self.kspace == "les" or self.method == "ewald":
            return False
        if self.method == "pme":
            return True
        return int(hsizes.max()) > self.pme_threshold or self._mesh_is_cheaper(hcell, hsizes, kmax)

    def _periodic_site_fields(self, positions: torch.Tensor, cell: torch.Tensor,
                              pbc: torch.Tensor, batch: torch.Tensor, q: torch.Tensor,
                              mu: Optional[torch.Tensor], theta: Optional[torch.Tensor],
                              need_gradient: bool, hcell: torch.Tensor, hpbc: torch.Tensor,
                              hsizes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if self.method == "direct":
            raise ValueError("Electrostatics: method='direct' handles open structures only; "
                             "this batch has periodic or slab structures")
        num_structures = cell.shape[0]
        order = 2 if theta is not None else (1 if mu is not None else 0)
        beta, kmax, needs_real_space = self._split(order)
        # the k-sum's cost model decides for the site fields too (they add a field gradient and
        # a double backward in training, which favour the mesh further): at 4 × 64-ion cells the
        # training step of uiu costs 1.30× sr with PME against 2.19× with the k-sum, uQiqiu
        # 2.00× against 4.03× (benchmarks/results/training_step_nacl64_pme.json)
        if self._use_pme(hcell, hsizes, kmax):
            spline_order, mesh = self._spline_order_and_mesh(hcell, hsizes, beta, theta, order)
            phi, field, gradient = pme.pme_site_fields(positions, batch, cell, q, mu, theta, beta,
                                                       mesh, spline_order, need_gradient,
                                                       host_cell=hcell)
        else:
            kvecs, kmask, start, end = self._kvectors(cell, kmax, hcell)
            phi, field, gradient = ewald.reciprocal_site_fields(
                positions, batch, cell, q, mu, theta, beta, kvecs, kmask, need_gradient,
                0, start, end, hsizes)
        phi, field, gradient = self._subtract_self(phi, field, gradient, q, mu, theta, beta)
        if needs_real_space:
            cutoff = self._real_space_cutoff(beta, order)
            edge_index, shifts = self._neighbour_list(positions, cell, pbc, batch, cutoff)
            p, f, g = direct.real_space_site_fields(positions, cell, batch, edge_index, shifts, q,
                                                    mu, theta, self.sigma, beta, need_gradient)
            phi = phi + p
            field = field + f
            if gradient is not None and g is not None:
                gradient = gradient + g
        volume = torch.linalg.det(cell).abs()
        phi = phi + self._background_potential(q, batch, volume, num_structures, beta)
        host_slab = hpbc[:, 0] & hpbc[:, 1] & ~hpbc[:, 2]
        if bool(host_slab.any()):
            slab = host_slab.to(pbc.device)
            p, f = slab_correction_fields(positions, cell, batch, q, mu, slab, self.coulomb)
            phi = phi + p
            field = field + f
        return phi, field, gradient

    def _spline_order_and_mesh(self, hcell: torch.Tensor, hsizes: torch.Tensor, beta: float,
                               theta: Optional[torch.Tensor], rank: int
                               ) -> Tuple[int, Tuple[int, int, int]]:
        """PME B-spline order and mesh for sources up to multipole `rank`. The order is the
        configured one, else 8, or 10 with quadrupoles where the order-8 mesh is the larger
        cost.

        Quadrupoles need the splines' second derivative, and for the same accuracy order 8 a
        mesh 2.9× denser than order 10 (which does 2× the stencil work per site). Measured with
        `benchmarks/pme_order.py` (uQiqiu sources, σ = 1 Å, 1e-6, one thread): in sparse cells
        (64-ion NaCl, 1,400 order-8 mesh points per atom) order 10 costs 0.63× order 8 in a
        force-trained step and 0.58× in energy + forces; they break even near 1,000 points per
        atom (1.01× / 0.95×); at water density (580–730) order 10 costs 1.07–1.38× in training.
        Above 50,000 atoms order 10 is kept (the earlier rule: MD-sized cells, where it was
        measured to halve the time; not re-measured here)."""
        order = 8
        if self.pme_order > 0:
            order = self.pme_order
        elif theta is not None:
            if int(hsizes.max()) > 50000:
                order = 10
            else:
                mesh = pme.choose_mesh(hcell, beta, self.accuracy, 8, rank)
                points_per_atom = mesh[0] * mesh[1] * mesh[2] / max(int(hsizes.max()), 1)
                if points_per_atom <= 1000.0:
                    return 8, mesh  # the mesh the rule measured is the one to use
                order = 10
        return order, pme.choose_mesh(hcell, beta, self.accuracy, order, rank)

    def _kvectors(self, cell: torch.Tensor, kmax: float, hcell: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
        """(k-vectors, mask, taper start, taper end) of the k-sum. The converged set is tapered
        smoothly to zero between kmax and 1.1 kmax, so k-vectors that enter or leave under
        strain cause no jump (SPEC §2); the `les` set is the original untapered truncation."""
        if self.kspace == "les":
            kvecs, kmask = ewald.les_kvectors(cell, self.dl)
            return kvecs, kmask, 0.0, 0.0
        kend = kmax * self.taper_width
        kvecs, kmask = ewald.converged_kvectors(cell, kend, host_cell=hcell)
        return kvecs, kmask, kmax, kend

    def _energy_route(self, positions: torch.Tensor, hpbc: torch.Tensor, mu: Optional[torch.Tensor],
                      theta: Optional[torch.Tensor]) -> bool:
        """Whether the energy alone can come from the k-space / mesh sum: every structure
        3D periodic and no real-space part (σ > 0 with β = a)."""
        if self.method == "direct" or positions.shape[0] == 0 or not bool(hpbc.all()):
            return False
        order = 2 if theta is not None else (1 if mu is not None else 0)
        return not self._split(order)[2]

    def _mesh_is_cheaper(self, hcell: torch.Tensor, hsizes: torch.Tensor, kmax: float) -> bool:
        """For `method: auto` below the PME threshold, whether PME beats the k-sum (energy route
        and site fields alike): the k-sum costs about
        N·K with K ≈ k_end³V/(12π²) vectors, PME a nearly fixed stencil per atom. Measured
        here (force-trained step, 4 cells, σ = 1, 1e-6): the two break even near N·K ≈ 4·10⁴
        (32 ions in 9 Å cells); at 64 ions in 11.3 Å cells PME is 1.5× faster, in 23 Å cells
        3.5× (sparse cells have many k-vectors per atom)."""
        if self.method != "auto" or self.kspace != "converged":
            return False
        kend = kmax * self.taper_width
        volume = float(torch.linalg.det(hcell).abs().max())
        largest = int(hsizes.max())
        return largest * kend ** 3 * volume / (12.0 * math.pi ** 2) > 4.0e4

    def _periodic_energy(self, positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                         q: torch.Tensor, mu: Optional[torch.Tensor],
                         theta: Optional[torch.Tensor], hcell: torch.Tensor,
                         hsizes: torch.Tensor) -> torch.Tensor:
        """Permanent energy [B] of 3D-periodic structures without site fields: the reciprocal
        energy ½Σ_k w|S(k)|² (Ewald) or ½Σ Q·φ_mesh (PME), minus each site's self image, plus
        the background term. Equals Σ site_energy of `_periodic_site_fields`."""
        num_structures = cell.shape[0]
        order = 2 if theta is not None else (1 if mu is not None else 0)
        beta, kmax, _ = self._split(order)
        if self._use_pme(hcell, hsizes, kmax):
            spline_order, mesh = self._spline_order_and_mesh(hcell, hsizes, beta, theta, order)
            energy = pme.pme_energy(positions, batch, cell, q, mu, theta, beta, mesh, spline_order,
                                    host_cell=hcell)
        else:
            kvecs, kmask, start, end = self._kvectors(cell, kmax, hcell)
            if (self.kspace == "converged" and mu is None and theta is None
                    and not cell.requires_grad and not torch.jit.is_scripting()):
                energy = self._charge_energy(positions, batch, cell, q, beta, kvecs, kmask, start, end,
                                             hsizes)
            else:
                energy = ewald.reciprocal_energy(positions, batch, cell, q, mu, theta, beta, kvecs,
                                                 kmask, 0, start, end, hsizes)
        # self images: ½qφ_self, −½μ·E_self, −¼Θ:G_self with the terms of _subtract_self
        sqrt_pi = math.sqrt(math.pi)
        c1 = self.coulomb * 4.0 * beta ** 3 / (3.0 * sqrt_pi)
        site = -self.coulomb * beta / sqrt_pi * q * q
        if mu is not None:
            site = site - 0.5 * c1 * (mu * mu).sum(-1)
        if theta is not None:
            c2 = self.coulomb * 8.0 * beta ** 5 / (5.0 * sqrt_pi)
            trace = theta.diagonal(dim1=-2, dim2=-1).sum(-1)
            site = site - 0.25 * (c1 * q * trace + c2 * (theta * theta).sum((-1, -2)))
        energy = energy + segment_sum(site, batch, num_structures)
        volume = torch.linalg.det(cell).abs()
        phi_bg = self._background_potential(q, batch, volume, num_structures, beta)
        return energy + 0.5 * segment_sum(q * phi_bg, batch, num_structures)

    @torch.jit.unused
    def _charge_energy(self, positions: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor,
                       q: torch.Tensor, beta: float, kvecs: torch.Tensor, kmask: torch.Tensor,
                       kmax: float, kend: float, hsizes: torch.Tensor) -> torch.Tensor:
        """Charges in a cell without stress: hand-written second derivatives (training)."""
        return charge_ewald.charge_reciprocal_energy(positions, batch, cell, q, beta, kvecs, kmask,
                                                     kmax, kend, hsizes)

    def _subtract_self(self, phi: torch.Tensor, field: torch.Tensor,
                       gradient: Optional[torch.Tensor], q: torch.Tensor,
                       mu: Optional[torch.Tensor], theta: Optional[torch.Tensor], beta: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Remove each site's interaction with its own (erf(βr)/r-smeared) image at r = 0."""
        sqrt_pi = math.sqrt(math.pi)
        phi = phi - self.coulomb * q * (2.0 * beta / sqrt_pi)
        c1 = self.coulomb * 4.0 * beta ** 3 / (3.0 * sqrt_pi)
        if mu is not None:
            field = field + c1 * mu
        if gradient is not None:
            eye = torch.eye(3, dtype=q.dtype, device=q.device)
            gradient = gradient + c1 * q[:, None, None] * eye
            if theta is not None:
                gradient = gradient + self.coulomb * 8.0 * beta ** 5 / (5.0 * sqrt_pi) * theta
        return phi, field, gradient

    def _background_potential(self, q: torch.Tensor, batch: torch.Tensor, volume: torch.Tensor,
                              num_structures: int, beta: float) -> torch.Tensor:
        """Potential [N] of the neutralising background through the short-range kernel part."""
        inv_a2 = 1.0 / (self.a * self.a) if self.a > 0 else 0.0
        short_range_integral = math.pi * (1.0 / (beta * beta) - inv_a2)
        if short_range_integral == 0.0:
            return torch.zeros_like(q)
        total = segment_sum(q, batch, num_structures)
        return (-self.coulomb * total / volume * short_range_integral)[batch]

    def _gaussian_self_energy(self, q: torch.Tensor, mu: Optional[torch.Tensor],
                              theta: Optional[torch.Tensor], batch: torch.Tensor,
                              num_structures: int) -> torch.Tensor:
        """Σ k_e √(2/π) [q²/(2σ) + |μ|²/(6σ³) + |Θ|²/(20σ⁵)] per structure (SPEC §2)."""
        s = self.sigma
        c = self.coulomb * math.sqrt(2.0 / math.pi)
        e = q * q / (2.0 * s)
        if mu is not None:
            e = e + (mu * mu).sum(-1) / (6.0 * s ** 3)
        if theta is not None:
            e = e + (theta * theta).sum((-1, -2)) / (20.0 * s ** 5)
        return c * segment_sum(e, batch, num_structures)


@contextlib.contextmanager
def looser_accuracy(model: torch.nn.Module, accuracy: Optional[float]) -> Iterator[None]:
    """Inside the block every `Electrostatics` of `model` sums to relative accuracy
    max(accuracy, its own) (None: unchanged); restored on exit, also after an exception.
    The trainer's optimiser steps run in it (`training.electrostatics_accuracy`)."""
    engines = [m for m in model.modules() if isinstance(m, Electrostatics)] if accuracy is not None else []
    built = [e.accuracy for e in engines]
    try:
        for e, own in zip(engines, built):
            e.accuracy = max(float(accuracy), own)
        yield
    finally:
        for e, own in zip(engines, built):
            e.accuracy = own


def slab_correction_fields(positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                           q: torch.Tensor, mu: Optional[torch.Tensor], slab: torch.Tensor,
                           coulomb: float = COULOMB) -> Tuple[torch.Tensor, torch.Tensor]:
    """Potential [N] and field [N,3] of the Yeh–Berkowitz slab correction (charged form).

    E_YB = c [M² − Q S₂ − Q² L²/12], c = 2π k_e/V, M = Σ q z + μ_z, S₂ = Σ q z² + 2 μ_z z;
    φ_i = ∂E_YB/∂q_i and E_i = −∂E_YB/∂μ_i, so that ½Σ(qφ − μ·E) = E_YB (E_YB is quadratic).
    Only structures flagged in `slab` [B] get a correction.
    """
    num_structures = cell.shape[0]
    normal = torch.linalg.cross(cell[:, 0], cell[:, 1])
    area = torch.linalg.norm(normal, dim=-1)
    normal = normal / area.unsqueeze(-1)
    volume = torch.linalg.det(cell).abs()
    height = volume / area
    c = 2.0 * math.pi * coulomb / volume * slab.to(positions.dtype)        # [B]
    z = (positions * normal[batch]).sum(-1)                                 # [N]
    mz = q * z
    s2 = q * z * z
    mu_z = torch.zeros_like(z)
    if mu is not None:
        mu_z = (mu * normal[batch]).sum(-1)
        mz = mz + mu_z
        s2 = s2 + 2.0 * mu_z * z
    m = segment_sum(mz, batch, num_structures)
    s2_tot = segment_sum(s2, batch, num_structures)
    total = segment_sum(q, batch, num_structures)
    cb = c[batch]
    phi = cb * (2.0 * m[batch] * z - s2_tot[batch] - total[batch] * z * z
                - total[batch] * height[batch] ** 2 / 6.0)
    field_z = -cb * (2.0 * m[batch] - 2.0 * total[batch] * z)
    return phi, field_z.unsqueeze(-1) * normal[batch]

"""PolarMACE: MACE trunk + latent multipoles + electrostatics + linear response, with forces,
stress and electrical observables from one energy (SPEC §1, §5, §6).

    E = Σ E0(Z_i) + scale·Σ E_i^MACE + shift·N + E_elec + E_resp (+ E_field)

The latent monopoles q (0e), dipoles μ (1o), traceless quadrupoles Θ (2e), charge softness
κ ≥ 0 (0e) and polarizabilities α (0e, or PSD 3×3 from 0e·I + Σ u uᵀ of two 1o vectors) are read
out of the trunk's node features, never supervised directly. The model is rebuilt from its own
resolved config (stored in every saved file): no pickled modules.
"""

import copy
from typing import Any, Dict, Final, List, Mapping, Optional

import torch
from ase.data import atomic_numbers as ASE_NUMBERS
from e3nn import o3

from polarmace.derivatives import apply_strain, energy_derivatives
from polarmace.electrostatics import Electrostatics
from polarmace.electrostatics.observables import (
    born_effective_charges, cell_polarizability, electronic_screening, polarization,
)
from polarmace.electrostatics.response import segment_sum
from polarmace.neighbours import edge_vectors
from polarmace.nn.readouts import EquivariantReadout
from polarmace.nn.trunk import MACETrunk

FORMAT_VERSION = 1


def _quadrupole_basis() -> torch.Tensor:
    """[5,3,3]: the 2e components (e3nn basis) as traceless symmetric Cartesian matrices."""
    rtp = o3.ReducedTensorProducts("ij=ji", i="1o")
    q = rtp.change_of_basis  # [6,3,3] for "0e+2e"
    assert str(rtp.irreps_out) == "1x0e+1x2e"
    return q[1:].clone()


def _needs_vector_features(lr: Mapping[str, Any]) -> bool:
    return bool(lr.get("dipoles") or lr.get("quadrupoles")
                or (lr.get("induced_dipoles") and lr.get("polarizability") == "anisotropic"))


class PolarMACE(torch.nn.Module):
    """The end-to-end model. Build it with `polarmace.build_model(config)`.

    forward(graph, compute_forces=True, compute_stress=False, compute_bec=False) takes the
    graph dict of `polarmace.data.graph` and returns a dict with energy [B], node_energy [N],
    forces [N,3], stress/virials [B,3,3] (on request), and, with electrostatics on,
    electrostatic_energy [B], charges [N] (latent + induced), dipoles [N,3], quadrupoles
    [N,3,3], kappa [N], alpha [N] or [N,3,3], polarization/dipole [B,3], polarizability
    [B,3,3] (Å³) and bec [N,3,3] (on request; × √ε_e when long_range.eps_infty is set).
    """

    # constants for TorchScript: switched-off branches are compiled away
    use_charges: Final[bool]
    use_dipoles: Final[bool]
    use_quadrupoles: Final[bool]
    use_induced_charges: Final[bool]
    use_induced_dipoles: Final[bool]
    anisotropic: Final[bool]
    learned_total_charge: Final[bool]
    electrostatics_on: Final[bool]

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config: Dict[str, Any] = copy.deepcopy(dict(config))
        m = self.config["model"]
        lr = self.config["long_range"]
        elements = m.get("elements")
        if not elements:
            raise ValueError("model.elements is not set (the trainer fills it from the data)")
        if not isinstance(m.get("e0s"), Mapping):
            raise ValueError("model.e0s must be resolved to {symbol: eV} before building the model")
        if m.get("avg_num_neighbors") is None:
            raise ValueError("model.avg_num_neighbors must be resolved before building the model")
        numbers = [ASE_NUMBERS[s] for s in elements]
        self.trunk = MACETrunk(
            elements=numbers, r_max=m["r_max"], num_bessel=m["num_bessel"],
            num_polynomial_cutoff=m["num_polynomial_cutoff"], max_ell=m["max_ell"],
            hidden_irreps=m["hidden_irreps"], num_interactions=m["num_interactions"],
            correlation=m["correlation"], radial_mlp=m["radial_mlp"],
            avg_num_neighbors=float(m["avg_num_neighbors"]),
            # Dipole, quadrupole and anisotropic-α readouts need vector features from the last
            # layer (with one interaction layer there are no earlier ones to read from).
            last_layer_scalars_only=not _needs_vector_features(lr),
            residual_first=bool(m.get("residual_first_block", False)),
            last_readout=str(m.get("readout", "mlp")),
            readout_mlp_hidden=int(m.get("readout_mlp_hidden", 16)),
        )
        self.r_max = float(m["r_max"])
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("element_index", lookup)
        self.register_buffer("atomic_energies",
                             torch.tensor([float(m["e0s"].get(s, 0.0)) for s in elements]))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))
        self._build_long_range(lr)

    # ------------------------------------------------------------------ construction
    def _build_long_range(self, lr: Mapping[str, Any]) -> None:
        irreps = self.trunk.node_features_irreps
        scales = lr.get("readout_scales", {})
        self.use_charges = bool(lr.get("charges"))
        self.use_dipoles = bool(lr.get("dipoles"))
        self.use_quadrupoles = bool(lr.get("quadrupoles"))
        self.use_induced_charges = bool(lr.get("induced_charges"))
        self.use_induced_dipoles = bool(lr.get("induced_dipoles"))
        self.anisotropic = lr.get("polarizability", "isotropic") == "anisotropic"
        self.learned_total_charge = lr.get("total_charge", "uniform") == "learned"
        self.electrostatics_on = (self.use_charges or self.use_dipoles or self.use_quadrupoles
                                  or self.use_induced_dipoles or self.use_induced_charges)
        eps = lr.get("eps_infty")
        self.eps_infty = float(eps) if eps is not None else 0.0
        dummy = torch.nn.Identity()
        self.charge_readout = (EquivariantReadout(irreps, "1x0e", scale=scales.get("charges", 0.1))
                               if self.use_charges else dummy)
        self.charge_weight_readout = (EquivariantReadout(irreps, "1x0e", scale=1.0)
                                      if self.use_charges and self.learned_total_charge else dummy)
        self.dipole_readout = (EquivariantReadout(irreps, "1x1o", scale=scales.get("dipoles", 0.1))
                               if self.use_dipoles else dummy)
        self.quadrupole_readout = (EquivariantReadout(irreps, "1x2e", scale=scales.get("quadrupoles", 0.1))
                                   if self.use_quadrupoles else dummy)
        self.kappa_readout = (EquivariantReadout(irreps, "1x0e", scale=1.0)
                              if self.use_induced_charges else dummy)
        alpha_out = "1x0e+2x1o" if self.anisotropic else "1x0e"
        self.alpha_readout = (EquivariantReadout(irreps, alpha_out, scale=1.0)
                              if self.use_induced_dipoles else dummy)
        self.kappa_scale = float(scales.get("kappa", 0.01))
        self.alpha_scale = float(scales.get("alpha", 0.01))
        self.register_buffer("quadrupole_basis", _quadrupole_basis())
        if self.electrostatics_on:
            self.engine = Electrostatics(
                sigma=float(lr.get("sigma", 1.0)), method=lr.get("method", "auto"),
                accuracy=float(lr.get("accuracy", 1e-6)), kspace=lr.get("kspace", "converged"),
                dl=float(lr.get("dl", 2.0)),
                remove_self_interaction=bool(lr.get("remove_self_interaction", True)),
                charge_conservation=bool(lr.get("charge_conservation", True)),
            )
        else:
            self.engine = dummy

    def set_statistics(self, scale: float, shift: float) -> None:
        """Set the energy scale (eV, the force RMS) and shift (eV/atom) from training data."""
        self.scale.fill_(float(scale))
        self.shift.fill_(float(shift))

    # ------------------------------------------------------------------ forward
    def forward(self, graph: Dict[str, torch.Tensor], compute_forces: bool = True,
                compute_stress: bool = False, compute_bec: bool = False) -> Dict[str, torch.Tensor]:
        positions = graph["positions"]
        cell = graph["cell"]
        batch = graph["batch"]
        num_structures = cell.shape[0]
        species = self.element_index[graph["atomic_numbers"]]
        if bool((species < 0).any()):
            bad = graph["atomic_numbers"][species < 0][0]
            raise ValueError("PolarMACE: element with atomic number " + str(int(bad))
                             + " is not in model.elements")
        training = self.training
        positions = positions.detach().requires_grad_(compute_forces or compute_bec or training)
        displacement: Optional[torch.Tensor] = None
        strained_pos = positions
        strained_cell = cell
        if compute_stress:
            displacement = torch.zeros_like(cell).requires_grad_(True)
            strained_pos, strained_cell = apply_strain(positions, cell, batch, displacement)
        vectors = edge_vectors(strained_pos, strained_cell, batch, graph["edge_index"], graph["shifts"])
        features, node_mace = self.trunk(graph["atomic_numbers"], graph["edge_index"], vectors, batch)
        node_energy = self.atomic_energies[species] + self.scale * node_mace + self.shift
        energy = segment_sum(node_energy, batch, num_structures)
        out: Dict[str, torch.Tensor] = {}
        if self.electrostatics_on:
            e_elec = self._long_range(graph, features, strained_pos, strained_cell, batch,
                                      num_structures, out)
            energy = energy + e_elec
        create_graph = training or compute_bec
        if compute_forces or compute_stress:
            forces, virials, stress = energy_derivatives(energy, positions, displacement, cell,
                                                         compute_forces, compute_stress, create_graph)
            if forces is not None:
                out["forces"] = forces
            if virials is not None and stress is not None:
                out["virials"] = virials
                out["stress"] = stress
        if compute_bec and self.electrostatics_on:
            bec = born_effective_charges(positions, cell, graph["pbc"], batch, out["charges"],
                                         out["dipoles"], create_graph=training)
            if self.eps_infty > 0:
                bec = bec * out["screening"].sqrt()[batch][:, None, None]
            out["bec"] = bec
        out["energy"] = energy
        out["node_energy"] = node_energy
        return out

    def _long_range(self, graph: Dict[str, torch.Tensor], features: torch.Tensor,
                    positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor,
                    num_structures: int, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        n = positions.shape[0]
        q = positions.new_zeros(n)
        total = graph["total_charge"].to(positions.dtype) if "total_charge" in graph else None
        if self.use_charges:
            q = self.charge_readout(features).squeeze(-1)
            if self.learned_total_charge and total is not None:
                w = torch.nn.functional.softplus(self.charge_weight_readout(features).squeeze(-1)) + 1e-6
                excess = total - segment_sum(q, batch, num_structures)
                q = q + w * (excess / segment_sum(w, batch, num_structures))[batch]
        mu: Optional[torch.Tensor] = None
        if self.use_dipoles:
            mu = self.dipole_readout(features)
        theta: Optional[torch.Tensor] = None
        if self.use_quadrupoles:
            comps = self.quadrupole_readout(features)                 # [N,5]
            theta = torch.einsum("nm,mab->nab", comps, self.quadrupole_basis.to(comps.dtype))
        kappa: Optional[torch.Tensor] = None
        if self.use_induced_charges:
            kappa = self.kappa_scale * torch.nn.functional.softplus(self.kappa_readout(features).squeeze(-1))
        alpha: Optional[torch.Tensor] = None
        if self.use_induced_dipoles:
            a = self.alpha_readout(features)
            iso = self.alpha_scale * torch.nn.functional.softplus(a[:, 0])
            if self.anisotropic:
                u = a[:, 1:4] * (self.alpha_scale ** 0.5)
                v = a[:, 4:7] * (self.alpha_scale ** 0.5)
                eye = torch.eye(3, dtype=a.dtype, device=a.device)
                alpha = (iso[:, None, None] * eye + u[:, :, None] * u[:, None, :]
                         + v[:, :, None] * v[:, None, :])
            else:
                alpha = iso
        field: Optional[torch.Tensor] = None
        if "external_field" in graph:
            field = graph["external_field"].to(positions.dtype)
        result = self.engine(positions, cell, graph["pbc"], q, dipoles=mu, quadrupoles=theta,
                             kappa=kappa, alpha=alpha, batch=batch, external_field=field,
                             total_charge=total,
                             # without a response step nothing reads the site fields
                             compute_fields=self.use_induced_charges or self.use_induced_dipoles)
        charges = result.charges
        dq = result.induced_charges
        if dq is not None:
            charges = charges + dq
        dipoles = mu if mu is not None else positions.new_zeros(n, 3)
        dmu = result.induced_dipoles
        if dmu is not None:
            dipoles = dipoles + dmu
        out["charges"] = charges
        out["dipoles"] = dipoles
        if theta is not None:
            out["quadrupoles"] = theta
        if kappa is not None:
            out["kappa"] = kappa
        if alpha is not None:
            out["alpha"] = alpha
        out["electrostatic_energy"] = result.energy
        p = polarization(positions, cell, graph["pbc"], batch, charges, dipoles)
        out["polarization"] = p
        out["dipole"] = p
        screening = electronic_screening(self.eps_infty if self.eps_infty > 0 else 1.0, alpha,
                                         cell, graph["pbc"], batch)
        out["screening"] = screening
        if alpha is not None:
            out["polarizability"] = cell_polarizability(alpha, batch, num_structures,
                                                        screening if self.eps_infty > 0 else None)
        return result.energy

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Weights + resolved config + versions (no pickled modules)."""
        import e3nn
        import polarmace
        torch.save({"format_version": FORMAT_VERSION, "config": self.config,
                    "state_dict": self.state_dict(),
                    "dtype": str(self.atomic_energies.dtype).replace("torch.", ""),
                    "versions": {"polarmace": polarmace.__version__, "torch": str(torch.__version__),
                                 "e3nn": e3nn.__version__}}, path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> "PolarMACE":
        """Rebuild a model from a file written by `save` (polarmace-train's <run>/<name>.model).

        A trainer checkpoint, an exported TorchScript file, or a missing, truncated or foreign
        file raises polarmace.errors.ModelFileError (a ValueError) naming the file."""
        from polarmace.export import read_model_file

        blob = read_model_file(path, map_location)
        model = cls(blob["config"])
        dtype = getattr(torch, blob.get("dtype", "float64"))
        model.to(dtype)
        model.load_state_dict(blob["state_dict"])
        model.eval()
        return model


def resolve_model_config(config: Any) -> Dict[str, Any]:
    """Fill defaults and variant presets through the typed config (polarmace.config)."""
    from polarmace.config import load_config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    cfg = dict(config)
    return load_config(cfg).to_dict()


def build_model(config: Any, statistics: Optional[Mapping[str, Any]] = None) -> PolarMACE:
    """Build PolarMACE from a config (dict or Config) whose model.elements, model.e0s and
    model.avg_num_neighbors are resolved; `statistics` may carry scale and shift."""
    cfg = resolve_model_config(config)
    model = PolarMACE(cfg)
    dtype = getattr(torch, cfg["model"].get("dtype", "float64"))
    model.to(dtype)
    if statistics is not None and cfg["model"].get("scale_shift", True):
        model.set_statistics(statistics.get("scale", 1.0), statistics.get("shift", 0.0))
    return model

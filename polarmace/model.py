"""PolarMACE: MACE trunk + latent multipoles + electrostatics + linear response, with forces,
stress and electrical observables from one energy (docs/method.md §1, §5, §6).

    E = Σ E0(Z_i) + scale·Σ E_i^MACE + shift·N (+ E_core) + E_elec + E_resp (+ E_field)

The latent monopoles q (0e), dipoles μ (1o), traceless quadrupoles Θ (2e), charge softness
κ ≥ 0 (0e) and polarizabilities α (0e, or PSD 3×3 from 0e·I + Σ u uᵀ of two 1o vectors) are read
out of the trunk's node features, never supervised directly. The model is rebuilt from its own
resolved config (stored in every saved file): no pickled modules.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Final, List, Mapping, Optional

import torch
from ase.data import atomic_numbers as ASE_NUMBERS
from e3nn import o3

from polarmace.derivatives import apply_strain, energy_derivatives
from polarmace.electrostatics import Electrostatics
from polarmace.electrostatics.observables import (
    born_effective_charges, cell_polarizability, electronic_screening, polarization,
)
from polarmace.electrostatics.response import segment_sum
from polarmace.errors import ModelFileError
from polarmace.neighbours import edge_vectors
from polarmace.nn.readouts import EquivariantReadout
from polarmace.nn.repulsion import CoreRepulsion, pair_cutoffs
from polarmace.nn.trunk import MACETrunk

#: Version of the .model file layout (see `upgrade_model_file`).
FORMAT_VERSION = 2


def _quadrupole_basis() -> torch.Tensor:
    """[5,3,3]: the 2e components (e3nn basis) as traceless symmetric Cartesian matrices."""
    rtp = o3.ReducedTensorProducts("ij=ji", i="1o")
    q = rtp.change_of_basis  # [6,3,3] for "0e+2e"
    assert str(rtp.irreps_out) == "1x0e+1x2e"
    return q[1:].clone()


def _needs_vector_features(long_range: Any) -> bool:
    """Dipole, quadrupole and anisotropic-α readouts read vector (1o, 2e) node features."""
    return bool(long_range.dipoles or long_range.quadrupoles
                or (long_range.induced_dipoles and long_range.polarizability == "anisotropic"))


def model_sections(config: Any) -> Dict[str, Any]:
    """What a model is built from and its file stores, resolved through the typed config
    (every default from polarmace.config): the ``model`` and ``long_range`` sections and the
    training data's conventions (``data.keys``, ``data.default_total_charge``, which eval and
    the calculator follow). No file paths, no training or output settings."""
    from polarmace.config import Config

    full = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = dict(full.get("data") or {})
    conf = Config.from_dict({"model": full.get("model") or {}, "long_range": full.get("long_range") or {},
                             "data": {k: data[k] for k in ("keys", "default_total_charge") if k in data}})
    out = conf.to_dict()
    return {"model": out["model"], "long_range": out["long_range"],
            "data": {"keys": out["data"]["keys"], "default_total_charge": out["data"]["default_total_charge"]}}


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
    use_core_repulsion: Final[bool]

    def __init__(self, config: Any) -> None:
        """`config`: a Config or its dict (the sections of `model_sections` are used), with
        model.elements, model.e0s and model.avg_num_neighbors resolved."""
        super().__init__()
        from polarmace.config import Config

        self.config: Dict[str, Any] = model_sections(config)
        conf = Config.from_dict(self.config)
        m = conf.model
        elements = m.elements
        if not elements:
            raise ValueError("model.elements is not set (the trainer fills it from the data)")
        if not isinstance(m.e0s, Mapping):
            raise ValueError("model.e0s must be resolved to {symbol: eV} before building the model")
        if m.avg_num_neighbors is None:
            raise ValueError("model.avg_num_neighbors must be resolved before building the model")
        numbers = [ASE_NUMBERS[s] for s in elements]
        self.trunk = MACETrunk(
            elements=numbers, r_max=m.r_max, num_bessel=m.num_bessel,
            num_polynomial_cutoff=m.num_polynomial_cutoff, max_ell=m.max_ell,
            hidden_irreps=m.hidden_irreps, num_interactions=m.num_interactions,
            correlation=m.correlation, radial_mlp=m.radial_mlp,
            avg_num_neighbors=float(m.avg_num_neighbors),
            # Dipole, quadrupole and anisotropic-α readouts need vector features from the last
            # layer (with one interaction layer there are no earlier ones to read from).
            last_layer_scalars_only=not _needs_vector_features(conf.long_range),
            residual_first=m.residual_first_block,
            last_readout=m.readout,
            readout_mlp_hidden=m.readout_mlp_hidden,
        )
        self.r_max = float(m.r_max)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("element_index", lookup)
        self.element_numbers: List[int] = numbers
        self.register_buffer("atomic_energies",
                             torch.tensor([float(m.e0s[s]) for s in elements]))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))
        self.use_core_repulsion = m.core_repulsion is not None
        self.core_repulsion = (CoreRepulsion(elements, pair_cutoffs(elements, m.core_repulsion), m.r_max)
                               if self.use_core_repulsion else torch.nn.Identity())
        self._build_long_range(conf.long_range)

    # ------------------------------------------------------------------ construction
    def _build_long_range(self, long_range: Any) -> None:
        """Readouts and the electrostatics engine of the `long_range` section (LongRangeConfig)."""
        irreps = self.trunk.node_features_irreps
        scales = long_range.readout_scales
        self.use_charges = bool(long_range.charges)
        self.use_dipoles = bool(long_range.dipoles)
        self.use_quadrupoles = bool(long_range.quadrupoles)
        self.use_induced_charges = bool(long_range.induced_charges)
        self.use_induced_dipoles = bool(long_range.induced_dipoles)
        self.anisotropic = long_range.polarizability == "anisotropic"
        self.learned_total_charge = long_range.total_charge == "learned"
        self.electrostatics_on = (self.use_charges or self.use_dipoles or self.use_quadrupoles
                                  or self.use_induced_dipoles or self.use_induced_charges)
        eps = long_range.eps_infty
        self.eps_infty = float(eps) if eps is not None else 0.0
        dummy = torch.nn.Identity()
        self.charge_readout = (EquivariantReadout(irreps, "1x0e", scale=scales.charges)
                               if self.use_charges else dummy)
        self.charge_weight_readout = (EquivariantReadout(irreps, "1x0e", scale=1.0)
                                      if self.use_charges and self.learned_total_charge else dummy)
        self.dipole_readout = (EquivariantReadout(irreps, "1x1o", scale=scales.dipoles)
                               if self.use_dipoles else dummy)
        self.quadrupole_readout = (EquivariantReadout(irreps, "1x2e", scale=scales.quadrupoles)
                                   if self.use_quadrupoles else dummy)
        self.kappa_readout = (EquivariantReadout(irreps, "1x0e", scale=1.0)
                              if self.use_induced_charges else dummy)
        alpha_out = "1x0e+2x1o" if self.anisotropic else "1x0e"
        self.alpha_readout = (EquivariantReadout(irreps, alpha_out, scale=1.0)
                              if self.use_induced_dipoles else dummy)
        self.kappa_scale = float(scales.kappa)
        self.alpha_scale = float(scales.alpha)
        self.register_buffer("quadrupole_basis", _quadrupole_basis())
        if self.electrostatics_on:
            self.engine = Electrostatics(
                sigma=float(long_range.sigma), method=long_range.method, accuracy=float(long_range.accuracy),
                kspace=long_range.kspace, dl=float(long_range.dl),
                remove_self_interaction=long_range.remove_self_interaction,
                charge_conservation=long_range.charge_conservation,
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
        # graph keys as literals (those of polarmace.data.keys): TorchScript reads no module-level strings
        positions = graph["positions"]
        cell = graph["cell"]
        batch = graph["batch"]
        num_structures = cell.shape[0]
        element_counts: Optional[List[int]] = None
        num_chunks: Optional[int] = None
        if "host_atomic_number_counts" in graph and "host_receiver_degree" in graph:
            # host-side facts of the batch (polarmace.data.keys): validate and plan without
            # reading anything back from the device
            element_counts = self._host_element_counts(graph["host_atomic_number_counts"])
            num_chunks = self.trunk.num_edge_chunks(graph["host_receiver_degree"])
            species = self.element_index.index_select(0, graph["atomic_numbers"])
        else:
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
        features, node_mace = self.trunk(graph["atomic_numbers"], graph["edge_index"], vectors, batch,
                                         element_counts, num_chunks)
        node_energy = self.atomic_energies[species] + self.scale * node_mace + self.shift
        if self.use_core_repulsion:
            node_energy = node_energy + self.core_repulsion(species, graph["edge_index"],
                                                            torch.linalg.norm(vectors, dim=-1))
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
                                         out["dipoles"], create_graph=training,
                                         host_pbc=graph.get("host_pbc"))
            if self.eps_infty > 0:
                bec = bec * out["screening"].sqrt()[batch][:, None, None]
            out["bec"] = bec
        out["energy"] = energy
        out["node_energy"] = node_energy
        return out

    def _host_element_counts(self, counts_by_z: torch.Tensor) -> List[int]:
        """Atoms of each model element from the host's atoms per atomic number [119]; an element
        the model does not know is an error."""
        by_z: List[int] = counts_by_z.tolist()
        if len(by_z) != self.element_index.shape[0]:
            raise ValueError("PolarMACE: host_atomic_number_counts must have "
                             + str(self.element_index.shape[0]) + " entries, got " + str(len(by_z)))
        counts: List[int] = []
        for z in self.element_numbers:
            counts.append(by_z[z])
        if sum(counts) != sum(by_z):
            for z in range(len(by_z)):
                if by_z[z] > 0 and z not in self.element_numbers:
                    raise ValueError("PolarMACE: element with atomic number " + str(z)
                                     + " is not in model.elements")
        return counts

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
                             compute_fields=self.use_induced_charges or self.use_induced_dipoles,
                             host_cell=graph.get("host_cell"), host_pbc=graph.get("host_pbc"),
                             host_num_atoms=graph.get("host_num_atoms"))
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
        p = polarization(positions, cell, graph["pbc"], batch, charges, dipoles,
                         host_pbc=graph.get("host_pbc"))
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
        """Weights, the model's config sections (`model_sections`: no file paths), the training
        statistics and versions; no pickled modules."""
        import e3nn

        import polarmace
        torch.save({"format_version": FORMAT_VERSION, "config": self.config,
                    "statistics": dict(getattr(self, "statistics", {}) or {}),
                    "state_dict": self.state_dict(),
                    "dtype": str(self.atomic_energies.dtype).replace("torch.", ""),
                    "versions": {"polarmace": polarmace.__version__, "torch": str(torch.__version__),
                                 "e3nn": e3nn.__version__}}, path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> "PolarMACE":
        """Rebuild a model from a file written by `save` (polarmace-train's <run>/<name>.model).

        A trainer checkpoint, an exported TorchScript file, a file of a newer format, or a
        missing, truncated or foreign file raises polarmace.errors.ModelFileError (a ValueError)
        naming the file; an older format is upgraded on reading (`upgrade_model_file`)."""
        from polarmace.export import read_model_file

        blob = upgrade_model_file(read_model_file(path, map_location), str(path))
        return cls._from_weights(blob["config"], blob["state_dict"], blob.get("statistics"), blob["dtype"])

    @classmethod
    def from_checkpoint(cls, path: str, ema: bool = True, map_location: str = "cpu") -> "PolarMACE":
        """The model of a polarmace-train checkpoint (``<run>/checkpoint-e*-s*.pt``): its
        weights, or with `ema` the exponential moving average of them when the run kept one."""
        from polarmace.training.checkpoint import CheckpointHandler

        state = CheckpointHandler(Path(path).parent).load(path, map_location=map_location)
        if not isinstance(state, dict) or not {"config", "model", "statistics"} <= set(state):
            raise ModelFileError(f"{path}: not a polarmace-train checkpoint (no config/model/statistics)")
        weights = dict(state["model"])
        if ema and state.get("ema"):
            weights.update(state["ema"]["shadow"])
        config = state["config"]
        return cls._from_weights(config, weights, state["statistics"], config["model"]["dtype"])

    @classmethod
    def _from_weights(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                      statistics: Optional[Mapping[str, Any]], dtype: str) -> "PolarMACE":
        model = cls(config)
        model.to(getattr(torch, dtype))
        model.load_state_dict(state_dict)
        model.statistics = dict(statistics or {})
        model.eval()
        return model


def _upgrade_v1(blob: Dict[str, Any]) -> Dict[str, Any]:
    """Format 1 stored the whole run config (data paths included) and no statistics."""
    out = dict(blob)
    out["config"] = model_sections(blob["config"])
    sd = blob["state_dict"]
    out["statistics"] = {"scale": float(sd["scale"]), "shift": float(sd["shift"])}
    out["format_version"] = 2
    return out


#: Upgrades of the model file: MIGRATIONS[v] turns a format-v dict into a format-(v+1) one.
MIGRATIONS: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {1: _upgrade_v1}


def upgrade_model_file(blob: Dict[str, Any], source: str = "model file") -> Dict[str, Any]:
    """A model-file dict of any known format as one of FORMAT_VERSION (ModelFileError for a
    file without a format version or of a newer format than this polarmace reads)."""
    version = blob.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{source}: no format_version: not a model file polarmace wrote")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{source}: model file format {version} is newer than this polarmace reads "
                             f"({FORMAT_VERSION}); upgrade polarmace")
    while version < FORMAT_VERSION:
        blob = MIGRATIONS[version](blob)
        version = blob["format_version"]
    blob.setdefault("dtype", "float64")
    return blob


def build_model(config: Any, statistics: Optional[Mapping[str, Any]] = None) -> PolarMACE:
    """Build PolarMACE from a config (Config or its dict) whose model.elements, model.e0s and
    model.avg_num_neighbors are resolved; `statistics` (the trainer's) carry scale (eV/Å)
    and shift (eV/atom), applied when model.scale_shift is on, and are stored with the model."""
    model = PolarMACE(config)
    m = model.config["model"]
    model.to(getattr(torch, m["dtype"]))
    if statistics is not None and m["scale_shift"]:
        model.set_statistics(statistics["scale"], statistics["shift"])
    model.statistics = dict(statistics or {})
    return model


def with_core_repulsion(model: PolarMACE, cutoffs: Any) -> PolarMACE:
    """A copy of `model` with model.core_repulsion set to `cutoffs` ("covalent", {"O-H": Å, …}
    or None) and the same weights. The wall is zero at every distance above its pair cutoff,
    so with cutoffs below the training data's shortest distances the fit there is unchanged."""
    config = {k: dict(v) for k, v in model.config.items()}
    config["model"]["core_repulsion"] = cutoffs
    dtype = str(model.atomic_energies.dtype).replace("torch.", "")
    return PolarMACE._from_weights(config, model.state_dict(), getattr(model, "statistics", None), dtype)

"""ASE calculator for PolarMACE models (docs/method.md §4, §5, §7).

    calc = PolarMACECalculator("model.pt")            # or a PolarMACE module, or an exported .ts
    atoms.calc = calc
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()   # periodic only
    calc.get_property("bec", atoms); calc.get_property("polarizability", atoms)

Properties: energy, free_energy (= energy), energies (per atom), forces, stress (fully periodic
cells only; Voigt order xx yy zz yz xz xy, ASE sign), charges [N] e (latent + induced), dipole [3]
e·Å (polarization; phase form for periodic cells), polarizability [3,3] Å³, bec [N,3,3] e
(bec[i,a,b] = ∂P_a/∂r_ib), electrostatic_energy eV; `results["node_energy"]` [N] holds the short-
range atomic energies. `energies` = node_energy + electrostatic_energy/N (the electrostatic
energy is not local; it is shared equally so that Σ energies = energy).

Total charge: atoms.info["total_charge"] or atoms.info["charge"] (e; both with different values
is an error), else the constructor's `total_charge` (default 0): the rule of
`polarmace.data.atoms.total_charge_of`, shared with the readers, MD and the driver. The value
used is in `results["total_charge"]`.
External field (V/Å): atoms.info["external_field"], else the constructor's `external_field`.
A change of either (or of eps_infty) invalidates the results, like a change of positions.

External field.
  * Open structures (no periodic direction): the field enters the model's energy,
    E_field = −E_ext·P (+ the response of induced charges/dipoles), so forces are −∂E/∂r and
    the dynamics conserve energy = kinetic + potential (potential includes the field term).
  * Structures with a periodic direction: the model gets no field; instead forces get
    F_i += Z*_iᵀ E_ext, i.e. F_ib += Σ_a Z*_i,ab E_a, with Z* in physical units (× √ε_e when
    `eps_infty`, here or in the model's config, is set). **This force is not the gradient of any
    energy** (the position-dependence of Z* makes it non-conservative); energy/stress do not
    include a field term, so total energy is not conserved in such runs.

eps_infty (ε∞): when given here it replaces the model's long_range.eps_infty for bec and
polarizability: Z* × √ε_e and α × ε_e with ε_e = ε∞/(1 + χ) (see
polarmace.electrostatics.observables). When neither is set both are in latent units.

Neighbour lists are built at r_max + skin and reused while no atom has moved more than skin/2
since the build and cell, pbc and atomic numbers are unchanged; each call keeps the stored pairs
closer than r_max at the current positions, which gives the same graph as a fresh build.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from polarmace.data.atoms import find_total_charge, total_charge_of
from polarmace.data.schema import CLOSE_DISTANCE, MIN_DISTANCE, DataError, check_cell, closest_pair_problem
from polarmace.data.graph import host_facts
from polarmace.export import load_any, model_dtype, model_metadata
from polarmace.neighbours import neighbour_pairs

__all__ = ["PolarMACECalculator", "NeighbourCache", "total_charge_of", "external_field_of"]


def external_field_of(atoms: Any, default: Optional[np.ndarray]) -> np.ndarray:
    """External field [3] V/Å from atoms.info["external_field"], else `default`, else zero."""
    value = atoms.info.get("external_field")
    if value is None:
        value = default
    if value is None:
        return np.zeros(3)
    field = np.asarray(value, dtype=float).reshape(-1)
    if field.shape != (3,):
        raise ValueError(f"external_field must have 3 components (V/Å), got {field.size}")
    return field


class NeighbourCache:
    """A neighbour list at `cutoff + skin` reused while atoms move less than skin/2.

    `graph_edges(positions, cell, pbc, numbers)` returns (edge_index [2,E] int64, shifts [E,3]
    float64 numpy) of all pairs closer than `cutoff` at the given positions. `builds` counts the
    full neighbour searches.
    """

    def __init__(self, cutoff: float, skin: float) -> None:
        self.cutoff = float(cutoff)
        self.skin = max(float(skin), 0.0)
        self.builds = 0
        self._ref_positions: Optional[np.ndarray] = None
        self._cell: Optional[np.ndarray] = None
        self._pbc: Optional[np.ndarray] = None
        self._numbers: Optional[np.ndarray] = None
        self._edge_index: Optional[np.ndarray] = None
        self._shifts: Optional[np.ndarray] = None

    def needs_rebuild(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                      numbers: np.ndarray) -> bool:
        """Whether the stored list may miss a pair closer than `cutoff`."""
        if self._ref_positions is None or self.skin == 0.0:
            return True
        if (positions.shape != self._ref_positions.shape or not np.array_equal(numbers, self._numbers)
                or not np.array_equal(pbc, self._pbc) or not np.array_equal(cell, self._cell)):
            return True
        moved = np.sqrt(((positions - self._ref_positions) ** 2).sum(axis=1)).max(initial=0.0)
        return bool(moved > 0.5 * self.skin)

    def _build(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
               numbers: np.ndarray) -> None:
        pos_t = torch.from_numpy(positions)
        batch = torch.zeros(len(positions), dtype=torch.long)
        edge_index, shifts = neighbour_pairs(pos_t, torch.from_numpy(cell)[None],
                                             torch.from_numpy(pbc)[None], batch,
                                             self.cutoff + self.skin)
        self._edge_index = edge_index.numpy()
        self._shifts = shifts.numpy()
        self._ref_positions = positions.copy()
        self._cell = cell.copy()
        self._pbc = pbc.copy()
        self._numbers = numbers.copy()
        self.builds += 1

    def graph_edges(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                    numbers: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        numbers = np.asarray(numbers, dtype=np.int64)
        if self.needs_rebuild(positions, cell, pbc, numbers):
            self._build(positions, cell, pbc, numbers)
        assert self._edge_index is not None and self._shifts is not None
        if self.skin == 0.0:
            return self._edge_index, self._shifts
        i, j = self._edge_index
        vectors = positions[j] - positions[i] + self._shifts @ cell
        keep = np.einsum("ea,ea->e", vectors, vectors) < self.cutoff ** 2
        return self._edge_index[:, keep], self._shifts[keep]


class PolarMACECalculator(Calculator):
    """ASE calculator for a PolarMACE model (see the module docstring for the physics).

    Args:
        model: a PolarMACE module, a scripted one, or a path to `model.save` output or to an
            exported TorchScript file (.ts; see polarmace.export).
        device: torch device for the model ("cpu", "cuda").
        dtype: "float32"/"float64"/torch dtype to convert the model to (default: keep).
        eps_infty: ε∞ for physical BEC (× √ε_e) and polarizability (× ε_e); None = the model's.
        external_field: default field [3] V/Å when atoms.info has no "external_field".
        compute_bec: compute Born effective charges on every call (otherwise only when "bec" is
            requested or a periodic structure is in a non-zero field).
        skin: neighbour-list skin in Å (0 = rebuild at every call).
        total_charge: total charge (e) of structures whose atoms.info gives none (default 0).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "charges",
                              "dipole", "polarizability", "bec", "electrostatic_energy"]
    default_parameters: Dict[str, Any] = {}

    def __init__(self, model: Union[str, Path, torch.nn.Module], device: str = "cpu",
                 dtype: Union[None, str, torch.dtype] = None, eps_infty: Optional[float] = None,
                 external_field: Optional[Sequence[float]] = None, compute_bec: bool = False,
                 skin: float = 0.5, total_charge: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(model, (str, Path)):
            module, meta = load_any(model, map_location=device)
        else:
            module = model
            meta = model_metadata(model) if hasattr(model, "config") else {"r_max": float(model.r_max)}
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is not None and dtype != model_dtype(module):
            if not isinstance(model, (str, Path)) and not isinstance(module, torch.jit.ScriptModule):
                module = copy.deepcopy(module)
            module = module.to(dtype)
        self.model = module.to(device).eval()
        self.metadata = meta
        self.device = torch.device(device)
        self.dtype = model_dtype(self.model)
        self.r_max = float(meta["r_max"])
        self.model_eps_infty = float(meta.get("eps_infty", getattr(self.model, "eps_infty", 0.0)) or 0.0)
        self.has_electrostatics = bool(meta.get("electrostatics",
                                                getattr(self.model, "electrostatics_on", False)))
        self.eps_infty = None if eps_infty is None else float(eps_infty)
        self.external_field = None if external_field is None else np.asarray(external_field, float).reshape(3)
        self.compute_bec = bool(compute_bec)
        self.neighbours = NeighbourCache(self.r_max, skin)
        self.default_total_charge = float(total_charge)
        self.elements = list(meta.get("elements") or [])
        self._warned: set = set()

    # ------------------------------------------------------------------ state
    def check_state(self, atoms: Any, tol: float = 1e-15) -> List[str]:
        """ASE's changes plus "total_charge"/"external_field" when atoms.info changed them."""
        changes = super().check_state(atoms, tol)
        if self.atoms is None:
            return changes
        if self.charge_of(atoms) != self.charge_of(self.atoms):
            changes.append("total_charge")
        old = external_field_of(self.atoms, self.external_field)
        if not np.array_equal(external_field_of(atoms, self.external_field), old):
            changes.append("external_field")
        return changes

    def set_external_field(self, field: Optional[Sequence[float]]) -> None:
        """Change the default field (V/Å) and drop the stored results."""
        self.external_field = None if field is None else np.asarray(field, float).reshape(3)
        self.reset()

    def charge_of(self, atoms: Any) -> float:
        """The total charge (e) the model gets for `atoms` (see the module docstring)."""
        return total_charge_of(atoms, self.default_total_charge, "atoms.info")

    # ------------------------------------------------------------------ graph
    def _check_atoms(self, atoms: Any, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        """DataError (one line, naming the atoms) for what the model cannot evaluate."""
        if len(numbers) == 0:
            raise DataError("atoms: no atoms to evaluate")
        if not np.isfinite(atoms.positions).all():
            raise DataError("atoms: positions contain NaN or inf")
        if self.elements:
            from ase.data import chemical_symbols

            allowed = [chemical_symbols.index(e) for e in self.elements]
            bad = np.flatnonzero(~np.isin(numbers, allowed))
            if len(bad):
                raise DataError(f"atoms: element {chemical_symbols[int(numbers[bad[0]])]} (atom {int(bad[0])}) is not "
                                f"one of the model's elements {', '.join(self.elements)}")
        check_cell(cell, pbc, "atoms")  # before the neighbour search: a singular cell would hang it

    def _check_distances(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                         edge_index: np.ndarray, shifts: np.ndarray) -> None:
        """Coincident atoms are an error; atoms closer than CLOSE_DISTANCE a warning (once)."""
        i, j = edge_index
        d = np.linalg.norm(positions[j] - positions[i] + shifts @ cell, axis=1)
        problem = closest_pair_problem(numbers, i, j, shifts, d, MIN_DISTANCE)
        if problem:
            raise DataError(f"atoms: {problem}")
        problem = closest_pair_problem(numbers, i, j, shifts, d, CLOSE_DISTANCE)
        if problem and "close" not in self._warned:
            self._warned.add("close")
            warnings.warn(f"atoms: {problem}; the energy is not meaningful", UserWarning, stacklevel=4)

    def _note_default_charge(self, atoms: Any) -> None:
        """Warn once when atoms carry no total charge and the model was trained with another default."""
        trained = float(((self.metadata.get("config") or {}).get("data") or {}).get("default_total_charge", 0.0) or 0.0)
        value, _ = find_total_charge(atoms, "atoms.info")
        if value is None and trained != self.default_total_charge and "charge" not in self._warned:
            self._warned.add("charge")
            warnings.warn(f"atoms.info has no total_charge/charge: using {self.default_total_charge:+g} e; the "
                          f"model's training data defaulted to {trained:+g} e (set atoms.info['total_charge'] "
                          f"or total_charge=... if that is meant)", UserWarning, stacklevel=4)

    def build_graph(self, atoms: Any) -> Dict[str, torch.Tensor]:
        """The model's input dict for `atoms`, with the (possibly reused) neighbour list."""
        positions = np.asarray(atoms.positions, dtype=np.float64)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        self._check_atoms(atoms, numbers, cell, pbc)
        edge_index, shifts = self.neighbours.graph_edges(positions, cell, pbc, numbers)
        self._check_distances(numbers, positions, cell, edge_index, shifts)
        self._note_default_charge(atoms)
        n = len(atoms)
        f = dict(dtype=self.dtype, device=self.device)
        field = external_field_of(atoms, self.external_field)
        return {
            "positions": torch.tensor(positions, **f),
            "atomic_numbers": torch.tensor(numbers, device=self.device),
            "batch": torch.zeros(n, dtype=torch.long, device=self.device),
            "ptr": torch.tensor([0, n], dtype=torch.long, device=self.device),
            "cell": torch.tensor(cell, **f).unsqueeze(0),
            "pbc": torch.tensor(pbc, device=self.device).unsqueeze(0),
            "edge_index": torch.tensor(edge_index, dtype=torch.long, device=self.device),
            "shifts": torch.tensor(shifts, **f),
            "total_charge": torch.tensor([self.charge_of(atoms)], **f),
            "external_field": torch.tensor(field, **f).unsqueeze(0),
            "num_atoms": torch.tensor([n], dtype=torch.long, device=self.device),
            "weight": torch.ones(1, **f),
            # on the CPU whatever the device: the model plans the step without a device sync
            **host_facts(numbers, edge_index, cell[None], pbc[None], np.array([n])),
        }

    # ------------------------------------------------------------------ screening
    def _epsilon_factor(self, out: Dict[str, torch.Tensor]) -> Optional[float]:
        """ε_e to apply to latent α (and √ε_e to latent Z*), or None to keep the model's output.

        The model returns screening s = m/(1+χ) with m its own ε∞ (1 when unset) and has already
        scaled bec/polarizability by s when m > 0; returns the factor relative to that.
        """
        if self.eps_infty is None or "screening" not in out:
            return None
        s = float(out["screening"].detach()[0])
        m = self.model_eps_infty if self.model_eps_infty > 0 else 1.0
        target = self.eps_infty * s / m
        applied = s if self.model_eps_infty > 0 else 1.0
        return target / applied

    # ------------------------------------------------------------------ calculation
    def calculate(self, atoms: Any = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        field = external_field_of(atoms, self.external_field)
        periodic_field = bool(pbc.any()) and bool(np.any(field != 0.0))
        if "bec" in properties and not self.has_electrostatics:
            raise PropertyNotImplementedError("bec: this model has no electrostatics (variant 'sr')")
        if periodic_field and not self.has_electrostatics:
            raise PropertyNotImplementedError(
                "external field in a periodic cell needs Born effective charges; this model has "
                "no electrostatics")
        want_bec = self.has_electrostatics and (self.compute_bec or "bec" in properties or periodic_field)
        want_stress = bool(pbc.all())
        graph = self.build_graph(atoms)
        out = self.model(graph, True, want_stress, want_bec)
        self.results = self._results(out, len(atoms), field, periodic_field, want_stress)
        self.results["total_charge"] = float(graph["total_charge"][0])  # the charge the model was given

    def _results(self, out: Dict[str, torch.Tensor], n: int, field: np.ndarray,
                 periodic_field: bool, want_stress: bool) -> Dict[str, Any]:
        def arr(key: str) -> np.ndarray:
            return out[key].detach().cpu().double().numpy()

        energy = float(arr("energy")[0])
        node_energy = arr("node_energy")
        forces = arr("forces")
        res: Dict[str, Any] = {"energy": energy, "free_energy": energy, "node_energy": node_energy}
        e_elec = float(arr("electrostatic_energy")[0]) if "electrostatic_energy" in out else 0.0
        res["energies"] = node_energy + e_elec / max(n, 1)
        factor = self._epsilon_factor(out)
        if "electrostatic_energy" in out:
            res["electrostatic_energy"] = e_elec
            res["charges"] = arr("charges")
            res["dipole"] = arr("polarization")[0]
        if "polarizability" in out:
            pol = arr("polarizability")[0]
            res["polarizability"] = pol * factor if factor is not None else pol
        if "bec" in out:
            bec = arr("bec")
            res["bec"] = bec * np.sqrt(factor) if factor is not None else bec
        if periodic_field:
            field_forces = np.einsum("nab,a->nb", res["bec"], field)
            res["field_forces"] = field_forces
            forces = forces + field_forces
        res["forces"] = forces
        if want_stress:
            res["stress"] = full_3x3_to_voigt_6_stress(arr("stress")[0])
        return res

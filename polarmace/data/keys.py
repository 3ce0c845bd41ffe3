"""The keys of the graph dict (the model's input) and their shapes; no dependencies, so that the
model, the loss, the metrics, the calculator and eval all name the entries through this module.

B structures, N atoms, E directed edges:

    positions [N,3] Å          atomic_numbers [N] int64     batch [N] int64 (structure of each atom)
    ptr [B+1] int64            cell [B,3,3] Å (rows = lattice vectors)         pbc [B,3] bool
    edge_index [2,E] int64 (row 0 centre i, row 1 neighbour j)
    shifts [E,3] (r_ij = r_j − r_i + shifts @ cell[batch[i]])
    total_charge [B] e         external_field [B,3] V/Å     num_atoms [B] int64   weight [B]

Host-side facts of the batch, optional, always kept on the CPU (`to_device` leaves them there) so
that the model plans and validates without reading anything back from an accelerator:

    host_atomic_number_counts [119] int64 (atoms per atomic number)
    host_receiver_degree [N] int64 (edges per centre atom, edge_index row 0)
    host_cell [B,3,3] float64 Å   host_pbc [B,3] bool   host_num_atoms [B] int64

and, for each label that at least one structure of the batch carries, the label and its float
mask `mask_key(label)`: energy [B] eV, stress [B,3,3] eV/Å³, virials [B,3,3] eV, dipole [B,3] e·Å
(masks [B]); forces [N,3] eV/Å, bec [N,3,3] e (masks [N]). Entries without the label are zero.
"""

from __future__ import annotations

__all__ = [
    "POSITIONS", "ATOMIC_NUMBERS", "BATCH", "PTR", "CELL", "PBC", "EDGE_INDEX", "SHIFTS", "TOTAL_CHARGE",
    "EXTERNAL_FIELD", "NUM_ATOMS", "WEIGHT", "ENERGY", "FORCES", "STRESS", "VIRIALS", "DIPOLE", "BEC",
    "ENERGY_MASK", "FORCES_MASK", "STRESS_MASK", "VIRIALS_MASK", "DIPOLE_MASK", "BEC_MASK",
    "LABELS", "mask_key", "HOST_ATOMIC_NUMBER_COUNTS", "HOST_RECEIVER_DEGREE", "HOST_CELL",
    "HOST_PBC", "HOST_NUM_ATOMS", "HOST_KEYS",
]

POSITIONS = "positions"
ATOMIC_NUMBERS = "atomic_numbers"
BATCH = "batch"
PTR = "ptr"
CELL = "cell"
PBC = "pbc"
EDGE_INDEX = "edge_index"
SHIFTS = "shifts"
TOTAL_CHARGE = "total_charge"
EXTERNAL_FIELD = "external_field"
NUM_ATOMS = "num_atoms"
WEIGHT = "weight"

HOST_ATOMIC_NUMBER_COUNTS = "host_atomic_number_counts"
HOST_RECEIVER_DEGREE = "host_receiver_degree"
HOST_CELL = "host_cell"
HOST_PBC = "host_pbc"
HOST_NUM_ATOMS = "host_num_atoms"
#: Keys that stay on the host.
HOST_KEYS = (HOST_ATOMIC_NUMBER_COUNTS, HOST_RECEIVER_DEGREE, HOST_CELL, HOST_PBC, HOST_NUM_ATOMS)

ENERGY = "energy"
FORCES = "forces"
STRESS = "stress"
VIRIALS = "virials"
DIPOLE = "dipole"
BEC = "bec"

#: Every label key, in the order of polarmace.data.schema.LABEL_NAMES.
LABELS = (ENERGY, FORCES, STRESS, VIRIALS, DIPOLE, BEC)


def mask_key(label: str) -> str:
    """The key of a label's mask: mask_key("energy") == "energy_mask"."""
    return f"{label}_mask"


ENERGY_MASK = mask_key(ENERGY)
FORCES_MASK = mask_key(FORCES)
STRESS_MASK = mask_key(STRESS)
VIRIALS_MASK = mask_key(VIRIALS)
DIPOLE_MASK = mask_key(DIPOLE)
BEC_MASK = mask_key(BEC)


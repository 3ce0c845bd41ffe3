"""Electrostatics of Gaussian-smeared multipoles: Ewald, PME and direct sums, linear response
and electrical observables. Independent of the neural network: usable with fixed charges or a
classical polarizable model.
"""

from polarmace.electrostatics.engine import Electrostatics, ElectrostaticsResult
from polarmace.electrostatics.observables import (
    born_effective_charges,
    cell_polarizability,
    electronic_screening,
    field_response,
    polarization,
)

__all__ = [
    "Electrostatics",
    "ElectrostaticsResult",
    "born_effective_charges",
    "cell_polarizability",
    "electronic_screening",
    "field_response",
    "polarization",
]

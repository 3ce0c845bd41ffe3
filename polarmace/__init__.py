"""polarmace: equivariant interatomic potentials with long-range electrostatics.

Units everywhere in the API: eV, Å, e, fs (fields in V/Å, potentials in V).
"""

__version__ = "0.1.0"

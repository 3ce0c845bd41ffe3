"""Constants of the AMOEBA water generators (units and conventions)."""

from __future__ import annotations

import os
from typing import Union

#: 1 kJ/mol in eV: 1000 J / (N_A · e), exact SI-2019 constants (= 0.010364269656262175).
KJ_PER_MOL_IN_EV = 1000.0 / (6.02214076e23 * 1.602176634e-19)
#: Å per nm.
ANGSTROM_PER_NM = 10.0
#: Avogadro constant (exact, SI 2019), used for the density of a built box.
AVOGADRO = 6.02214076e23
#: Molar mass of water (g/mol).
WATER_MOLAR_MASS = 18.01528
#: Convergence of the induced dipoles for every stored label (RMS change, Debye; OpenMM's unit).
LABEL_EPSILON = 1e-7
#: The `source` info value of every frame the generators write (a resumed file is checked for it).
SOURCE = "amoeba2018"
DEFAULT_TEMPERATURES = (280.0, 300.0, 320.0, 340.0, 360.0)
PathLike = Union[str, "os.PathLike[str]"]

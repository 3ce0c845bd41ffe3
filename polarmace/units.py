"""Physical constants and unit conversions, in one place.

Internal units: energy eV, length Å, charge e, time fs. Potentials are in V (= eV/e) and fields
in V/Å. Convert at the file boundary only.
"""

import math

#: Coulomb constant k_e = 1/(4π ε0) in eV·Å/e² (CODATA 2018).
COULOMB = 14.399645478425668
#: Vacuum permittivity ε0 in e²/(eV·Å).
EPSILON0 = 1.0 / (4.0 * math.pi * COULOMB)

#: Bohr radius in Å.
BOHR = 0.529177210903
#: Hartree in eV.
HARTREE = 27.211386245988
#: Debye in e·Å.
DEBYE = 0.20819433622621247
#: Boltzmann constant in eV/K.
KB = 8.617333262e-5
#: Reduced Planck constant ħ in eV·fs (CODATA 2018).
HBAR = 0.6582119569
#: Speed of light in cm/fs (for wavenumbers).
SPEED_OF_LIGHT_CM_PER_FS = 2.99792458e-5

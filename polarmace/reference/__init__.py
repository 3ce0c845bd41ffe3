"""Reference data from independent electronic-structure and polarizable force-field codes.

`xtb_nacl`: GFN2-xTB (tblite) charged NaCl clusters with dipoles, BEC and polarizabilities.
`amoeba_water`: AMOEBA (OpenMM) periodic water and water clusters with dipoles and BEC.
Both are optional dependencies; these modules import them lazily. Driven by
`scripts/make_reference_data.py`.
"""

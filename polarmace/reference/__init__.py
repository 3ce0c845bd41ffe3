"""Reference data from independent electronic-structure and polarizable force-field codes.

`xtb_nacl`: GFN2-xTB (tblite) charged NaCl clusters with dipoles, BEC and polarizabilities.
`amoeba_water`: AMOEBA (OpenMM) periodic water and water clusters with dipoles and BEC.
`openmm_ions`: NaCl rigid-ion and Drude melts (OpenMM) with exactly known charges and BEC
(the generator; models and systems in `ions_system`, labels in `ions_labels`, sampling MD in
`ions_sampler`).
`chunk_writer`: the resumable, atomically written output all three generators share.
tblite and OpenMM are optional dependencies; these modules import them lazily. Driven by
`scripts/make_reference_data.py`.
"""

"""polarmace: equivariant interatomic potentials with long-range electrostatics.

Units everywhere in the API: eV, Å, e, fs (fields in V/Å, potentials in V).
"""

__version__ = "0.1.0"

__all__ = ["PolarMACE", "build_model", "__version__"]


def __getattr__(name: str):
    # lazy: importing the package stays cheap (no e3nn/torch graph set-up) until a model is needed
    if name in ("PolarMACE", "build_model"):
        from polarmace import model
        return getattr(model, name)
    raise AttributeError(f"module 'polarmace' has no attribute {name!r}")

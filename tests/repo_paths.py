"""Where the suite's files are, independent of how deep a test module sits under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
"""tests/: the shared helpers (toy_model.py, cli_runner.py, mace_reference.py) and tests/data/."""
ROOT = TESTS.parent
"""The repository root (configs/, scripts/, benchmarks/, pyproject.toml)."""
DATASETS = ROOT.parent / "shared" / "datasets"
"""../shared/datasets next to the repository (tests that need it skip without it)."""


def load_benchmark(name: str, folder: str = "benchmarks"):
    """Import <folder>/<name>.py (benchmarks/ or scripts/) as a module: they are not packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"polarmace_{folder}_{name}",
                                                  ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Where the suite's files are, independent of how deep a test module sits under tests/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
"""tests/: the shared helpers (toy_model.py, cli_runner.py, mace_reference.py) and tests/data/."""
ROOT = TESTS.parent
"""The repository root (configs/, scripts/, benchmarks/, pyproject.toml)."""
DATASETS = ROOT.parent / "shared" / "datasets"
"""../shared/datasets next to the repository (tests that need it skip without it)."""

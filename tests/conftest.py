"""Shared fixtures. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`.

The tests mirror the package (tests/unit/<subpackage>/, tests/integration/) without __init__.py
files, so every test module needs a distinct file name. The helpers shared across directories
(toy_model, toy_data, repo_paths, cli_runner) live here in tests/, which is put on sys.path below.
"""

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def float64_default():
    """Run a test in float64 and restore the default afterwards (other modules test float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

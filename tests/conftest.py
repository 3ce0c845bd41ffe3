"""Shared fixtures. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""

import pytest
import torch


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

"""polarmace.runtime.tune_allocator: glibc's mallopt is reached and accepts both settings."""

import platform

import pytest

from polarmace import runtime


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is a glibc interface")
def test_tune_allocator_applies_on_glibc_and_is_idempotent():
    assert runtime.tune_allocator() is True
    assert runtime.tune_allocator() is True

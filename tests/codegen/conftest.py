"""What the codegen tests share: no profitability check (kernel tests must test the
kernels, not which of two callables timed faster), a clean compiler around every test,
and a private kernel cache for tests that look at the cache itself."""
from __future__ import annotations

import pytest

import kiln
from kiln.codegen import cache, config


def pytest_configure(config):
    # NOTE: the root conftest reads this marker; registered here too so these tests
    # run the same without it.
    config.addinivalue_line("markers", "expect_fallback(reason): the test expects kiln to fall back")


@pytest.fixture(autouse=True)
def _codegen_defaults():
    kiln.reset()
    with config.patch(profitability_check=False):
        yield
    kiln.reset()


@pytest.fixture
def tmp_cache(tmp_path):
    """``config.cache_dir`` set to a fresh folder, with the in-process libraries forgotten."""
    cache.clear_memory()
    with config.patch(cache_dir=str(tmp_path / "kiln-cache")):
        yield tmp_path / "kiln-cache"
    cache.clear_memory()

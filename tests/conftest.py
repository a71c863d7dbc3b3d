"""Shared test settings."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")  # before jax is imported

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "jaxquant",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("jaxquant")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test module's compiled XLA programs when it ends.

    One pytest process compiles tens of thousands of programs, each holding a few memory mappings (about 3 per
    small CPU executable); kept to the end, they approach the kernel's limit of 65530 mappings per process
    (``vm.max_map_count``), where XLA's CPU compiler crashed with a segmentation fault in a late test.
    """
    yield
    jax.clear_caches()

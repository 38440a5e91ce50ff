"""Shared fixtures.  GPU tests carry the ``gpu`` marker and skip, with the reason,
when CuPy or a usable CUDA device is missing -- a CPU run never pretends it tested the GPU."""

import numpy as np
import pytest

from xpnet import backend


def pytest_collection_modifyitems(config, items):
    if backend.has_cupy_gpu:
        return
    reason = f"needs CuPy and a CUDA device: {backend._device_reason}"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        # The marker itself, not item.keywords: keywords also hold directory
        # names, so a checkout in a folder named "gpu" would skip everything.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _numpy_backend_and_seed():
    """Every test starts on NumPy, float32 default, seeded; restored afterwards."""
    saved = (backend._current, backend._reason, backend._pending_error, backend._dtype)
    backend.use("numpy")
    backend.set_dtype("float32")
    backend.seed(0)
    yield
    backend._current, backend._reason, backend._pending_error, backend._dtype = saved


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def gpu_param(values=("numpy", "cupy")):
    """Parametrise over backends; the cupy case carries the gpu marker."""
    return [pytest.param(v, marks=pytest.mark.gpu) if v == "cupy" else v for v in values]

"""CuPy built for a newer CUDA than the NVIDIA driver: the sentence that names the wheel to install.

Versions are CUDA's integers (13000 = 13.0).  Version texts and wheel names come
from ``xpnet.backend``, which words the same problem when it probes the device.
"""

from __future__ import annotations

import importlib.metadata

from .. import backend
from ..backend import cuda_version_text as _ver, wheel_for_driver
from ..errors import BackendError


class DriverMismatchError(BackendError):
    """CuPy (or its NVRTC) is built for a newer CUDA than the NVIDIA driver supports."""



def installed_cupy_wheel() -> str | None:
    """The installed CuPy distribution and version, e.g. "cupy-cuda13x 14.2.0", or None."""
    found = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-"):
            found.append(f"{name} {dist.version}")
    return ", ".join(sorted(set(found))) or None


def driver_mismatch_message(driver_version: int, built_for: int, installed: str | None = None,
                            compiler_version: int | None = None) -> str:
    """One sentence naming the wheel to install when CuPy and the driver disagree.

    Versions are CUDA's integers (13000 = 13.0).  ``built_for``: the CUDA runtime
    CuPy was built for; ``compiler_version``: NVRTC's, which produces the kernels.
    """
    have = installed or "this CuPy"
    if driver_version <= 0:
        return ("No NVIDIA driver was found: install the NVIDIA driver, or run on the CPU with "
                "XPNET_BACKEND=numpy.")
    if built_for // 1000 > driver_version // 1000:
        wheel = wheel_for_driver(driver_version)
        extra = f' ("xpnet[cuda{driver_version // 1000}]")' if driver_version // 1000 >= 12 else ""
        return (f"{have} is built for CUDA {_ver(built_for)} but the NVIDIA driver supports only CUDA "
                f"{_ver(driver_version)}: pip uninstall the CuPy wheel and pip install {wheel}{extra}, "
                "or update the NVIDIA driver.")
    newest = max(built_for, compiler_version or 0)
    if newest > driver_version:
        return (f"{have} compiles kernels with CUDA {_ver(newest)} but the NVIDIA driver supports only CUDA "
                f"{_ver(driver_version)}: pip install \"nvidia-cuda-nvrtc=={_ver(driver_version)}.*\" "
                "(the NVRTC that matches the driver) or update the NVIDIA driver.")
    return (f"CUDA could not load xpnet's kernels with {have} (CUDA {_ver(built_for)}) on a driver for CUDA "
            f"{_ver(driver_version)}: reinstall {wheel_for_driver(driver_version)}, or set XPNET_REFERENCE=1 "
            "to use the generic CuPy code.")


def current_driver_mismatch_message() -> str:
    """``driver_mismatch_message`` for the CuPy and driver of this process."""
    cp = backend.cupy
    if cp is None:
        return f"CuPy is not usable: {backend.device_reason()}."
    runtime = cp.cuda.runtime
    try:
        driver = runtime.driverGetVersion()
    except Exception:
        driver = 0
    try:
        built = runtime.runtimeGetVersion()
    except Exception:
        built = 0
    try:
        major, minor = cp.cuda.nvrtc.getVersion()
        compiler = major * 1000 + minor * 10
    except Exception:
        compiler = None
    return driver_mismatch_message(driver, built, installed_cupy_wheel(), compiler)

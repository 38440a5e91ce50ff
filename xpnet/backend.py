"""THE backend switch: NumPy (CPU) or CuPy (CUDA GPU).

This is the only module of xpnet that imports CuPy.  Everything else asks it:

* ``current()`` -- ``"numpy"`` or ``"cupy"``: where *new* arrays go
  (parameters, batches).  Chosen by ``XPNET_BACKEND=numpy|cupy|auto``
  (default ``auto``: CuPy when a CUDA device is usable, else NumPy), by
  ``use(name)``, or for a block by ``with using(name):``.
* ``get_array_module(*arrays)`` -- the module (``numpy`` or ``cupy``) that
  owns the arrays.  Ops call it on their inputs, so a model moved with
  ``model.to("cupy")`` just works whatever the current backend is.
* ``asarray(x)`` / ``to_numpy(x)`` -- the only two doors between host and
  device.
* ``get_dtype()`` / ``set_dtype()`` -- the default float dtype (float32;
  ``XPNET_DTYPE``).  float64 is for gradient checks.
* ``seed(n)`` / ``rng()`` -- xpnet's random generators.

The probe at import time records separately whether CuPy imports and whether
a CUDA device is usable, so a laptop without CuPy imports this module fine.
"""

from __future__ import annotations

import contextlib
import os
import platform

import numpy

from . import config
from .errors import BackendError, BackendUsageError, DeviceMismatchError

try:  # The probe: CuPy importable?
    import cupy  # noqa: F401  (this is the one place allowed to)
    import cupyx  # noqa: F401

    _cupy_import_error = None
except Exception as exc:  # ImportError, or a broken CUDA library underneath
    cupy = None
    cupyx = None
    _cupy_import_error = f"{type(exc).__name__}: {exc}".strip()

has_cupy = cupy is not None

BACKENDS = config.BACKEND_NAMES
DTYPES = {"float32": numpy.float32, "float64": numpy.float64}

_INSTALL_HINT = 'pip install "xpnet[cuda12]" (or "xpnet[cuda13]" for a CUDA 13 driver)'


def cuda_version_text(v: int) -> str:
    """CUDA's version integer as text: 12040 -> "12.4"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def wheel_for_driver(driver_version: int) -> str:
    """The CuPy wheel built for a driver's CUDA major version (e.g. 12040 -> "cupy-cuda12x")."""
    major = driver_version // 1000
    return f"cupy-cuda{major}x" if major >= 11 else f"a CuPy release for CUDA {cuda_version_text(driver_version)}"


def _probe_device() -> tuple[bool, str]:
    """Is a CUDA device usable through CuPy?  Returns (usable, reason)."""
    if cupy is None:
        reason = "CuPy is not installed"
        if _cupy_import_error and "No module named" not in _cupy_import_error:
            reason = f"CuPy failed to import ({_cupy_import_error})"
        return False, reason
    runtime = cupy.cuda.runtime
    try:
        driver = runtime.driverGetVersion()
    except Exception as exc:  # no driver library at all
        return False, f"no NVIDIA driver was found ({exc})"
    try:
        built_for = runtime.runtimeGetVersion()
    except Exception:
        built_for = 0
    if driver == 0:
        return False, "no NVIDIA driver was found"
    # CUDA's minor-version compatibility: a 13.2 runtime runs on a 13.0 driver; only a
    # newer MAJOR version than the driver's is unusable.
    if built_for and driver // 1000 < built_for // 1000:
        major = driver // 1000
        return False, (
            f"this CuPy build needs CUDA {cuda_version_text(built_for)} but the driver "
            f"supports only CUDA {cuda_version_text(driver)}: install {wheel_for_driver(driver)} "
            f"(pip install \"xpnet[cuda{major}]\") or update the NVIDIA driver"
        )
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return False, "no CUDA device is visible"
    return True, f"{count} CUDA device(s) visible"


has_cupy_gpu, _device_reason = _probe_device()

# --------------------------------------------------------------------------
# State: the current backend and dtype.
_current: str | None = None
_reason = ""
_pending_error: Exception | None = None
_dtype = numpy.dtype(numpy.float32)


def _resolve(name: str, origin: str) -> tuple[str, str]:
    """Turn a requested name into ('numpy'|'cupy', why) or raise."""
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise BackendUsageError(
            f"Unknown backend {name!r} ({origin}): choose one of numpy, cupy or auto."
        )
    name = name.strip().lower()
    if name == "numpy":
        return "numpy", f"asked for ({origin})"
    if name == "cupy":
        if cupy is None:
            raise BackendError(
                f"CuPy was asked for ({origin}) but {_device_reason}: {_INSTALL_HINT}, "
                "or ask for numpy / unset XPNET_BACKEND to run on the CPU."
            )
        if not has_cupy_gpu:
            raise BackendError(
                f"CuPy was asked for ({origin}) and is installed, but no CUDA device is "
                f"usable: {_device_reason}; ask for numpy or unset XPNET_BACKEND to run on the CPU."
            )
        return "cupy", f"asked for ({origin})"
    if has_cupy_gpu:
        return "cupy", f"auto ({origin}): a CUDA device is usable through CuPy"
    return "numpy", f"auto ({origin}): {_device_reason}"


def _init_from_env() -> None:
    """(Re)read XPNET_BACKEND and XPNET_DTYPE (``xpnet.config``).  Errors are kept and raised at first use."""
    global _current, _reason, _pending_error, _dtype
    _pending_error = None
    requested, origin, error = config.read_backend_env()
    dtype_name, dtype_error = config.read_dtype_env()
    _dtype = numpy.dtype(DTYPES[dtype_name])
    try:
        if error is not None:
            raise error
        _current, _reason = _resolve(requested, origin or "default")
    except (BackendError, BackendUsageError) as exc:
        _current, _reason, _pending_error = None, "", exc
    if _pending_error is None and dtype_error is not None:
        _pending_error = dtype_error


def device_reason() -> str:
    """Why a CUDA device is or is not usable, in words (from the import-time probe)."""
    return _device_reason


def current() -> str:
    """The backend new arrays are allocated on: ``"numpy"`` or ``"cupy"``."""
    if _pending_error is not None:
        raise _pending_error
    return _current


def reason() -> str:
    """Why the current backend was chosen, in words."""
    current()
    return _reason


def xp():
    """The array module of the current backend (``numpy`` or ``cupy``)."""
    return cupy if current() == "cupy" else numpy


def use(name: str) -> str:
    """Make ``name`` (numpy, cupy or auto) the current backend; returns the one chosen."""
    global _current, _reason, _pending_error
    _current, _reason = _resolve(name, f"xpnet.use({name!r})")
    _pending_error = None
    return _current


@contextlib.contextmanager
def using(name: str):
    """``with xpnet.using("numpy"):`` -- the backend for a block, restored afterwards."""
    global _current, _reason, _pending_error
    saved = (_current, _reason, _pending_error)
    use(name)
    try:
        yield _current
    finally:
        _current, _reason, _pending_error = saved


def get_array_module(*arrays):
    """``numpy`` or ``cupy``: the module that owns the given arrays."""
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return numpy


def is_cupy_array(a) -> bool:
    return cupy is not None and isinstance(a, cupy.ndarray)


def same_backend(a, b) -> bool:
    """True when both arrays live on the same backend (cheap: a type check)."""
    return is_cupy_array(a) == is_cupy_array(b)


def check_same_backend(x, param, where: str) -> None:
    """Raise a DeviceMismatchError naming ``where`` when x and param live apart."""
    if is_cupy_array(x) != is_cupy_array(param):
        have = "cupy" if is_cupy_array(param) else "numpy"
        got = "cupy" if is_cupy_array(x) else "numpy"
        raise DeviceMismatchError(
            f"{where} has its parameters on {have} but was given a {got} array: move the "
            f"batch with xpnet.asarray(x) (after xpnet.use({have!r})) or the model with "
            f"model.to({got!r})."
        )


def asarray(x, dtype=None):
    """Copy or move ``x`` to the current backend (no copy when already there)."""
    if current() == "cupy":
        return cupy.asarray(x, dtype=dtype)
    if is_cupy_array(x):
        x = x.get()
    return numpy.asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy array holding ``x`` (copied from the GPU when needed)."""
    if is_cupy_array(x):
        return x.get()
    return numpy.asarray(x)


def module_for(name: str):
    """The array module for a backend name (``numpy``/``cupy``), checking it is usable."""
    resolved, _ = _resolve(name, f"backend {name!r}")
    return cupy if resolved == "cupy" else numpy


def synchronize(x=None) -> None:
    """Wait for the GPU to finish queued work (no-op on NumPy)."""
    if cupy is not None and (x is None and current() == "cupy" or is_cupy_array(x)):
        cupy.cuda.get_current_stream().synchronize()


# --------------------------------------------------------------------------
# dtype


def get_dtype() -> numpy.dtype:
    """The default float dtype for new parameters and batches (float32 unless set)."""
    return _dtype


def set_dtype(dtype) -> numpy.dtype:
    """Set the default float dtype: float32 or float64."""
    global _dtype
    key = numpy.dtype(dtype).name if not isinstance(dtype, str) else dtype.strip().lower()
    if key not in DTYPES:
        raise BackendUsageError(f"Unknown dtype {dtype!r}: choose float32 or float64.")
    _dtype = numpy.dtype(DTYPES[key])
    return _dtype


# --------------------------------------------------------------------------
# Random numbers.  Host draws (parameter init, data order, augmentation) come
# from one NumPy Generator so the same seed gives the same weights on both
# backends; device draws (dropout masks on the GPU) from CuPy's generator.

_seed_value: int | None = None
_rng = numpy.random.default_rng()


def seed(n: int) -> None:
    """Seed xpnet's host generator and, when CuPy is usable, the device generator."""
    global _rng, _seed_value
    if not isinstance(n, (int, numpy.integer)) or n < 0:
        raise BackendUsageError(f"seed must be a non-negative integer, got {n!r}.")
    _seed_value = int(n)
    _rng = numpy.random.default_rng(_seed_value)
    if has_cupy_gpu:
        cupy.random.seed(_seed_value)


def rng() -> numpy.random.Generator:
    """xpnet's host random generator (NumPy)."""
    return _rng


def get_rng_state() -> dict:
    """The host generator's state (JSON-serialisable) for checkpoints."""
    return _rng.bit_generator.state


def set_rng_state(state: dict) -> None:
    _rng.bit_generator.state = state


# --------------------------------------------------------------------------
# Describing the setup (``python -m xpnet info``)


def device_info() -> dict:
    """Name and memory of the current CUDA device, or {} on NumPy."""
    if current() != "cupy":
        return {}
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    free, total = dev.mem_info
    return {
        "id": dev.id,
        "name": name,
        "compute_capability": dev.compute_capability,
        "memory_total_bytes": int(total),
        "memory_free_bytes": int(free),
    }


def info() -> dict:
    """Everything ``xpnet info`` prints, as a dict."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    out = {
        "backend": current(),
        "reason": reason(),
        "dtype": get_dtype().name,
        "cupy_importable": has_cupy,
        "cuda_device_usable": has_cupy_gpu,
        "device_probe": _device_reason,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "xpnet": version("xpnet") or "source tree",
            "numpy": numpy.__version__,
            "cupy": cupy.__version__ if cupy is not None else None,
            "pillow": version("pillow"),
            "captcha": version("captcha"),
        },
    }
    if cupy is not None and has_cupy_gpu:
        out["cuda_runtime"] = cuda_version_text(cupy.cuda.runtime.runtimeGetVersion())
        out["cuda_driver"] = cuda_version_text(cupy.cuda.runtime.driverGetVersion())
    out["device"] = device_info()
    return out


_init_from_env()

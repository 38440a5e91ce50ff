"""Check the CUDA kernels without a GPU: compile them with nvcc, run them on the CPU.

Two tools, both used by ``tests/test_cuda_kernels.py`` and usable by hand:

* ``nvcc_check(arch="sm_90")`` compiles every module variant (float/double x
  32/64-bit indices) with ``nvcc -c -Werror all-warnings``: syntax and type
  errors show up here instead of on the GPU.
* ``EmulatedRuntime()`` compiles the same source with the host C++ compiler
  and a small shim (``__global__`` -> nothing, ``blockIdx``/``threadIdx``/
  ``blockDim``/``gridDim`` -> globals set before each emulated thread), and
  runs the kernels through ctypes on NumPy arrays.  It plugs into the same
  argument marshalling as the CuPy runtime (``xpnet.cuda.kernels._im2col(rt, ...)``),
  so the emulation exercises the wrappers and the index arithmetic the GPU
  will run.  Threads run one after another; that is valid because every
  kernel writes each output from exactly one thread and reads no other
  thread's output.  Every array is copied into a buffer with NaN / sentinel
  guard zones on both sides: a write outside an array raises, a read
  outside one turns the result into NaN.

    rt = EmulatedRuntime()
    col = xpnet.cuda.kernels._im2col(rt, x, (3, 3), 1, 1)   # x: a NumPy array
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile

import numpy

from ..errors import BackendError
from .source import ELEMENT_TYPES, SOURCE, module_source

# Enough to make blockIdx & co. plain variables and the CUDA keywords vanish.
CPU_SHIM = r"""
#include <math.h>
struct xp_dim3 { unsigned x, y, z; };
static xp_dim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static xp_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
extern "C" void xpemu_set(unsigned block, unsigned thread, unsigned block_dim, unsigned grid_dim) {
    blockIdx.x = block; threadIdx.x = thread; blockDim.x = block_dim; gridDim.x = grid_dim;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define XP_NEG_INF (-(T)INFINITY)
"""

GUARD = 64  # elements of guard zone on each side of every array

VARIANTS = [(c, wide) for c in ELEMENT_TYPES for wide in (False, True)]


def kernel_signatures() -> dict:
    """{kernel name: [parameter types]} parsed from SOURCE, e.g. ["const T*", "T*", "I", "int"].

    Both runtimes' argument lists are checked against these, so a wrapper that
    passes arguments in the wrong order or of the wrong kind fails on the CPU.
    """
    sigs = {}
    for match in re.finditer(r'extern "C" __global__ void (\w+)\((.*?)\)', SOURCE, re.S):
        params = []
        for param in match.group(2).split(","):
            words = param.replace("__restrict__", "").split()
            params.append(" ".join(words[:-1]).replace(" *", "*"))
        sigs[match.group(1)] = params
    return sigs


def check_arguments(name: str, dtype, args) -> None:
    """Raise BackendError when ``args`` ([(kind, value)], as the wrappers build them)
    do not fit kernel ``name``'s parameters: count, kind, and pointer element types."""
    dtype = numpy.dtype(dtype)
    params = kernel_signatures().get(name)
    if params is None:
        raise BackendError(f"there is no kernel named {name} in the CUDA source.")
    if len(params) != len(args):
        raise BackendError(f"kernel {name} takes {len(params)} arguments, the wrapper passed {len(args)}.")
    for i, (ptype, (kind, value)) in enumerate(zip(params, args)):
        base = ptype.replace("const ", "")
        if base.endswith("*"):
            want = {"T*": dtype, "int*": numpy.dtype(numpy.int32)}[base]
            ok = kind == "p" and getattr(value, "dtype", None) == want
        else:
            ok = kind == {"I": "I", "int": "i", "T": "T"}[base]
        if not ok:
            got = f"{kind} {getattr(value, 'dtype', type(value).__name__)}"
            raise BackendError(f"kernel {name} argument {i} is '{ptype}' but the wrapper passed {got}.")


def find_cxx() -> str | None:
    """The host C++ compiler (``$CXX``, g++, c++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def find_nvcc() -> str | None:
    """nvcc from $PATH or $CUDA_HOME/bin, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.access(path, os.X_OK) else None


def _run(cmd, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BackendError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out}")
    return out


def nvcc_check(arch: str = "sm_90", workdir: str | None = None, variants=None) -> dict:
    """Compile every module variant with nvcc for ``arch``; returns {variant: nvcc output}.

    Raises BackendError (with nvcc's messages) when nvcc is missing or a variant fails.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BackendError("nvcc was not found: install the CUDA toolkit or set CUDA_HOME.")
    workdir = workdir or tempfile.mkdtemp(prefix="xpnet_nvcc_")
    results = {}
    for dtype_char, wide in variants or VARIANTS:
        tag = f"{ELEMENT_TYPES[dtype_char]}_{'i64' if wide else 'i32'}"
        src = os.path.join(workdir, f"xpnet_kernels_{tag}.cu")
        with open(src, "w") as fh:
            fh.write(module_source(dtype_char, wide, "cuda"))
        results[tag] = _run([nvcc, f"-arch={arch}", "-c", "-Werror", "all-warnings", "--resource-usage",
                             src, "-o", src[:-3] + ".o"], f"nvcc for the {tag} kernels")
    return results


class EmulatedRuntime:
    """Runs the kernels on the CPU through ctypes; a drop-in for ``kernels.CupyRuntime``.

    ``launch``: (grid, block) used for every kernel, or "real" for the GPU's
    launch shape (many more emulated threads; keep such tests small).
    """

    name = "cpu-emulation"
    xp = numpy

    def __init__(self, launch=(3, 5), workdir: str | None = None):
        cxx = find_cxx()
        if cxx is None:
            raise BackendError("no C++ compiler (g++, c++ or clang++) was found for the kernel emulation.")
        self.cxx = cxx
        self.launch_shape = launch
        self.workdir = workdir or tempfile.mkdtemp(prefix="xpnet_emu_")
        self._libs = {}
        self.launches = []  # (kernel name, dtype char, wide, total) of every launch, for tests

    def library(self, dtype_char: str, wide: bool):
        key = (dtype_char, wide)
        if key not in self._libs:
            tag = f"{ELEMENT_TYPES[dtype_char]}_{'i64' if wide else 'i32'}"
            src = os.path.join(self.workdir, f"emu_{tag}.cpp")
            lib = os.path.join(self.workdir, f"emu_{tag}.so")
            with open(src, "w") as fh:
                fh.write(CPU_SHIM + module_source(dtype_char, wide, "cpu"))
            _run([self.cxx, "-std=c++14", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                  "-Wno-unused-function", "-Wno-unused-parameter", src, "-o", lib], f"{os.path.basename(self.cxx)} for the {tag} emulation")
            self._libs[key] = ctypes.CDLL(lib)
        return self._libs[key]

    def launch(self, name: str, dtype, wide: bool, total: int, args) -> None:
        dtype = numpy.dtype(dtype)
        check_arguments(name, dtype, args)
        self.launches.append((name, dtype.char, bool(wide), int(total)))
        if total == 0:
            return
        lib = self.library(dtype.char, wide)
        index_c = ctypes.c_longlong if wide else ctypes.c_int
        scalar_c = ctypes.c_float if dtype.char == "f" else ctypes.c_double
        guarded = {}  # id(array) -> (array, buffer): aliased arguments share one buffer
        cargs = []
        for kind, value in args:
            if kind == "p":
                if id(value) not in guarded:
                    tag = len(guarded)
                    guarded[id(value)] = (value, _guarded_copy(value, tag), tag)
                buf = guarded[id(value)][1]
                cargs.append(ctypes.c_void_p(buf.ctypes.data + GUARD * buf.itemsize))
            elif kind == "I":
                cargs.append(index_c(int(value)))
            elif kind == "i":
                cargs.append(ctypes.c_int(int(value)))
            else:
                cargs.append(scalar_c(float(value)))
        fn = getattr(lib, name)
        fn.restype = None
        if self.launch_shape == "real":
            from .kernels import _launch_shape

            grid, block = _launch_shape(total)
        else:
            grid, block = self.launch_shape
        for b in range(grid):
            for t in range(block):
                lib.xpemu_set(b, t, block, grid)
                fn(*cargs)
        for array, buf, tag in guarded.values():
            _check_guards(buf, tag, name)
            array.reshape(-1)[...] = buf[GUARD:GUARD + array.size]


def _sentinel(dtype, tag: int):
    """Guard value for array number ``tag``: a NaN with a payload (floats) or an odd integer.

    Each array gets its own payload, so a value read outside one array and
    written outside another still changes the second one's guard bits.
    """
    dtype = numpy.dtype(dtype)
    if dtype.kind == "f":
        bits = {4: (numpy.uint32, 0x7FC00000), 8: (numpy.uint64, 0x7FF8000000000000)}[dtype.itemsize]
        return numpy.array(bits[1] + 1 + tag, dtype=bits[0]).view(dtype)
    return numpy.array(numpy.iinfo(dtype).min + 7 + tag, dtype=dtype)


def _guarded_copy(array, tag: int):
    if not isinstance(array, numpy.ndarray) or not array.flags.c_contiguous:
        raise BackendError("the emulated kernels take C-contiguous NumPy arrays only.")
    buf = numpy.empty(array.size + 2 * GUARD, dtype=array.dtype)
    buf[:] = _sentinel(array.dtype, tag)
    buf[GUARD:GUARD + array.size] = array.reshape(-1)
    return buf


def _check_guards(buf, tag: int, name: str):
    guard = numpy.empty(GUARD, dtype=buf.dtype)
    guard[:] = _sentinel(buf.dtype, tag)
    expected = guard.tobytes()
    if buf[:GUARD].tobytes() != expected or buf[-GUARD:].tobytes() != expected:
        raise BackendError(f"kernel {name} wrote outside an array (guard zone changed).")
